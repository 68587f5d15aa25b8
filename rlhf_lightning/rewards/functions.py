"""Reward functions for RL with verifiable rewards (RLVR): loading them from config specs and scoring
completions with their weighted sum.

A reward function has TRL's ``GRPOTrainer`` signature, so a function written for TRL works unchanged::

    def fn(completions: list[str], prompts: list[str] | None = None, **dataset_columns) -> list[float]

``completions`` are the N decoded responses (strings; with ``conversational=True`` each is
``[{"role": "assistant", "content": text}]``, as TRL passes them for conversational datasets),
``prompts`` the N prompts, and every other dataset column arrives as a keyword argument holding a
list of N values, one per completion (a column ``answer`` becomes ``answer=[...]``). When token ids
are given they arrive as ``completion_ids`` (N lists of int), as in TRL. A function without
``**kwargs`` receives only the arguments its signature names (so ``def f(completions, answer)``
works too); one that needs a column the batch lacks is an error before it is called.

Differences from TRL, on purpose:

* ``None`` in a function's output (TRL's "not applicable to this row", ignored by its nan-sum) is an
  error here: a reward is a number for every row, and a silent 0 or a silent skip would both change
  what is optimised. Return ``0.0`` (or use weight 0) explicitly.
* A function that raises, returns the wrong number of values, a non-number, NaN or inf stops
  scoring with one :class:`RewardFunctionError` line naming the function and the row.
* TRL's ``trainer_state`` keyword is not passed.

Config specs (:func:`load_reward_functions`), e.g. in YAML::

    reward_functions:
      - {fn: rlhf_lightning.rewards.verifiers.math_answer, weight: 1.0}
      - {fn: rlhf_lightning.rewards.verifiers.format_match, weight: 0.5, kwargs: {format_regex: '^Answer: \\d+$'}}

The ``fn`` string is imported with :mod:`importlib` (never instantiated by Hydra).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "RESERVED_COLUMNS",
    "RewardFunction",
    "RewardFunctionError",
    "RewardSpecError",
    "load_reward_functions",
    "score_with_functions",
]

#: Keyword names the scorer passes itself; a dataset column may not use them.
RESERVED_COLUMNS = ("completions", "prompts", "completion_ids", "prompt", "final_turns")


class RewardSpecError(ValueError):
    """A reward-function spec that cannot be loaded (bad keys, bad weight, import failure, duplicate name)."""


class RewardFunctionError(RuntimeError):
    """A reward function misbehaved on a batch.

    Attributes:
        function: the function's name (its ``per_function`` key).
        row: index of the offending completion in the batch (``None`` when no single row is at fault,
            e.g. a wrong output length).
    """

    def __init__(self, message: str, function: str, row: int | None = None):
        super().__init__(message)
        self.function = function
        self.row = row


@dataclass(frozen=True)
class RewardFunction:
    """A named, weighted reward function (what :func:`load_reward_functions` returns).

    Calling it calls ``fn`` with the same arguments. ``kwargs`` are already bound into ``fn``
    (a :func:`functools.partial`) and kept for display.

    Attributes:
        name: key in ``per_function`` and in logs (unique in a list).
        fn: the callable with TRL's signature.
        weight: multiplies its rewards in the total (any finite float; 0 keeps it for logging only).
        source: the spec's dotted path, or ``repr`` of a callable given directly.
    """

    name: str
    fn: Callable[..., Sequence[Any]]
    weight: float = 1.0
    source: str = ""
    kwargs: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------- loading


def import_dotted(path: str) -> Any:
    """The object at dotted ``path`` (``package.module.attr[.attr...]``): the longest importable module
    prefix, then attributes. Raises ImportError / AttributeError with the reason."""
    parts = path.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ImportError(f"{path!r} is not a dotted path 'module.function'")
    error: Exception | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this prefix does not exist" sends us to a shorter prefix; an import error
            # inside an existing module (a missing dependency) is the answer.
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                error = error or e
                continue
            raise
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise AttributeError(f"module {module_name!r} has no attribute {'.'.join(parts[cut:])!r}")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(str(error) if error else f"cannot import {path!r}")


def _spec_label(index: int, spec: Any) -> str:
    return f"reward_functions[{index}] {dict(spec) if isinstance(spec, Mapping) else spec!r}"


def _function_name(fn: Callable) -> str:
    base = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(base, "__name__", None) or type(base).__name__


def load_reward_functions(specs: Sequence[Mapping[str, Any]]) -> list[RewardFunction]:
    """Import and weight reward functions from config specs.

    Args:
        specs: a list of mappings (dicts or OmegaConf ``DictConfig``), each with
            ``fn`` (required): a dotted path ``"module.function"`` imported with :mod:`importlib`,
            or a callable; ``weight`` (default 1.0): a finite number; ``name`` (default: the last
            part of the dotted path, or a callable's ``__name__``): its key in the scores and logs, unique in the list;
            ``kwargs`` (default none): keyword arguments bound with :func:`functools.partial`
            (e.g. ``format_regex`` for :func:`rlhf_lightning.rewards.verifiers.format_match`).

    Returns:
        One :class:`RewardFunction` per spec, in order.

    Raises:
        RewardSpecError: one line ``reward_functions[i] {spec}: <problem>`` for an empty list, a spec
            that is not a mapping, an unknown key, a missing ``fn``, a failed import (the reason
            included), an object that is not callable, a non-finite or non-numeric weight, or a
            duplicate name.
    """
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        # OmegaConf ListConfig is a Sequence; a single mapping is a common slip.
        raise RewardSpecError(f"load_reward_functions: expected a list of specs, got {type(specs).__name__}")
    if not specs:
        raise RewardSpecError("load_reward_functions: no reward functions given (an empty list)")
    loaded: list[RewardFunction] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        label = _spec_label(i, spec)
        if not isinstance(spec, Mapping):
            raise RewardSpecError(f"{label}: expected a mapping with 'fn' and 'weight', got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"fn", "weight", "name", "kwargs"})
        if unknown:
            raise RewardSpecError(f"{label}: unknown key(s) {unknown}; allowed: fn, weight, name, kwargs")
        if "fn" not in spec or spec["fn"] in (None, ""):
            raise RewardSpecError(f"{label}: missing 'fn' (a dotted path 'module.function')")
        target = spec["fn"]
        if isinstance(target, str):
            try:
                fn = import_dotted(target)
            except (ImportError, AttributeError) as e:
                raise RewardSpecError(f"{label}: cannot import {target!r}: {_first_line(e)}") from e
            source = target
        else:
            fn, source = target, repr(target)
        if not callable(fn):
            raise RewardSpecError(f"{label}: {source} is a {type(fn).__name__}, not a callable")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
            raise RewardSpecError(f"{label}: weight must be a finite number, got {weight!r}")
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise RewardSpecError(f"{label}: kwargs must be a mapping, got {type(kwargs).__name__}")
        kwargs = {str(k): _plain(v) for k, v in kwargs.items()}
        bound = functools.partial(fn, **kwargs) if kwargs else fn
        try:
            _check_binds(fn, kwargs)
        except TypeError as e:
            raise RewardSpecError(f"{label}: {_first_line(e)}") from e
        name = str(spec.get("name") or (target.rsplit(".", 1)[-1] if isinstance(target, str) else _function_name(fn)))
        if name in seen:
            raise RewardSpecError(f"{label}: name {name!r} is already used by reward_functions[{seen[name]}]; "
                                  "give one of them a distinct 'name'")
        seen[name] = i
        loaded.append(RewardFunction(name=name, fn=bound, weight=float(weight), source=source, kwargs=kwargs))
    return loaded


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists/dicts (so bound kwargs are ordinary Python values)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_binds(fn: Callable, kwargs: Mapping[str, Any]) -> None:
    """TypeError when ``kwargs`` name parameters ``fn`` does not take (and it has no ``**kwargs``)."""
    params = _parameters(fn)
    if params is None or not kwargs:
        return
    named, var_kw = params
    if var_kw:
        return
    extra = sorted(set(kwargs) - set(named))
    if extra:
        raise TypeError(f"kwargs {extra} are not parameters of {_function_name(fn)} (it takes {sorted(named)})")


def _parameters(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """(keyword-passable parameters, has ``**kwargs``) of ``fn``; None when it has no inspectable signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    named = {n: p for n, p in sig.parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return named, var_kw


# --------------------------------------------------------------------------- scoring


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _row_label(row: int, row_ids: Sequence[Any] | None) -> str:
    return f"row {row}" if row_ids is None else f"row {row} ({row_ids[row]})"


def _select_kwargs(rf: RewardFunction, available: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments to call ``rf`` with: everything when it takes ``**kwargs`` (TRL style), else
    the ones its signature names. Raises RewardFunctionError for a required parameter that is missing, and
    for a column with the name of a keyword bound in the spec (which one wins would be a silent choice)."""
    bound = rf.fn.keywords if isinstance(rf.fn, functools.partial) else {}
    clash = sorted(set(bound) & set(available))
    if clash:
        raise RewardFunctionError(f"reward function {rf.name!r} has {clash} bound in its spec and the batch has "
                                  "columns of the same name; rename one of them", rf.name)
    params = _parameters(rf.fn)
    if params is None:
        return dict(available)
    named, var_kw = params
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in available]
    if missing:
        columns = sorted(k for k in available if k not in RESERVED_COLUMNS)
        raise RewardFunctionError(
            f"reward function {rf.name!r} needs {missing} but the batch has no such argument "
            f"(columns: {columns or 'none'}; bind constants with 'kwargs' in its spec)", rf.name)
    return dict(available) if var_kw else {k: v for k, v in available.items() if k in named}


def _slice_row(kwargs: dict[str, Any], row: int) -> dict[str, Any]:
    """``kwargs`` with every per-row list cut to the single row ``row``."""
    return {k: (v[row:row + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}


def _locate_failing_row(rf: RewardFunction, kwargs: dict[str, Any], n: int) -> int | None:
    """Call ``rf`` on one row at a time; the first row on which it raises, or None."""
    for row in range(n):
        try:
            rf.fn(**_slice_row(kwargs, row))
        except Exception:  # noqa: BLE001 - any failure locates the row
            return row
    return None


def _to_float(value: Any) -> float | None:
    """A reward value as a float, or None when it is not a real number (bool counts as 0/1)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _call(rf: RewardFunction, kwargs: dict[str, Any], n: int, row_ids: Sequence[Any] | None) -> list[float]:
    try:
        out = rf.fn(**kwargs)
    except RewardFunctionError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the function and the row
        row = _locate_failing_row(rf, kwargs, n) if n > 1 else 0
        where = (_row_label(row, row_ids) if row is not None
                 else f"the batch of {n} rows (no single row fails alone)")
        raise RewardFunctionError(f"reward function {rf.name!r} raised at {where}: {_first_line(e)}",
                                  rf.name, row) from e
    if isinstance(out, torch.Tensor):
        out = out.reshape(-1).tolist() if out.dim() <= 1 else out
    if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__") or not hasattr(out, "__getitem__"):
        raise RewardFunctionError(f"reward function {rf.name!r} returned a {type(out).__name__}, "
                                  f"expected a list of {n} numbers", rf.name)
    if len(out) != n:
        raise RewardFunctionError(f"reward function {rf.name!r} returned {len(out)} values for {n} completions",
                                  rf.name)
    values = []
    for row in range(n):
        value = out[row]
        if value is None:
            raise RewardFunctionError(
                f"reward function {rf.name!r} returned None at {_row_label(row, row_ids)} (None, TRL's 'not "
                "applicable', is not accepted: return a number, e.g. 0.0)", rf.name, row)
        number = _to_float(value)
        if number is None:
            raise RewardFunctionError(f"reward function {rf.name!r} returned a {type(value).__name__} "
                                      f"({value!r:.60}) at {_row_label(row, row_ids)}, not a number", rf.name, row)
        if not math.isfinite(number):
            raise RewardFunctionError(f"reward function {rf.name!r} returned {number} at "
                                      f"{_row_label(row, row_ids)}", rf.name, row)
        values.append(number)
    return values


def score_with_functions(functions: Sequence[RewardFunction], completions: Sequence[str],
                         prompts: Sequence[Any] | None = None, columns: Mapping[str, Sequence[Any]] | None = None,
                         *, completion_ids: Sequence[Sequence[int]] | None = None, conversational: bool = False,
                         row_ids: Sequence[Any] | None = None, final_turns: Sequence[str] | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score N completions with every reward function; the total is the weighted sum.

    Each function is called once on the whole batch, with keyword arguments only: ``completions``,
    ``prompts``, ``completion_ids`` (when given) and each column of ``columns`` (see the module
    docstring for what a function without ``**kwargs`` receives).

    Args:
        functions: from :func:`load_reward_functions` (plain callables are wrapped with weight 1).
        completions: N decoded responses (str).
        prompts: N prompts (str or chat messages), passed through as ``prompts``; ``None`` passes None.
        columns: the dataset's other columns for these N rows, name -> list of N values (a row's
            ``answer`` etc.). Must not use the names in :data:`RESERVED_COLUMNS` (the prompt goes in
            ``prompts``).
        completion_ids: N token-id lists of the completions (TRL's ``completion_ids``), optional.
        conversational: pass each completion as ``[{"role": "assistant", "content": text}]`` (TRL's
            conversational format) instead of a string.
        row_ids: N labels for error messages (e.g. dataset indices); default: the batch position.
        final_turns: multi-turn rollouts: the text of each trajectory's last policy turn, passed as ``final_turns``
            (``completions`` then holds the whole trajectory); ``None``: not passed.

    Returns:
        ``(total, per_function)``: ``total`` (N,) float32 = Σ_f weight_f · reward_f; ``per_function``
        maps each function's name to its unweighted rewards (N,) float32.

    Raises:
        RewardFunctionError: one line naming the function and, where one row is at fault, the row: it
            raised (the failing row is found by calling it again one row at a time), needs an
            argument the batch lacks, returned something that is not a list of N values, or a value
            that is None, not a real number, NaN or infinite.
        ValueError: no functions; duplicate names; a column, ``prompts``, ``completion_ids`` or
            ``row_ids`` whose length is not N; a reserved column name; a completion that is not a str.
    """
    if not functions:
        raise ValueError("score_with_functions: no reward functions")
    funcs = [f if isinstance(f, RewardFunction) else RewardFunction(_function_name(f), f, 1.0, repr(f))
             for f in functions]
    names = [f.name for f in funcs]
    if len(set(names)) != len(names):
        raise ValueError(f"score_with_functions: duplicate reward function names {names}")
    completions = list(completions)
    n = len(completions)
    for row, text in enumerate(completions):
        if not isinstance(text, str):
            raise ValueError(f"score_with_functions: completion at row {row} is a {type(text).__name__}, not a str")
    columns = dict(columns or {})
    for name in columns:
        if name in RESERVED_COLUMNS:
            raise ValueError(f"score_with_functions: column {name!r} is reserved ({', '.join(RESERVED_COLUMNS)}); "
                             "pass the prompt as prompts and token ids as completion_ids")
    checks = dict(columns, prompts=prompts, completion_ids=completion_ids, row_ids=row_ids, final_turns=final_turns)
    for name, values in checks.items():
        if values is not None and len(values) != n:
            raise ValueError(f"score_with_functions: {name!r} has {len(values)} values for {n} completions")
    available: dict[str, Any] = {
        "completions": [[{"role": "assistant", "content": c}] for c in completions] if conversational
        else completions,
        "prompts": list(prompts) if prompts is not None else None,
    }
    if completion_ids is not None:
        available["completion_ids"] = [list(ids) for ids in completion_ids]
    if final_turns is not None:
        available["final_turns"] = list(final_turns)
    available.update({k: list(v) for k, v in columns.items()})
    total = torch.zeros(n, dtype=torch.float64)
    per_function: dict[str, torch.Tensor] = {}
    for rf in funcs:
        rewards = torch.tensor(_call(rf, _select_kwargs(rf, available), n, row_ids), dtype=torch.float64)
        per_function[rf.name] = rewards.to(torch.float32)
        total += rf.weight * rewards
    return total.to(torch.float32), per_function

