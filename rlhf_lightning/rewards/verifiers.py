"""Built-in verifiers: reward functions with TRL's signature (:mod:`rlhf_lightning.rewards.functions`).

Each takes ``completions`` (N strings, or TRL conversational ``[{"role": "assistant", "content": ...}]``
lists) and dataset columns as keyword lists of N values, and returns N floats:

* :func:`math_answer`: 1.0 when the completion's final answer equals the ``answer`` column
  mathematically (``math-verify``; the ``rlvr`` extra), else 0.0.
* :func:`last_number_answer`: 1.0 when the last number written in the completion equals the ``answer``
  column (no expression is evaluated: for arithmetic tasks, where math-verify scores an echoed ``6 + 9``
  as 15).
* :func:`exact_answer`: 1.0 when the whole completion, normalised, equals the ``answer`` column.
* :func:`format_match`: 1.0 when the completion matches a regular expression (:data:`FORMAT_REGEX`,
  a bound ``format_regex``, or a ``format_regex`` column), else 0.0.
* :func:`soft_overlong_penalty`: DAPO's soft overlong punishment, 0 down to −1 near a length limit.

The answer verifiers (:func:`math_answer`, :func:`last_number_answer`, :func:`exact_answer`) read the policy's
final turn of a multi-turn trajectory (the ``final_turns`` keyword, which PPO passes with multi-turn rollouts)
instead of the whole trajectory: an answer the environment or a tool wrote earlier in it does not count.

A bad row (a gold answer that cannot be parsed, a missing column, an invalid regex) raises
``ValueError`` naming the function and the row; :func:`~rlhf_lightning.rewards.functions.score_with_functions`
turns it into a one-line :class:`~rlhf_lightning.rewards.functions.RewardFunctionError`.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FORMAT_REGEX",
    "exact_answer",
    "format_match",
    "last_number_answer",
    "math_answer",
    "normalize_answer",
    "require_math_verify",
    "soft_overlong_penalty",
]

#: Default pattern of :func:`format_match`: the whole completion is ``Answer: <integer>`` (an optional
#: final period; surrounding whitespace is stripped before matching). The format the ``rlvr`` tasks ask for.
FORMAT_REGEX = r"Answer: ?-?\d+\.?"


def _text(completion: Any, function: str, row: int) -> str:
    """The text of one completion: a str, or TRL conversational ``[{"role": "assistant", "content": str}]``
    (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict) \
            and isinstance(completion[-1].get("content"), str):
        return completion[-1]["content"]
    raise ValueError(f"{function}: completion at row {row} is a {type(completion).__name__}, expected a str "
                     "or a list of chat messages")


def _column(values: Any, name: str, n: int, function: str) -> list:
    """A per-row column as a list of n values. Raises ValueError when it is missing or has another length."""
    if values is None:
        raise ValueError(f"{function}: needs the dataset column {name!r} (one value per completion), got none")
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{function}: column {name!r} must be a list of {n} values, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{function}: column {name!r} has {len(values)} values for {n} completions")
    return list(values)


# --------------------------------------------------------------------------- math-verify


def require_math_verify():
    """The ``math_verify`` module.

    Raises:
        ImportError: one line naming the ``rlvr`` extra when math-verify is not installed.
    """
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("rlhf_lightning.rewards.verifiers.math_answer needs math-verify: pip install "
                          "'rlhf-lightning[rlvr]' (or EXTRAS=dev,rlvr bash scripts/setup.sh)") from e
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    mv = require_math_verify()
    return tuple(mv.parse(gold, parsing_timeout=timeout))


