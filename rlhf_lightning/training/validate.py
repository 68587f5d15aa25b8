"""Checks of a composed run config that fail fast, before any model or data is loaded.

:func:`validate_config` is called at the top of :func:`rlhf_lightning.training.run.run`. It only reads the
config, looks at the file system (``exists``, ``config.json``), reads the small JSON files of
tokenizers and, for an online W&B logger, looks up W&B credentials in the environment and local files;
it never builds a network, never converts a GGUF file and never touches the network.
Each problem is a :class:`ConfigError` whose message is one line naming the offending key, e.g.
``ppo.clip_eps=1.5 must be in (0, 1)``; ``train.py`` prints it as ``error: <message>`` and exits with
status 2. The ranges of the stages' settings are not restated here: :func:`validate_config` builds their
dataclasses (:mod:`rlhf_lightning.config.schema`), whose checks word the message; what Hydra already refuses while
composing (an unknown key, a value of the wrong type) :func:`composition_error` words in one line.

Tokenizer compatibility (``reward_model_path`` and ``critic_path`` against the policy): the reward
model and the critic read the token ids the policy samples, so their tokenizers must give every token
the same id. Two tokenizers count as equal when their fingerprints (:func:`tokenizer_fingerprint`)
are equal:

- the model type of ``tokenizer.json`` (BPE, Unigram, WordPiece, ...);
- the base vocabulary as a ``token -> id`` mapping (``tokenizer.json``'s ``model.vocab``; a Unigram
  vocabulary, a list of ``[piece, score]``, maps each piece to its position);
- the added tokens as a set of ``(id, content, special)``;
- the ids of the BOS, EOS and UNK tokens and of the padding token that
  :func:`rlhf_lightning.models.load_tokenizer` will use (a pad equal to EOS is replaced by UNK where
  UNK differs from EOS, as :func:`rlhf_lightning.models.loading.fix_pad_token` does), looked up from
  ``tokenizer_config.json`` (``special_tokens_map.json`` fills in keys it lacks).

Merges, normalizer, pre-tokenizer, chat template and padding side are not compared: they change how
text becomes ids, not what an id means. Without ``tokenizer.json`` a slow tokenizer's ``vocab.json``
plus ``added_tokens.json`` is used. Where a side has no readable tokenizer files, or the policy's
tokenizer is not available without loading (a GGUF source not converted yet, a Hub model not in the
local Hub cache), the check is skipped with a logged note.

Safe loading notes (checked for Lightning 2.6.6 and torch 2.13):

- ``Trainer.fit(ckpt_path=...)`` passes ``weights_only=None`` down to ``torch.load`` for local files
  (``lightning.fabric.utilities.cloud_io._load``), and torch >= 2.6 turns ``None`` into
  ``weights_only=True`` unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. For ``http(s)://`` paths
  Lightning itself substitutes ``weights_only=False``, so :func:`validate_config` refuses remote
  ``ckpt_path`` values (download the file first) and warns when that environment variable is set.
  The checkpoints of our three modules hold only tensors, numbers, strings, lists and dicts, so they
  load and resume with ``weights_only=True``.
- Networks load from safetensors exports via ``from_pretrained`` with ``trust_remote_code`` from the
  config (``false`` by default).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from rlhf_lightning.algorithms.advantages import CRITIC_ESTIMATORS
from rlhf_lightning.config.paths import looks_like_local_path
from rlhf_lightning.config.schema import (
    LoRASettings,
    as_config,
    check_range,
    describe_type,
    field_type,
    unknown_key_message,
)

log = logging.getLogger(__name__)

#: ``module._target_`` class name -> stage name.
STAGES = {"RewardModule": "reward", "ValueModule": "value", "PPOModule": "ppo", "DPOModule": "dpo"}
#: The file that marks a sharded checkpoint directory (FSDP2's ``last.ckpt/``:
#: :data:`rlhf_lightning.training.fsdp2.METADATA_FILE`, Lightning's name), which ``ckpt_path`` may name.
SHARDED_CKPT_METADATA = "meta.pt"
#: ``ckpt_path`` values Lightning resolves itself (no file to check).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
ON_ERROR = ("raise", "skip")
#: ``trainer.precision`` values Lightning runs as fp16 AMP with a GradScaler (it maps ``16`` to ``16-mixed``).
FP16_MIXED = ("16-mixed", "16", 16)
#: The one-line refusal of fp16 AMP for PPO, here and in ``PPOModule.setup`` (``{precision}``: the value).
PPO_FP16_ERROR = ("trainer.precision={precision} is not supported for stage=ppo: PPO clips its gradients (manual "
                  "optimization) before Lightning's GradScaler unscales them, and fused AdamW unscales inside its "
                  "step (Lightning raises); use trainer.precision=bf16-mixed (or 32-true)")
#: Keys that were renamed, old -> new: a config that still sets the old one is refused, naming the new one.
RENAMED_KEYS = {"value_optim": "critic_optim"}

_ABSENT = object()
_MISSING = object()


class ConfigError(ValueError):
    """An invalid run config. The message is one line and names the offending key."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at dotted ``key``: ``_ABSENT`` if there is no such key, ``_MISSING`` for ``???``."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        return _MISSING
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: cannot resolve the value ({_one_line(err)})") from None


