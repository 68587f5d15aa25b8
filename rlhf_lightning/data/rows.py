"""Parsing and validating preference and prompt rows: hh dialogues, TRL standard and conversational rows.

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

Problems with single rows are reported as :class:`DataError` (a ``ValueError``) whose message names
the row (``file:line``), the key and what is wrong; ``.reason`` is a short code for counting.
Reading the rows from files or the Hub is :mod:`rlhf_lightning.data.sources`; turning them into
token ids is :mod:`rlhf_lightning.data.tokenization`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = ("user", "assistant", "system")

#: Every ``DataError.reason`` this package produces.
REASONS = ("missing_key", "bad_type", "empty", "identical", "bad_dialogue", "bad_json", "bad_utf8",
           "identical_after_truncation")

_TURN = re.compile(r"\n\n(Human|Assistant):")


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
                for who, content in zip(pieces[1::2], pieces[2::2], strict=True)]
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


#: Keys of a row that hold the prompt and responses; every other key is a dataset column.
PROMPT_ROW_KEYS = ("prompt", "chosen", "rejected")


def prompt_columns(row: dict) -> dict:
    """The dataset columns of a prompt row: every key but ``prompt``/``chosen``/``rejected`` (e.g. a
    verifiable task's ``answer``), passed to reward functions as keyword arguments, as TRL's
    ``GRPOTrainer`` passes its dataset's extra columns."""
    return {key: value for key, value in row.items() if key not in PROMPT_ROW_KEYS}

