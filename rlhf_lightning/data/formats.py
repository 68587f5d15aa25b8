"""Reading preference / prompt data in its common layouts, and turning it into token ids.

Supported row layouts (each row is one JSON object / table row):

* **hh** (Anthropic HH-RLHF): ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``.
  Both sides are whole dialogues sharing everything up to the final ``"\\n\\nAssistant:"``.
* **TRL standard, explicit prompt**: ``{"prompt": str, "chosen": str, "rejected": str}``. The prompt
  may itself be an hh dialogue (parsed into turns) or plain text (one user message).
* **TRL conversational**: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``,
  where a message is ``{"role": "user"|"assistant"|"system", "content": str}``.
* **TRL conversational, implicit prompt**: ``{"chosen": [messages], "rejected": [messages]}``; the
  shared leading messages are the prompt.
* **prompt only** (for PPO prompts, :func:`extract_prompt`): ``{"prompt": str | [messages]}``.

Sources (:func:`read_rows`): local ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet`` files, a
directory of them, or a Hugging Face Hub dataset name.

Problems with single rows are reported as :class:`DataError` (a ``ValueError``) whose message names
the row (``file:line``), the key and what is wrong; ``.reason`` is a short code for counting.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

logger = logging.getLogger("rlhf_lightning.data")

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = ("user", "assistant", "system")
DATA_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet")
#: Serialized-object files: unpickling can run arbitrary code, so they are never read as data.
PICKLE_EXTENSIONS = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".joblib")

#: Every ``DataError.reason`` this package produces.
REASONS = ("missing_key", "bad_type", "empty", "identical", "bad_dialogue", "bad_json", "bad_utf8",
           "identical_after_truncation")

_TURN = re.compile(r"\n\n(Human|Assistant):")
_T = TypeVar("_T")


class DataError(ValueError):
    """A single row that cannot be used.

    Attributes:
        reason: short code for counting skipped rows, one of :data:`REASONS`.
        where: the row's location, ``"path:line"`` (``None`` when unknown).
        key: the offending key of the row (``None`` when the whole row is at fault).
    """

    def __init__(self, message: str, reason: str, where: str | None = None, key: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.where = where
        self.key = key


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


def _fail(where: str | None, key: str | None, reason: str, problem: str) -> DataError:
    parts = [where or "<row>"]
    if key is not None:
        parts.append(f"key {key!r}")
    return DataError(": ".join(parts) + f": {problem}", reason, where, key)


@dataclass
class PreferenceExample:
    """One preference pair.

    Attributes:
        prompt: the conversation so far, chat messages ``[{"role": ..., "content": ...}]`` with
            roles in ``("user", "assistant", "system")``; the response to it is the next assistant turn.
        chosen: text of the preferred final assistant response (stripped; may be ``""`` where the
            data rates an empty answer, as a few hh rows do).
        rejected: text of the other response; never equal to ``chosen``.
        where: the source row, ``"path:line"``.
    """

    prompt: list[dict]
    chosen: str
    rejected: str
    where: str


# --------------------------------------------------------------------------- parsing rows


def parse_hh_dialogue(text: str) -> list[dict]:
    """Split an hh-style dialogue into chat messages.

    ``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"}]``. Contents are stripped. A trailing empty
    ``"Assistant:"`` turn (the cue for the next response) is dropped, so a prompt ending in
    ``"\\n\\nAssistant:"`` parses to the messages before it. The leading ``"\\n\\n"`` is optional.

    Raises:
        ValueError: ``text`` is not a string, has no ``Human:``/``Assistant:`` turn, or has text
            before its first turn.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an hh dialogue string, got {type(text).__name__}")
    body = text
    if body.lstrip(" \n").startswith(("Human:", "Assistant:")):
        body = "\n\n" + body.lstrip(" \n")
    pieces = _TURN.split(body)
    if len(pieces) < 3:
        raise ValueError(f"no '\\n\\nHuman:' / '\\n\\nAssistant:' turns in dialogue {_preview(text)}")
    if pieces[0].strip():
        raise ValueError(f"text before the first Human:/Assistant: turn in dialogue {_preview(text)}")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": content.strip()}
                for who, content in zip(pieces[1::2], pieces[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages:
        raise ValueError(f"dialogue has no content: {_preview(text)}")
    return messages


def _preview(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _is_hh_dialogue(text: str) -> bool:
    head = text.lstrip(" \n")
    return head.startswith(("Human:", "Assistant:")) and "\n\nAssistant:" in text


def _require(row: dict, key: str, where: str) -> Any:
    if key not in row:
        present = ", ".join(repr(k) for k in row) or "none"
        raise _fail(where, key, "missing_key", f"missing key {key!r} (keys present: {present})")
    return row[key]


def _require_str(row: dict, key: str, where: str) -> str:
    value = _require(row, key, where)
    if not isinstance(value, str):
        raise _fail(where, key, "bad_type", f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, key, "empty", "empty string")
    return value


def _check_messages(value: Any, key: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise _fail(where, key, "bad_type", f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _fail(where, key, "empty", "empty message list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _fail(where, key, "bad_type",
                        f"message {i} must be a dict with 'role' and 'content', got {_preview(str(msg))}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise _fail(where, key, "bad_type", f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise _fail(where, key, "bad_type",
                        f"message {i} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _hh_prompt_end(chosen: str, rejected: str | None) -> int:
    """Length of the shared prompt (through the last shared ``"\\n\\nAssistant:"``), or -1."""
    end = chosen.rfind(ASSISTANT)
    if end < 0:
        return -1
    end += len(ASSISTANT)
    if rejected is None or rejected[:end] == chosen[:end] and rejected.rfind(ASSISTANT) + len(ASSISTANT) == end:
        return end
    # The final turns differ in where they start (the sides diverge earlier): shared prefix instead.
    common = os.path.commonprefix([chosen, rejected])
    end = common.rfind(ASSISTANT)
    return end + len(ASSISTANT) if end >= 0 else -1


def _parse_prompt_text(text: str, key: str, where: str) -> list[dict]:
    if _is_hh_dialogue(text):
        try:
            return parse_hh_dialogue(text)
        except ValueError as e:
            raise _fail(where, key, "bad_dialogue", f"unparseable dialogue: {e}") from None
    return [{"role": "user", "content": text.strip()}]


def _split_conversation(prompt: list[dict], chosen: list[dict], rejected: list[dict],
                        where: str) -> tuple[list[dict], str, str]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = prompt + chosen[:shared]
    if not prompt:
        raise _fail(where, "chosen", "bad_dialogue", "chosen and rejected share no prompt messages")
    texts = []
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        rest = msgs[shared:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = [m["role"] for m in rest]
            raise _fail(where, key, "bad_dialogue",
                        f"expected exactly one assistant message after the prompt, got roles {roles}")
        texts.append(rest[0]["content"].strip())
    return prompt, texts[0], texts[1]


def normalize_row(row: dict, where: str) -> PreferenceExample:
    """Turn one preference row, in any supported layout (module docstring), into a :class:`PreferenceExample`.

    Responses are stripped of surrounding whitespace. For hh rows the prompt is the dialogue
    through the last ``"\\n\\nAssistant:"`` the two sides share, the responses what follows.

    Raises:
        DataError: with ``where``, the key and the problem in its message: a missing key (the
            keys present are listed; reason ``missing_key``), a value of the wrong type
            (``bad_type``), an empty string or message list (``empty``), an unparseable dialogue
            (``bad_dialogue``), or chosen == rejected (``identical``).
    """
    if not isinstance(row, dict):
        raise _fail(where, None, "bad_type", f"expected a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        prompt_value = row["prompt"]
        chosen_value = _require(row, "chosen", where)
        _require(row, "rejected", where)
        if isinstance(prompt_value, list) or isinstance(chosen_value, list):
            prompt = _check_messages(prompt_value, "prompt", where)
            chosen_msgs = _check_messages(row["chosen"], "chosen", where)
            rejected_msgs = _check_messages(row["rejected"], "rejected", where)
            prompt, chosen, rejected = _split_conversation(prompt, chosen_msgs, rejected_msgs, where)
        else:
            prompt_text = _require_str(row, "prompt", where)
            chosen = _require_str(row, "chosen", where).strip()
            rejected = _require_str(row, "rejected", where).strip()
            prompt = _parse_prompt_text(prompt_text, "prompt", where)
    else:
        chosen_value = _require(row, "chosen", where)
        _require(row, "rejected", where)
        if isinstance(chosen_value, list):
            chosen_msgs = _check_messages(chosen_value, "chosen", where)
            rejected_msgs = _check_messages(row["rejected"], "rejected", where)
            prompt, chosen, rejected = _split_conversation([], chosen_msgs, rejected_msgs, where)
        else:
            chosen_text = _require_str(row, "chosen", where)
            rejected_text = _require_str(row, "rejected", where)
            if chosen_text == rejected_text:
                raise _fail(where, "chosen", "identical", "chosen and rejected are identical")
            end = _hh_prompt_end(chosen_text, rejected_text)
            if end < 0:
                key = "chosen" if ASSISTANT not in chosen_text else "rejected"
                raise _fail(where, key, "bad_dialogue",
                            "no shared dialogue ending in '\\n\\nAssistant:' (expected hh format "
                            f"'\\n\\nHuman: ...\\n\\nAssistant: ...'), got {_preview(row[key])}")
            try:
                prompt = parse_hh_dialogue(chosen_text[:end])
            except ValueError as e:
                raise _fail(where, "chosen", "bad_dialogue", f"unparseable dialogue: {e}") from None
            chosen, rejected = chosen_text[end:].strip(), rejected_text[end:].strip()
    if chosen == rejected:
        raise _fail(where, "chosen", "identical", "chosen and rejected responses are identical")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, where=where)


def extract_prompt(row: dict, where: str) -> list[dict]:
    """The prompt of a row as chat messages, for generation (PPO).

    Accepts every layout of :func:`normalize_row` plus prompt-only rows (``{"prompt": str |
    [messages]}``). hh rows give the dialogue through the last ``"\\n\\nAssistant:"`` (shared by
    chosen and rejected where both exist); implicit-prompt conversational rows give the shared
    leading messages (everything but the last message when only ``chosen`` is present).
    chosen/rejected need not differ here.

    Raises:
        DataError: missing ``prompt``/``chosen`` (``missing_key``), wrong type (``bad_type``),
            empty (``empty``) or unparseable dialogue (``bad_dialogue``); message names where and key.
    """
    if not isinstance(row, dict):
        raise _fail(where, None, "bad_type", f"expected a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        if isinstance(row["prompt"], list):
            return _check_messages(row["prompt"], "prompt", where)
        return _parse_prompt_text(_require_str(row, "prompt", where), "prompt", where)
    if "chosen" not in row:
        present = ", ".join(repr(k) for k in row) or "none"
        raise _fail(where, "prompt", "missing_key",
                    f"missing key 'prompt' (or hh 'chosen'); keys present: {present}")
    if isinstance(row["chosen"], list):
        chosen = _check_messages(row["chosen"], "chosen", where)
        if "rejected" in row:
            rejected = _check_messages(row["rejected"], "rejected", where)
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt = chosen[:shared]
        else:
            prompt = chosen[:-1]
        if not prompt:
            raise _fail(where, "chosen", "bad_dialogue", "no prompt messages before the response")
        return prompt
    chosen_text = _require_str(row, "chosen", where)
    rejected_text = row.get("rejected")
    if rejected_text is not None and not isinstance(rejected_text, str):
        raise _fail(where, "rejected", "bad_type", f"expected a string, got {type(rejected_text).__name__}")
    end = _hh_prompt_end(chosen_text, rejected_text or None)
    if end < 0:
        raise _fail(where, "chosen", "bad_dialogue",
                    f"no dialogue ending in '\\n\\nAssistant:' (expected hh format), got {_preview(chosen_text)}")
    try:
        return parse_hh_dialogue(chosen_text[:end])
    except ValueError as e:
        raise _fail(where, "chosen", "bad_dialogue", f"unparseable dialogue: {e}") from None


# --------------------------------------------------------------------------- reading sources


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith(DATA_EXTENSIONS)


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
        DataSourceNotFoundError: a local-looking source (starts with ``.``, ``/``, ``~`` or ends with a
            data extension) that does not exist, or a directory without data files.
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
    if _looks_local(source):
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
    return _collect(source, split, data_dir, on_error, limit, extract_prompt)


# --------------------------------------------------------------------------- tokens


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def hh_text(messages: list[dict]) -> str:
    """Render chat messages as hh text ending with the generation cue ``"\\n\\nAssistant:"``.

    System messages come first as plain text. ``[{"role": "user", "content": "hi"}]`` ->
    ``"\\n\\nHuman: hi\\n\\nAssistant:"``.
    """
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = "".join(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}"
                    for m in messages if m["role"] != "system")
    return system + turns + ASSISTANT


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = _ids(tokenizer("a", add_special_tokens=True))
    return bool(probe) and probe[0] == bos


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt, ready for the response to follow.

    With a chat template: the template rendered with ``add_generation_prompt=True`` (ends with
    the assistant header; the template's own default system message, if any, is included), then
    tokenized without adding special tokens (the template already holds them). Without one: the
    hh text of :func:`hh_text` (ends with ``"\\n\\nAssistant:"``), with BOS in front where the
    tokenizer adds one by default.

    Returns:
        list of int token ids.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _ids(tokenizer(text, add_special_tokens=False))
    ids = _ids(tokenizer(hh_text(messages), add_special_tokens=False))
    return [tokenizer.bos_token_id] + ids if _adds_bos(tokenizer) else ids


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response: its tokens (no BOS, no special tokens) followed by the EOS id.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one")
    return _ids(tokenizer(text, add_special_tokens=False)) + [int(eos)] if text else [int(eos)]


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int,
                  min_prompt_tokens: int = 8) -> tuple[list[int], list[int], list[int], bool]:
    """Fit prompt+chosen and prompt+rejected into ``max_length`` tokens each.

    The responses are kept whole when possible (they carry the preference); the prompt is cut
    from the LEFT (its end, next to the response, stays). When the longer response alone leaves
    fewer than ``min_prompt_tokens`` for the prompt (or the whole prompt if shorter), both
    responses are cut from the RIGHT to ``max_length - min_prompt_tokens`` tokens (the EOS is then lost).

    Returns:
        ``(prompt_ids, chosen_ids, rejected_ids, truncated)``; ``truncated`` is True when anything was cut.

    Raises:
        DataError: reason ``identical_after_truncation`` when the cut responses are equal.
        ValueError: ``max_length <= min_prompt_tokens`` or ``min_prompt_tokens < 1``.
    """
    if min_prompt_tokens < 1 or max_length <= min_prompt_tokens:
        raise ValueError(f"need max_length > min_prompt_tokens >= 1, got {max_length} and {min_prompt_tokens}")
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    reserve = min(len(prompt), min_prompt_tokens)
    room = max_length - reserve
    if longest > room:
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            raise DataError(f"chosen and rejected are identical after truncation to {room} tokens "
                            f"(max_length={max_length})", "identical_after_truncation")
    budget = max_length - max(len(chosen), len(rejected))
    prompt = prompt[len(prompt) - budget:] if budget < len(prompt) else prompt
    return prompt, chosen, rejected, True