def _check_number(cfg: DictConfig, key: str, what: str = "", **bounds: Any) -> float | int | None:
    """The number at dotted ``key``, checked by :func:`rlhf_lightning.config.schema.check_range` with ``bounds``
    (``None`` when the key is absent or null); ``what``, if given, ends the message in parentheses."""
    value = _get(cfg, key)
    if value is _ABSENT or value is None:
        return None
    if value is _MISSING:
        raise ConfigError(f"{key} is required (it is '???' in the config)")
    try:
        check_range(key, value, **bounds)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{err}" + (f" ({what})" if what else "")) from None
    return value


# --------------------------------------------------------------------------- stage


def config_stage(cfg: DictConfig) -> str:
    """The stage (``reward``, ``value``, ``ppo`` or ``dpo``) of a composed config.

    Read from ``module._target_``, cross-checked with Hydra's ``runtime.choices.stage`` when known
    (from ``cfg.hydra`` or the running Hydra app).

    Raises:
        ConfigError: an unknown module target or stage choice, or the two disagree.
    """
    target = _get(cfg, "module._target_")
    if target in (_ABSENT, _MISSING, None):
        raise ConfigError("module._target_ is missing: choose a stage with stage=reward, stage=value, "
                          "stage=ppo or stage=dpo")
    target = str(target)
    cls = target.rsplit(".", 1)[-1]
    if not target.startswith("rlhf_lightning.modules") or cls not in STAGES:
        known = ", ".join(f"rlhf_lightning.modules.{name}" for name in STAGES)
        raise ConfigError(f"module._target_={target!r} is not a stage module (expected one of {known})")
    stage = STAGES[cls]
    choice = _hydra_stage_choice(cfg)
    if choice is not None:
        if choice not in STAGES.values():
            raise ConfigError(f"stage={choice!r} is not a known stage (expected reward, value, ppo or dpo)")
        if choice != stage:
            raise ConfigError(f"stage={choice} but module._target_={target!r} is the {stage} stage's module")
    return stage


def _hydra_stage_choice(cfg: DictConfig) -> str | None:
    choice = None
    if "hydra" in cfg:
        choice = OmegaConf.select(cfg, "hydra.runtime.choices.stage", default=None, throw_on_missing=False)
    else:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("stage")
    return None if choice is None else str(choice)