def math_answer(completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs) -> list[float]:
    """1.0 where the completion's answer equals the gold ``answer`` mathematically, else 0.0.

    Both are parsed with ``math_verify.parse`` (LaTeX and plain expressions: ``42``, ``42.0``, ``\\boxed{42}``,
    ``$\\frac{1}{2}$`` = ``0.5``; in running text the answer after an anchor such as ``"Answer:"`` or
    ``"the answer is"``, otherwise the last expression found) and compared with ``math_verify.verify``
    (numbers equal to 6 decimal places). A completion with nothing parseable scores 0.0.

    Expressions are evaluated: ``"6 + 9"`` (or ``"Answer: 6 + 9"``) verifies against 15, so on arithmetic
    tasks a policy can earn full reward by echoing the question's expression; use
    :func:`last_number_answer` there (measured in ``bench/rlvr_task.md``). Without an anchor the
    answer is the last expression, so an unfinished explanation that happens to end on the gold
    number also scores 1.

    A gold answer must parse on its own (``42``, ``\\frac{1}{2}``; a symbolic one in ``$...$``, e.g.
    ``$x+1$``), else it is an error (plain words would parse as a product of symbols, so no fallback
    wraps them). math-verify's timeouts use ``signal.alarm``, which
    works only in the main thread: elsewhere they are off (parsing then has no time limit).

    Source: Hugging Face Math-Verify (https://github.com/huggingface/Math-Verify), the verifier of
    open-r1 and TRL's ``accuracy_reward``.

    Args:
        completions: N completions (str or TRL conversational messages).
        answer: the dataset column with N gold answers (str or numbers).

    Returns:
        N floats in {0.0, 1.0}.

    Raises:
        ImportError: math-verify is missing (names the ``rlvr`` extra).
        ValueError: no ``answer`` column, or a gold answer at some row that is None or cannot be parsed
            (a data error, never scored 0).
    """
    mv = require_math_verify()
    completions = kwargs.get("final_turns") or completions
    n = len(completions)
    golds = _column(answer, "answer", n, "math_answer")
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    scores = []
    for row, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        if gold is None:
            raise ValueError(f"math_answer: gold answer at row {row} is None")
        gold_parsed = _parse_gold(str(gold), timeout)
        if not gold_parsed:
            raise ValueError(f"math_answer: gold answer {str(gold)!r:.60} at row {row} cannot be parsed by math-verify")
        predicted = mv.parse(_text(completion, "math_answer", row), parsing_timeout=timeout)
        ok = bool(predicted) and mv.verify(list(gold_parsed), predicted, timeout_seconds=timeout)
        scores.append(1.0 if ok else 0.0)
    return scores


# --------------------------------------------------------------------------- last number

_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def _number(text: str) -> float | None:
    text = text.strip()
    match = _NUMBER.fullmatch(text)
    return float(match.group().replace(",", "")) if match else None


def last_number_answer(completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs) -> list[float]:
    """1.0 where the last number written in the completion equals the gold ``answer``, else 0.0.

    Numbers are decimal literals: an optional ``-`` right before the digits, digits with optional
    ``,`` thousands groups (``1,000``) and an optional fraction (``2.5``); a trailing period ends the
    sentence (``"is 17."`` gives 17). Nothing is evaluated: ``"8 + 9 = 17"`` gives 17, ``"8 + 9"``
    gives 9. Number words (``"seventeen"``) are not numbers. A completion without a number scores 0.0.
    Equality is exact on the parsed floats (integers and short decimals compare exactly).

    Args:
        completions: N completions (str or TRL conversational messages).
        answer: N gold answers, each a number or a string holding one number literal.
        kwargs: ``final_turns`` (multi-turn rollouts: the policy's last turns, read instead of ``completions``).

    Returns:
        N floats in {0.0, 1.0}.

    Raises:
        ValueError: no ``answer`` column, or a gold answer at some row that is not a single number.
    """
    completions = kwargs.get("final_turns") or completions
    n = len(completions)
    golds = _column(answer, "answer", n, "last_number_answer")
    scores = []
    for row, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        gold_value = float(gold) if isinstance(gold, (int, float)) and not isinstance(gold, bool) else \
            _number(gold) if isinstance(gold, str) else None
        if gold_value is None:
            raise ValueError(f"last_number_answer: gold answer {gold!r:.60} at row {row} is not a number")
        found = _NUMBER.findall(_text(completion, "last_number_answer", row))
        scores.append(1.0 if found and float(found[-1].replace(",", "")) == gold_value else 0.0)
    return scores


# --------------------------------------------------------------------------- exact match

