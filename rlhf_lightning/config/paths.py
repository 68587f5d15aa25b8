"""The one rule that tells a local path from a Hugging Face Hub id, for model and data sources.

A Hub repository id is ``name`` or ``owner/name``: it never starts with ``.``, ``/`` or ``~`` and has at
most one ``/`` (source: ``huggingface_hub.utils.validate_repo_id``, whose rules are "repo_name" or
"namespace/repo_name", letters, digits, ``-``, ``_``, ``.``; a leading ``.`` is refused). A source that
does not exist on disk but could not be a Hub id either is a mistyped local path, and is reported as
"not found" instead of being sent to the Hub (which would fail later with a network or "repository not
found" error that hides the typo). Used by :func:`rlhf_lightning.models.resolve_pretrained`,
:mod:`rlhf_lightning.training.validate` (``reward_model_path``, ``critic_path``, ``model.name_or_path``) and
:func:`rlhf_lightning.data.read_rows`.
"""

from __future__ import annotations

import os

#: Leading characters of a path that cannot begin a Hub id: relative (``./``, ``../``), absolute, home.
LOCAL_PATH_PREFIXES = (".", "/", "~")


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether a model or data source is meant as a local path rather than a Hub id.

    True when ``name`` starts with ``.``, ``/`` or ``~`` (:data:`LOCAL_PATH_PREFIXES`) or contains more
    than one ``/`` (a Hub id is ``name`` or ``owner/name``). Looks only at the string, not the disk:
    callers first use the path when it exists, and call this to decide between "not found" and the Hub.
    Schemes such as ``pkg://`` contain ``//`` and count as local: handle them before calling this.

    Examples: ``"./model"``, ``"/data/x"``, ``"~/m"``, ``"outputs/reward/model"`` -> True;
    ``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, ``"Anthropic/hh-rlhf"`` -> False.

    Args:
        name: the source as written in the config (a ``str`` or ``os.PathLike``).

    Returns:
        bool.
    """
    text = os.fspath(name)
    return text.startswith(LOCAL_PATH_PREFIXES) or text.count("/") > 1