def _check_agent(cfg: DictConfig) -> None:
    """``ppo.agent``: its tools (each imported, with a JSON schema) or its environment factory (imported), before
    anything loads (:func:`~rlhf_lightning.rollout.agent.load_environment_factory`)."""
    from rlhf_lightning.config.schema import AgentConfig, as_config

    node = _get(cfg, "ppo.agent")
    if node in (_ABSENT, _MISSING, None):
        return
    settings = as_config(AgentConfig, OmegaConf.to_container(node, resolve=True), "ppo.agent")
    if not settings.enabled:
        return
    from rlhf_lightning.rollout.agent import load_environment_factory

    try:
        load_environment_factory(settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --------------------------------------------------------------------------- paths


def _check_model_dir(cfg: DictConfig, key: str, stage: str) -> Path | None:
    """A reward model / critic source: required, and when local an existing dir with ``config.json``.

    Returns the local directory, or ``None`` for a Hub id (not checked: that needs the network).
    """
    value = _get(cfg, key)
    if value is _MISSING or value is None:
        if key == "reward_model_path":
            extra = (" (or reward.functions or ppo.agent.environment_factory, with reward_model_path=null)"
                     if stage == "ppo" else "")
            raise ConfigError(f"reward_model_path is required for stage={stage}: "
                              f"pass reward_model_path=<reward run dir>/model{extra}")
        raise ConfigError(f"{key} is required for stage={stage}: pass {key}=<run dir>/model")
    if value is _ABSENT:
        return None
    name = str(value)
    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_local_path(name):
            raise ConfigError(f"{key}={name}: directory not found")
        return None  # a Hub id
    if not path.is_dir():
        raise ConfigError(f"{key}={name} is not a directory (expected a saved model: <run dir>/model)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={name} has no config.json (expected a model saved with save_pretrained, "
                          "e.g. <reward run dir>/model)")
    return path


def _is_deepspeed(cfg: DictConfig) -> str | None:
    """``trainer.strategy``'s target (or name) when it is a DeepSpeed strategy, else ``None``."""
    strategy = _get(cfg, "trainer.strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else strategy
    return target if isinstance(target, str) and "deepspeed" in target.lower() else None


def _check_ckpt_path(cfg: DictConfig) -> None:
    value = _get(cfg, "ckpt_path")
    if value in (_ABSENT, None):
        return
    if value is _MISSING:
        raise ConfigError("ckpt_path is required (it is '???' in the config)")
    name = str(value)
    if name in SPECIAL_CKPT_PATHS or name.startswith("registry:"):
        pass
    elif "://" in name:
        raise ConfigError(f"ckpt_path={name}: remote checkpoints are loaded by Lightning with weights_only=False "
                          "(unsafe); download the file and pass its local path")
    elif not (Path(name).expanduser().is_file() or (Path(name).expanduser() / SHARDED_CKPT_METADATA).is_file()):
        raise ConfigError(f"ckpt_path={name}: checkpoint file not found (nor a sharded checkpoint directory with "
                          f"{SHARDED_CKPT_METADATA})")
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        log.warning("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: ckpt_path=%s will be unpickled with "
                    "weights_only=False", name)


# --------------------------------------------------------------------------- tokenizers


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_fingerprint(directory: str | os.PathLike) -> dict | None:
    """What has to match between two tokenizers for token ids to mean the same (module docstring).

    Reads only JSON files of ``directory``. Returns ``None`` when it has no ``tokenizer.json`` and
    no ``vocab.json``.

    Raises:
        ValueError: a tokenizer file is not valid JSON or has an unexpected layout.
    """
    directory = Path(directory)

    def read(name: str) -> Any:
        path = directory / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"unreadable {path}: {_one_line(err)}") from None

    fast = read("tokenizer.json")
    if fast is not None:
        model = fast.get("model") or {}
        kind = model.get("type")
        vocab = model.get("vocab")
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {entry[0]: i for i, entry in enumerate(vocab)}
        if not isinstance(vocab, dict):
            raise ValueError(f"{directory / 'tokenizer.json'}: no model.vocab")
        added = {(int(t["id"]), t["content"], bool(t.get("special", False))) for t in fast.get("added_tokens") or []}
    else:
        vocab = read("vocab.json")
        if not isinstance(vocab, dict):
            return None
        kind = "slow"
        extra = read("added_tokens.json") or {}
        added = {(int(i), tok, True) for tok, i in extra.items()}

    config = read("tokenizer_config.json") or {}
    special_map = read("special_tokens_map.json") or {}
    ids = {content: i for i, content, _ in added}

    def token_id(name: str) -> int | None:
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if content is None:
            return None
        return ids.get(content, vocab.get(content))

    special = {name: token_id(f"{name}_token") for name in ("bos", "eos", "unk", "pad")}
    if special["pad"] is None or special["pad"] == special["eos"]:  # as models.loading.fix_pad_token
        if special["unk"] is not None and special["unk"] != special["eos"]:
            special["pad"] = special["unk"]
        elif special["pad"] is None:
            special["pad"] = special["eos"]
    return {"type": kind, "vocab": vocab, "added": added, "special": special}


def tokenizer_difference(a: dict, b: dict) -> str | None:
    """The first difference between two fingerprints in words (``None`` when equal)."""
    if a["type"] != b["type"]:
        return f"tokenizer type {a['type']} vs {b['type']}"
    if a["vocab"] != b["vocab"]:
        only_a = sorted(set(a["vocab"]) - set(b["vocab"]))
        only_b = sorted(set(b["vocab"]) - set(a["vocab"]))
        moved = sorted(t for t in set(a["vocab"]) & set(b["vocab"]) if a["vocab"][t] != b["vocab"][t])
        detail = (f"token {only_a[0]!r} only in the first" if only_a else f"token {only_b[0]!r} only in the second"
                  if only_b else f"token {moved[0]!r} has id {a['vocab'][moved[0]]} vs {b['vocab'][moved[0]]}")
        return f"vocabulary differs ({len(a['vocab'])} vs {len(b['vocab'])} tokens; {detail})"
    if a["added"] != b["added"]:
        diff = sorted(a["added"] ^ b["added"])
        return f"added tokens differ ({len(a['added'])} vs {len(b['added'])}; e.g. {diff[0]})"
    for name in ("bos", "eos", "unk", "pad"):
        if a["special"][name] != b["special"][name]:
            return f"{name} token id {a['special'][name]} vs {b['special'][name]}"
    return None


def _cached_gguf_tokenizer_dir(directory: Path, gguf_file: str, key: str) -> Path | None:
    """The cached conversion (or tokenizer-only cache) of a GGUF file, if one exists. Never converts."""
    from rlhf_lightning.models.loading import gguf_cache_dir

    path = directory / gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={gguf_file}: not found in {key}'s folder {directory}")
    for candidate in (gguf_cache_dir(path), gguf_cache_dir(path, tokenizer_only=True)):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            return candidate
    return None


def policy_tokenizer_dir(name: str, gguf_file: str | None, key: str = "model.name_or_path") -> Path | None:
    """The local folder holding the policy's tokenizer files, found without loading or converting.

    ``tiny`` and ``tiny-<family>`` build (once, then cached) the tiny model; a GGUF source is looked up in the
    conversion cache; a Hub id in the local Hub cache. ``None`` when not available that way.

    Raises:
        ConfigError: a ``pkg://`` package not installed, a local path or GGUF file that does not exist.
    """
    from rlhf_lightning.models.loading import package_dir, resolve_pretrained, tiny_family

    try:
        family = tiny_family(name)
    except ValueError as err:
        raise ConfigError(f"{key}={name}: {_one_line(err)}") from None
    if family is not None:
        try:
            return Path(resolve_pretrained(name))
        except FileNotFoundError as err:
            raise ConfigError(f"{key}={name}: {_one_line(err)}") from None
    if name.startswith("pkg://"):
        try:
            directory = package_dir(name)
        except FileNotFoundError as err:
            raise ConfigError(f"{key}={name}: {_one_line(err)}") from None
        return _cached_gguf_tokenizer_dir(directory, gguf_file, key) if gguf_file else directory
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}={name} is not a directory")
        return _cached_gguf_tokenizer_dir(path, gguf_file, key) if gguf_file else path
    if looks_like_local_path(name):
        raise ConfigError(f"{key}={name}: directory not found")
    if gguf_file:
        return None  # a GGUF file in a Hub repository: finding its conversion needs a download
    try:
        from huggingface_hub import try_to_load_from_cache

        for file in ("tokenizer.json", "vocab.json"):
            cached = try_to_load_from_cache(name, file)
            if isinstance(cached, str):
                return Path(cached).parent
    except Exception as err:  # noqa: BLE001 - a cache lookup only; skip the check on any failure
        log.debug("Hub cache lookup of %s failed: %s", name, err)
    return None