_EDGE_PUNCT = " \t\r\n\"'`*_.,;:!?()[]{}"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, and strip surrounding quotes, markdown emphasis, brackets and
    punctuation: ``'  "Apple." '`` -> ``'apple'``; inner punctuation stays (``'e.g.'`` -> ``'e.g'``)."""
    return " ".join(str(text).casefold().split()).strip(_EDGE_PUNCT)


def exact_answer(completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs) -> list[float]:
    """1.0 where the whole completion equals the gold ``answer`` after :func:`normalize_answer`, else 0.0.

    For short non-mathematical answers (a word, "yes"/"no"): ``"Apple."`` matches ``apple``, but
    ``"The answer is apple"`` does not (the format is part of the task).

    Raises:
        ValueError: no ``answer`` column, or a gold answer that is None or empty after normalisation.
    """
    completions = kwargs.get("final_turns") or completions
    n = len(completions)
    golds = _column(answer, "answer", n, "exact_answer")
    scores = []
    for row, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        gold_norm = normalize_answer(gold) if gold is not None else ""
        if not gold_norm:
            raise ValueError(f"exact_answer: gold answer {gold!r:.60} at row {row} is empty")
        scores.append(1.0 if normalize_answer(_text(completion, "exact_answer", row)) == gold_norm else 0.0)
    return scores


# --------------------------------------------------------------------------- format


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def format_match(completions: Sequence[Any], format_regex: str | Sequence[str] | None = None,
                 **kwargs) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, matches ``format_regex`` in full
    (``re.fullmatch`` with ``re.DOTALL``: ``.`` also matches newlines), else 0.0.

    ``format_regex`` is one pattern for every row (bound with ``functools.partial`` or a spec's
    ``kwargs``), or a dataset column ``format_regex`` with one pattern per row; default
    :data:`FORMAT_REGEX` (``Answer: <integer>``). Inline flags work: ``(?i)answer: \\d+``.

    Raises:
        ValueError: an invalid pattern (names the row for a per-row column) or a column of another length.
    """
    n = len(completions)
    if format_regex is None:
        patterns = [FORMAT_REGEX] * n
    elif isinstance(format_regex, str):
        patterns = [format_regex] * n
    else:
        patterns = _column(format_regex, "format_regex", n, "format_match")
    scores = []
    for row, (completion, pattern) in enumerate(zip(completions, patterns, strict=True)):
        try:
            compiled = _compile(str(pattern))
        except re.error as e:
            raise ValueError(f"format_match: invalid format_regex {pattern!r:.60} at row {row}: {e}") from None
        text = _text(completion, "format_match", row).strip()
        scores.append(1.0 if compiled.fullmatch(text) else 0.0)
    return scores


# --------------------------------------------------------------------------- length


def soft_overlong_penalty(completions: Sequence[Any], max_length: int | None = None, cache_length: int | None = None,
                          unit: str = "chars", completion_ids: Sequence[Sequence[int]] | None = None,
                          **kwargs) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), for a length |y|:

    * 0 where |y| ≤ L_max − L_cache;
    * ((L_max − L_cache) − |y|) / L_cache where L_max − L_cache < |y| ≤ L_max (linear from 0 to −1);
    * −1 where |y| > L_max.

    It is added to the task reward (weight 1 in DAPO) so that responses near the limit lose a little,
    rather than all cut responses losing everything. Bind ``max_length`` and ``cache_length`` with a
    spec's ``kwargs`` (DAPO: 20480 and 4096 tokens). With generation capped at ``max_new_tokens`` and
    ``unit="tokens"``, ``max_length = max_new_tokens`` gives −1 to every response cut at the cap.

    Args:
        completions: N completions.
        max_length: L_max, in ``unit``s (> 0).
        cache_length: L_cache, the width of the penalty ramp, in ``unit``s (0 < L_cache ≤ L_max).
        unit: ``"chars"`` (|y| = characters of the completion text) or ``"tokens"`` (|y| =
            ``len(completion_ids[i])``: needs ``completion_ids``, which TRL and ``score_with_functions``
            pass when token ids are available; count them without padding, EOS included or not as
            generated).

    Returns:
        N floats in [−1, 0].

    Raises:
        ValueError: ``max_length``/``cache_length`` missing or out of range, an unknown ``unit``, or
            ``unit="tokens"`` without ``completion_ids`` of N rows.
    """
    if max_length is None or cache_length is None:
        raise ValueError("soft_overlong_penalty: bind max_length and cache_length (e.g. kwargs: {max_length: 24, "
                         "cache_length: 8, unit: tokens})")
    if not 0 < cache_length <= max_length:
        raise ValueError(f"soft_overlong_penalty: need 0 < cache_length <= max_length, got cache_length={cache_length}"
                         f", max_length={max_length}")
    n = len(completions)
    if unit == "chars":
        lengths = [len(_text(c, "soft_overlong_penalty", row)) for row, c in enumerate(completions)]
    elif unit == "tokens":
        ids = _column(completion_ids, "completion_ids", n, "soft_overlong_penalty")
        lengths = [len(row_ids) for row_ids in ids]
    else:
        raise ValueError(f"soft_overlong_penalty: unit must be 'chars' or 'tokens', got {unit!r}")
    start = max_length - cache_length
    return [0.0 if length <= start else -1.0 if length > max_length else (start - length) / cache_length
            for length in lengths]
