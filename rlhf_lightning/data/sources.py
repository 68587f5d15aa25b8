"""Finding and reading data sources: local ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet`` files, a
directory of them, or a Hugging Face Hub dataset name (:func:`read_rows`), and loading their rows as
preference examples or prompts (:func:`load_examples`, :func:`load_prompts`).

A source that cannot be used as a whole (missing, refused, unreachable, without one usable row) is a
:class:`DataSourceError`; a single bad row is a :class:`~rlhf_lightning.data.rows.DataError`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from rlhf_lightning.config.paths import looks_like_local_path
from rlhf_lightning.data.rows import DataError, PreferenceExample, extract_prompt, normalize_row, prompt_columns

logger = logging.getLogger("rlhf_lightning.data")

DATA_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet")
#: Serialized-object files: unpickling can run arbitrary code, so they are never read as data.
PICKLE_EXTENSIONS = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".joblib")
_T = TypeVar("_T")


class DataSourceError(RuntimeError):
    """A data source that cannot be used as a whole; the message names it and says what to do.

    Raised for: a refused file type (pickle: ``.pkl``, ``.pt``, ...), an unreachable Hub dataset
    (offline), and, through the subclasses, a missing path (:class:`DataSourceNotFoundError`, also a
    ``FileNotFoundError``) and a source without one usable row (:class:`NoUsableRowError`, also a
    ``ValueError``). ``train.py`` prints the message as one line and exits with status 2.
    """


class DataSourceNotFoundError(DataSourceError, FileNotFoundError):
    """A local data path (or ``data_dir`` under it, or any data file in a directory) that does not exist."""


class NoUsableRowError(DataSourceError, ValueError):
    """Every row of the source was bad (skipped) or it has none."""



def _refuse_pickle(source: str) -> None:
    if source.lower().endswith(PICKLE_EXTENSIONS):
        raise DataSourceError(f"refusing data source {source}: pickle-based files ({', '.join(PICKLE_EXTENSIONS)}) "
                              "can run code when loaded; convert it to .jsonl or .parquet")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _is_data_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(DATA_EXTENSIONS)


def _files_of_dir(directory: Path, split: str) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if _is_data_file(p))
    if not files:
        raise DataSourceNotFoundError(f"no data files ({', '.join(DATA_EXTENSIONS)}) under directory {directory}")
    of_split = [p for p in files if p.name.lower().startswith(split.lower())]
    return of_split or files


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line", "bad_utf8", where)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "bad_json", where)
                continue
            if not isinstance(row, dict):
                yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "bad_type", where)
                continue
            yield where, row


def _read_json(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        where = f"{path}:{line}"
        yield where, DataError(f"{where}: invalid UTF-8 at byte {e.start} of the file", "bad_utf8", where)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}:{e.lineno}"
        yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "bad_json", where)
        return
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        n = len(next(iter(data.values())))  # column layout {"chosen": [...], "rejected": [...]}
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        where = f"{path}:1"
        yield where, DataError(f"{where}: expected a JSON list of row objects, got {type(data).__name__}",
                               "bad_type", where)
        return
    for i, row in enumerate(data, start=1):
        where = f"{path}:{i}"
        if not isinstance(row, dict):
            yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "bad_type", where)
        else:
            yield where, row


def _read_parquet(path: Path) -> Iterator[tuple[str, dict | Exception]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}:{index}", row


def _read_hub(source: str, split: str, data_dir: str | None) -> Iterator[tuple[str, dict | Exception]]:
    import datasets

    label = source + (f"/{data_dir}" if data_dir else "") + f"[{split}]"
    try:
        dataset = datasets.load_dataset(source, data_dir=data_dir, split=split)
    except Exception as e:  # noqa: BLE001 - any failure: offline, unknown name, bad split
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        hint = f"{' and '.join(offline)} set: only cached datasets load. " if offline else "Offline? "
        raise DataSourceError(
            f"could not load Hugging Face Hub dataset {label} ({type(e).__name__}: {_first_line(e)}). {hint}"
            "Pass a local path instead (a .jsonl/.jsonl.gz/.json/.parquet file or a directory of them, "
            "e.g. ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz)") from e
    for i, row in enumerate(dataset, start=1):
        yield f"{label}:{i}", dict(row)


def read_rows(source: str, split: str = "train", data_dir: str | None = None
              ) -> Iterator[tuple[str, dict | Exception]]:
    """Yield the raw rows of a local file/directory or a Hub dataset, with their locations.

    Local sources: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of objects, or an object of
    equal-length columns) and ``.parquet`` files, or a directory (``data_dir`` appended when given)
    searched recursively for them; in a directory only files whose names start with ``split``
    are read when there are such, else all. ``split`` is ignored for a single file. Anything else
    is a Hub dataset, loaded with ``datasets.load_dataset(source, data_dir=data_dir, split=split)``.

    Yields:
        ``(where, row)``: ``where`` is ``"path:N"`` (N = 1-based line for JSON lines, 1-based row
        number otherwise; ``"name/data_dir[split]:N"`` for the Hub); ``row`` is a dict, or a
        :class:`DataError` (reasons ``bad_json``, ``bad_utf8``, ``bad_type``) for a row that could
        not be read, so the caller decides between raising and skipping. Blank lines are ignored.

    Raises:
        DataSourceNotFoundError: a source that does not exist and is not a Hub dataset name
            (:func:`rlhf_lightning.config.paths.looks_like_local_path`, or it ends with a data extension), or a
            directory without data files.
        DataSourceError: a pickle-based source (``PICKLE_EXTENSIONS``, refused before anything is
            opened), a file of another unsupported type, or a Hub dataset that could not be loaded (one
            line, without the library's traceback; names ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
            when set and suggests a local path).
    """
    _refuse_pickle(source)
    path = Path(os.path.expanduser(source))
    if path.exists():
        if path.is_dir():
            if data_dir:
                path = path / data_dir
                if not path.is_dir():
                    raise DataSourceNotFoundError(f"data_dir {data_dir!r} not found under {source}")
            files = _files_of_dir(path, split)
        else:
            if not _is_data_file(path):
                raise DataSourceError(f"unsupported data file {source}: expected {', '.join(DATA_EXTENSIONS)}")
            files = [path]
        for file in files:
            name = file.name.lower()
            if name.endswith(".parquet"):
                yield from _read_parquet(file)
            elif name.endswith(".json"):
                yield from _read_json(file)
            else:
                yield from _read_jsonl(file)
        return
    if looks_like_local_path(source) or source.lower().endswith(DATA_EXTENSIONS):
        raise DataSourceNotFoundError(f"data source not found: {source} (resolved to {path.absolute()})")
    yield from _read_hub(source, split, data_dir)


def _collect(source: str, split: str, data_dir: str | None, on_error: str, limit: int | None,
             convert: Callable[[dict, str], _T]) -> tuple[list[_T], Counter]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    items: list[_T] = []
    skipped: Counter = Counter()
    first: dict[str, str] = {}
    for where, row in read_rows(source, split=split, data_dir=data_dir):
        try:
            if isinstance(row, Exception):
                raise row
            items.append(convert(row, where))
        except DataError as e:
            if on_error == "raise":
                raise
            skipped[e.reason] += 1
            first.setdefault(e.reason, str(e))
        if limit is not None and len(items) >= limit:
            break
    for reason, count in sorted(skipped.items()):
        logger.warning("skipped %d row(s) of %s: %s (first: %s)", count, source, reason, first[reason])
    if not items:
        raise NoUsableRowError(f"no usable row in data source {source}"
                         + (f" (skipped: {dict(skipped)})" if skipped else " (it is empty)"))
    return items, skipped


def load_examples(source: str, split: str = "train", data_dir: str | None = None, on_error: str = "raise",
                  limit: int | None = None) -> tuple[list[PreferenceExample], Counter]:
    """Read and normalize every preference row of a source (see :func:`read_rows`).

    Args:
        on_error: ``"raise"`` raises the first bad row's :class:`DataError`; ``"skip"`` skips bad
            rows, counts them per reason and logs one WARNING per reason (logger
            ``rlhf_lightning.data``) with the count and the first such error.
        limit: stop after this many usable examples (the first ones of the source).

    Returns:
        ``(examples, skipped)``: skipped is a ``Counter`` reason -> number of rows (empty when none).

    Raises:
        DataError: a bad row in raise mode (message: ``file:line``, key, problem).
        NoUsableRowError: no usable row at all (names the source; a ``ValueError``).
        ValueError: bad ``on_error``/``limit``.
        DataSourceError: see :func:`read_rows`.
    """
    return _collect(source, split, data_dir, on_error, limit, normalize_row)


def load_prompts(source: str, split: str = "train", data_dir: str | None = None, on_error: str = "raise",
                 limit: int | None = None) -> tuple[list[list[dict]], Counter]:
    """Like :func:`load_examples` but yields prompts (chat message lists, :func:`extract_prompt`).

    Returns:
        ``(prompts, skipped)``.

    Raises:
        Same as :func:`load_examples`.
    """
    rows, skipped = load_prompt_rows(source, split, data_dir, on_error, limit)
    return [messages for messages, _ in rows], skipped


def load_prompt_rows(source: str, split: str = "train", data_dir: str | None = None, on_error: str = "raise",
                     limit: int | None = None) -> tuple[list[tuple[list[dict], dict]], Counter]:
    """Like :func:`load_prompts`, with each prompt's other dataset columns (:func:`prompt_columns`).

    Returns:
        ``([(messages, columns), ...], skipped)``.

    Raises:
        Same as :func:`load_examples`.
    """
    return _collect(source, split, data_dir, on_error, limit,
                    lambda row, where: (extract_prompt(row, where), prompt_columns(row)))