def _fingerprint(directory: Path, setting: str) -> dict | None:
    """:func:`tokenizer_fingerprint`, its ``ValueError`` raised as a :class:`ConfigError` naming ``setting``."""
    try:
        return tokenizer_fingerprint(directory)
    except ValueError as err:
        raise ConfigError(f"{setting}: {_one_line(err)}") from None


def _check_tokenizers(cfg: DictConfig, stage: str, model_dirs: dict[str, Path]) -> None:
    if not model_dirs:
        return
    policy_key = "policy_path" if stage in ("ppo", "dpo") and _get(cfg, "policy_path") not in (_ABSENT, None) else \
        "model.name_or_path"
    policy = _get(cfg, policy_key)
    if policy in (_ABSENT, _MISSING, None):
        raise ConfigError(f"{policy_key} is required for stage={stage}")
    gguf = _get(cfg, "model.gguf_file")
    gguf = None if gguf in (_ABSENT, _MISSING) else gguf
    policy_dir = policy_tokenizer_dir(str(policy), gguf, policy_key)
    if policy_dir is None:
        log.info("tokenizer check skipped: the tokenizer of %s=%s is not available without loading the model "
                 "(not converted or not cached yet)", policy_key, policy)
        return
    policy_print = _fingerprint(policy_dir, f"{policy_key}={policy}")
    if policy_print is None:
        log.info("tokenizer check skipped: no tokenizer.json or vocab.json in %s (%s)", policy_dir, policy_key)
        return
    for key, directory in model_dirs.items():
        other = _fingerprint(directory, f"{key}={_get(cfg, key)}")
        if other is None:
            log.info("tokenizer check skipped for %s: no tokenizer.json or vocab.json in %s", key, directory)
            continue
        difference = tokenizer_difference(other, policy_print)
        if difference:
            raise ConfigError(f"{key}={_get(cfg, key)}: its tokenizer differs from the policy's "
                              f"({policy_key}={policy}): {difference}")


# --------------------------------------------------------------------------- loggers


def _check_wandb_login(cfg: DictConfig) -> None:
    """A W&B logger that logs online needs credentials
    (:func:`rlhf_lightning.training.tracking.wandb_credentials_found`).

    The mode of a ``logger.<name>`` entry whose ``_target_`` is a ``WandbLogger``: ``offline: true`` is
    offline; else its ``mode``, else ``WANDB_MODE``, else ``online``. Modes in
    :data:`rlhf_lightning.training.tracking.WANDB_MODES_WITHOUT_LOGIN` need no credentials. Nothing is checked
    (and ``wandb`` is not imported) without an online W&B logger.
    """
    loggers = _get(cfg, "logger")
    if not isinstance(loggers, DictConfig):
        return
    from rlhf_lightning.training import tracking

    for name in loggers:
        target = _get(cfg, f"logger.{name}._target_")
        if not isinstance(target, str) or not target.endswith("WandbLogger"):
            continue
        if _get(cfg, f"logger.{name}.offline") is True:
            continue
        mode = _get(cfg, f"logger.{name}.mode")
        if mode in (_ABSENT, _MISSING, None):
            mode = os.environ.get("WANDB_MODE") or "online"
        if str(mode) in tracking.WANDB_MODES_WITHOUT_LOGIN:
            continue
        try:
            found = tracking.wandb_credentials_found()
        except ValueError as err:
            raise ConfigError(f"logger.{name}.mode={mode}: invalid W&B credentials ({err}): run `wandb login`, "
                              f"or log offline with logger.{name}.mode=offline") from None
        if found is False:
            raise ConfigError(f"logger.{name}.mode={mode} needs a W&B API key and none is configured: "
                              f"run `wandb login` (or set WANDB_API_KEY), or log offline with "
                              f"logger.{name}.mode=offline (upload later with `wandb sync`)")
        return  # one lookup answers for every W&B logger


# --------------------------------------------------------------------------- settings


def renamed_key_message(old: str, settings: list[str]) -> str:
    """The refusal of a renamed top-level key (:data:`RENAMED_KEYS`), with the settings given under the old
    name (``["value_optim.lr=1e-3"]``) rewritten to the new one:
    ``value_optim was renamed critic_optim: use critic_optim.lr=1e-3``."""
    new = RENAMED_KEYS[old]
    use = " ".join(new + text[len(old):] for text in settings) if settings else f"{new}.<setting>=<value>"
    return f"{old} was renamed {new}: use {use}"


def _flat_settings(prefix: str, node: Any) -> list[str]:
    """``["<prefix>.<key>=<value>", ...]`` for the leaves of ``node`` (a resolved container or a value)."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in _flat_settings(f"{prefix}.{key}", value)]
    return [] if node is None else [f"{prefix}={node}"]


def _check_renamed_keys(cfg: DictConfig) -> None:
    """A renamed key (:data:`RENAMED_KEYS`) added on the command line (``+value_optim.lr=...``) or by a YAML
    file of one's own is refused with the new name (without ``+``, Hydra refuses it while composing:
    :func:`composition_error`)."""
    for old in RENAMED_KEYS:
        if old in cfg:
            try:
                node = OmegaConf.to_container(cfg[old], resolve=True) if OmegaConf.is_config(cfg[old]) else cfg[old]
            except OmegaConfBaseException:
                node = None
            raise ConfigError(renamed_key_message(old, _flat_settings(old, node)))


def _check_settings(cfg: DictConfig) -> None:
    """Build every top-level node that Hydra typed with a settings dataclass of :mod:`rlhf_lightning.config.schema`
    (``reward``, ``value``, ``ppo``, ``policy_optim``, ``critic_optim``: the ``schema`` entries of the stage's
    defaults list), as the modules will (:func:`rlhf_lightning.config.schema.as_config`), so that its
    ``__post_init__`` checks the ranges now; its ``ValueError`` or ``TypeError`` becomes a
    :class:`ConfigError` naming the full key (``ppo.clip_eps=1.5 must be in (0, 1)``)."""
    for key in cfg:
        if key == "hydra" or not dataclasses.is_dataclass(cls := OmegaConf.get_type(cfg, key)):
            continue
        try:
            settings = OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True)
        except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
            raise ConfigError(f"{getattr(err, 'full_key', None) or key} is required (it is '???' in the config)") \
                from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}: cannot resolve the value ({_one_line(err)})") from None
        try:
            as_config(cls, settings, key)
        except (TypeError, ValueError) as err:
            raise ConfigError(_one_line(err)) from None


def _check_lora(cfg: DictConfig) -> None:
    """``model.lora`` builds (:class:`~rlhf_lightning.config.schema.LoRASettings`); with ``r`` set, no
    ``model.trainable_layers`` (``model.lora.layers`` limits the adapters instead) and no FSDP1 or DeepSpeed
    strategy (:func:`rlhf_lightning.modules.common.check_lora_strategy` says why; FSDP2 takes LoRA)."""
    node = OmegaConf.select(cfg, "model.lora", default=None)
    if node is None:
        return
    try:
        lora = as_config(LoRASettings, OmegaConf.to_container(node, resolve=True), "model.lora")
    except (TypeError, ValueError) as err:
        raise ConfigError(_one_line(err)) from None
    if not lora.enabled:
        return
    if _get(cfg, "model.trainable_layers") not in (None, _ABSENT):
        raise ConfigError("model.trainable_layers and model.lora.r are exclusive: with LoRA, model.lora.layers "
                          "limits the adapters to the top blocks")
    strategy = _get(cfg, "trainer.strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else strategy
    if isinstance(target, str) and ("deepspeed" in target.lower() or "fsdp" in target.lower()) \
            and not target.endswith("FSDP2Strategy"):
        raise ConfigError(f"model.lora.r is set but trainer.strategy={target} cannot train LoRA networks here: "
                          "use trainer=ddp or a single device, or model.lora.r=null")


#: Keys of ``trainer.strategy`` that :class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy` takes besides its
#: :class:`~rlhf_lightning.config.schema.FSDP2Settings`.
FSDP2_STRATEGY_KEYS = ("_target_", "start_method", "process_group_backend", "timeout")


def _check_fsdp2(cfg: DictConfig, stage: str) -> None:
    """Under :class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy` (``trainer=fsdp``, ``trainer=fsdp_cpu``): its
    settings build (:class:`~rlhf_lightning.config.schema.FSDP2Settings`, named ``trainer.strategy.<key>``),
    ``trainer.precision`` is 32-true (mixed precision is ``trainer.strategy.param_dtype``), and PPO asks for
    neither vLLM rollouts (the engine needs each rank's whole policy) nor ``critic.share_base`` (the critic would run
    the sharded policy's backbone outside the policy's own forward). ``ppo.dynamic_sampling`` is taken: the ranks
    decide the resampling rounds together (:meth:`~rlhf_lightning.modules.ppo.PPOModule.dynamic_sampling`), so
    every rank runs the same sharded forwards. Other strategies: nothing."""
    from rlhf_lightning.config.schema import FSDP2Settings

    strategy = _get(cfg, "trainer.strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    if not (isinstance(target, str) and target.endswith("FSDP2Strategy")):
        return
    settings = {k: v for k, v in OmegaConf.to_container(strategy, resolve=True).items()
                if k not in FSDP2_STRATEGY_KEYS}
    try:
        as_config(FSDP2Settings, settings, "trainer.strategy")
    except (TypeError, ValueError) as err:
        raise ConfigError(_one_line(err)) from None
    precision = _get(cfg, "trainer.precision")
    if precision not in (_ABSENT, "32-true", "32", 32):
        raise ConfigError(f"trainer.precision={precision} under FSDP2: use 32-true and set "
                          "trainer.strategy.param_dtype=bfloat16 for mixed precision")
    if stage == "ppo" and _get(cfg, "ppo.generation.backend") == "vllm":
        raise ConfigError("ppo.generation.backend=vllm needs each rank's whole policy: use trainer=ddp or one device "
                          "with vLLM, or ppo.generation.backend=hf under FSDP2")
    if stage == "ppo" and _get(cfg, "critic.share_base") is True:
        raise ConfigError("critic.share_base=true is not supported under FSDP2 (the critic would run the sharded "
                          "policy's backbone outside the policy's forward): set critic.share_base=false")


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this job (Hydra's ``hydra.overrides.task``; none outside Hydra)."""
    if "hydra" in cfg:
        return list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _check_bool_overrides(cfg: DictConfig) -> None:
    """A ``bool`` field of a settings dataclass given on the command line as anything but ``true`` or
    ``false`` (``ppo.joint_optimizer=1``) is refused: OmegaConf turns ``1``, ``yes`` or ``on`` into ``true``
    when it merges the value into the typed node, so the composed config cannot tell."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in _task_overrides(cfg):
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - Hydra parsed it already; anything it did not is not ours to check
            continue
        if override.is_delete() or override.is_sweep_override():
            continue
        parent_key, _, name = override.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else None
        cls = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if dataclasses.is_dataclass(cls) and field_type(cls, name) is bool and not isinstance(override.value(), bool):
            raise ConfigError(f"{override.key_or_group}={override.value()!r} must be {describe_type(bool)}")


def composition_error(err: BaseException, overrides: Sequence[str] = ()) -> ConfigError | None:
    """The one-line :class:`ConfigError` for a config Hydra could not compose because of a key or a value.

    With the settings dataclasses in the ConfigStore (:func:`rlhf_lightning.training.run.register_configs`), Hydra
    refuses while composing what OmegaConf refuses in a typed node, and reports it in several lines. Found in
    ``err``'s chain of causes, an OmegaConf error naming a key becomes:

    - a renamed key (:data:`RENAMED_KEYS`): :func:`renamed_key_message`, with the matching ``overrides``
      rewritten (``value_optim.lr=1e-3`` → ``critic_optim.lr=1e-3``);
    - a key that is not a field: :func:`rlhf_lightning.config.schema.unknown_key_message`
      (``ppo.kl_coeff is not a setting of PPOConfig (did you mean kl_coef?)``); an unknown key outside the
      dataclasses: ``<key> is not a key of the config ...``;
    - a value of the wrong type: ``ppo.kl_coef='big' must be a number`` (the field's type,
      :func:`rlhf_lightning.config.schema.describe_type`).

    Args:
        err: what Hydra's ``compose`` (or ``@hydra.main`` with ``HYDRA_FULL_ERROR=1``) raised.
        overrides: the command-line overrides.

    Returns:
        The error, or ``None`` when ``err`` is of another kind (a config group option that does not exist, a
        YAML syntax error, an error raised while the job ran, which Hydra wraps in ``HydraJobException``):
        Hydra's own report says more about those.
    """
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    key = str(cause.full_key)
    root = key.split(".", 1)[0]
    given = [text.lstrip("+~") for text in overrides]
    given = [text for text in given if text.split("=", 1)[0] == key or text.startswith(f"{key}.")]
    if root in RENAMED_KEYS:
        return ConfigError(renamed_key_message(root, given))
    cls = getattr(cause, "object_type", None)
    cls = cls if dataclasses.is_dataclass(cls) else None
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        parent, _, name = key.rpartition(".")
        if cls is not None:
            return ConfigError(unknown_key_message(cls, name, parent or None))
        text = given[0] if given else f"{key}=..."
        return ConfigError(f"{text.split('=', 1)[0]} is not a key of the config (to add a new key: +{text})")
    if isinstance(cause, ValidationError):
        value = getattr(cause, "value", None)
        annotation = field_type(cls, str(cause.key)) if cls is not None and cause.key is not None else None
        if annotation is not None:
            return ConfigError(f"{key}={value!r} must be {describe_type(annotation)}")
        return ConfigError(f"{key}={value!r}: {_one_line(str(cause.msg).splitlines()[0])}")
    return None


# --------------------------------------------------------------------------- entry point


def validate_config(cfg: DictConfig) -> None:
    """Check a composed run config before anything is instantiated.

    Checks, in this order (the first problem found is raised):

    1. the stage: ``module._target_`` is one of the four modules, Hydra's stage choice (when known)
       is ``reward``, ``value``, ``ppo`` or ``dpo`` and agrees with it;
    2. no renamed key (:data:`RENAMED_KEYS`: ``value_optim``, now ``critic_optim``);
    3. the stage's settings: every top-level node typed by a dataclass of :mod:`rlhf_lightning.config.schema`
       (``reward``, ``value``, ``ppo``, ``policy_optim``, ``critic_optim``) builds, i.e. passes that
       dataclass's checks (β >= 0, ε in (0, 1), γ and λ in [0, 1], positive sizes, known schedules and KL
       estimators, ...); a ``bool`` field set on the command line is ``true`` or ``false``;
       value/PPO: ``batch_size``, ``iterations`` and ``max_prompt_length`` are positive integers;
       PPO: ``batch_size`` is a multiple of ``ppo.num_minibatches``; ``ppo.joint_optimizer`` is true
       under a DeepSpeed strategy (Lightning's takes one optimizer; the ``deepspeed_*`` presets set it for
       PPO through ``conf/stage_trainer/``, so this catches an explicit ``ppo.joint_optimizer=false`` or a
       DeepSpeed strategy of one's own); PPO does not run under ``trainer.precision=16-mixed``
       (:data:`PPO_FP16_ERROR`; DeepSpeed excepted); ``model.lora`` builds, and with ``model.lora.r`` set
       neither ``model.trainable_layers`` nor a DeepSpeed/FSDP strategy is (:func:`_check_lora`);
       under FSDP2 (``trainer=fsdp``, ``fsdp_cpu``) its settings build, the precision is 32-true, and PPO uses
       neither vLLM nor ``critic.share_base`` (:func:`_check_fsdp2`);
       ``ppo.generation.backend=vllm`` needs vLLM installed
       (:data:`rlhf_lightning.rollout.vllm_engine.MISSING_VLLM`);
    4. ``data.on_error`` is ``raise`` or ``skip``; ``ckpt_path`` is a special value or an existing
       local file (not a URL: see the module docstring); ``checkpoint.every_n_train_steps`` is a
       positive integer, ``checkpoint.every_n_minutes`` > 0, ``max_consecutive_bad_steps`` >= 0 (each
       may be null);
    5. value/PPO: ``reward_model_path`` is given (PPO: or null with ``reward.functions`` or
       ``ppo.agent.environment_factory``), the value stage
       is not asked for with a critic-free ``ppo.adv_estimator``; it and ``critic_path`` (only for an
       estimator with a critic), when existing or local-looking
       (:func:`rlhf_lightning.config.paths.looks_like_local_path`: not a Hub id), are directories with
       ``config.json``;
    6. value/PPO: their tokenizers equal the policy's (module docstring), where that is cheap to know;
       DPO: ``reward_model_path``, when given, is checked as in 5 and 6 (it scores the evaluation);
    7. a W&B logger that logs online (``logger.<name>.mode``, default ``WANDB_MODE`` or ``online``) has
       credentials to log with (``wandb login``, ``WANDB_API_KEY``; see
       :func:`rlhf_lightning.training.tracking.wandb_credentials_found`); offline and disabled modes need none.

    Raises:
        ConfigError: one line naming the offending key.
    """
    stage = config_stage(cfg)
    _check_renamed_keys(cfg)
    _check_settings(cfg)
    _check_lora(cfg)
    _check_fsdp2(cfg, stage)
    _check_bool_overrides(cfg)

    if stage in ("value", "ppo"):
        batch_size = _check_number(cfg, "batch_size", "prompts per rollout batch", low=1, integer=True)
        _check_number(cfg, "iterations", "rollout batches to train on", low=1, integer=True)
        _check_number(cfg, "max_prompt_length", low=1, integer=True)
    if stage == "ppo":
        minibatches = _get(cfg, "ppo.num_minibatches")  # a positive integer: checked by PPOConfig
        if batch_size is not None and isinstance(minibatches, int) and batch_size % minibatches:
            raise ConfigError(f"batch_size={batch_size} is not divisible by ppo.num_minibatches={minibatches} "
                              "(each PPO epoch splits the rollout batch into equal minibatches)")
        target = _is_deepspeed(cfg)
        if target is not None and _get(cfg, "ppo.joint_optimizer") is not True:
            raise ConfigError(f"trainer.strategy={target} takes one optimizer and PPO has two (policy, critic): "
                              "set ppo.joint_optimizer=true (one optimizer with two parameter groups)")
        precision = _get(cfg, "trainer.precision")
        if precision in FP16_MIXED and target is None:  # DeepSpeed scales and clips in its engine
            raise ConfigError(PPO_FP16_ERROR.format(precision=precision))
        _check_agent(cfg)
        if _get(cfg, "ppo.generation.backend") == "vllm" and importlib.util.find_spec("vllm") is None:
            from rlhf_lightning.rollout.vllm_engine import MISSING_VLLM

            raise ConfigError(MISSING_VLLM)

    on_error = _get(cfg, "data.on_error")
    if on_error is _MISSING or (on_error is not _ABSENT and on_error not in ON_ERROR):
        shown = "???" if on_error is _MISSING else repr(on_error)
        raise ConfigError(f"data.on_error={shown} must be 'raise' or 'skip'")
    _check_ckpt_path(cfg)
    _check_number(cfg, "checkpoint.every_n_train_steps", "optimizer steps between checkpoints", low=1, integer=True)
    _check_number(cfg, "checkpoint.every_n_minutes", "minutes between checkpoints", low=0, low_open=True)
    _check_number(cfg, "max_consecutive_bad_steps", "0 or null: never stop", low=0, integer=True)

    estimator = _get(cfg, "ppo.adv_estimator")
    critic_free = isinstance(estimator, str) and estimator not in CRITIC_ESTIMATORS
    if stage == "value" and critic_free:
        raise ConfigError(f"stage=value trains a critic for GAE, and ppo.adv_estimator={estimator} uses none: "
                          "skip the value stage (run stage=ppo directly)")
    if stage in ("value", "ppo"):
        keys = ["reward_model_path"]
        functions = _get(cfg, "reward.functions") if stage == "ppo" else None
        environment = _get(cfg, "ppo.agent.environment_factory") if stage == "ppo" else None
        has_functions = functions not in (_ABSENT, _MISSING, None) and len(functions)
        if stage == "ppo" and _get(cfg, "reward_model_path") is None and (
                has_functions or environment not in (_ABSENT, _MISSING, None)):
            keys = []  # the reward functions, or the environment's rewards, alone give the reward
        if not critic_free:
            keys.append("critic_path")
        model_dirs = {}
        for key in keys:
            directory = _check_model_dir(cfg, key, stage)
            if directory is not None and directory.resolve() not in {d.resolve() for d in model_dirs.values()}:
                model_dirs[key] = directory
        _check_tokenizers(cfg, stage, model_dirs)
    if stage == "dpo":
        _check_number(cfg, "max_prompt_length", low=1, integer=True)
        if _get(cfg, "reward_model_path") not in (_ABSENT, None):
            directory = _check_model_dir(cfg, "reward_model_path", stage)
            _check_tokenizers(cfg, stage, {"reward_model_path": directory} if directory is not None else {})
    _check_wandb_login(cfg)
