"""Turning rows into token ids: the chat template (or hh text without one), responses ending with EOS,
and truncation of a preference pair to a maximum length."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.data.rows import ASSISTANT, HUMAN, DataError


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


class PaddingCollator:
    """Base of the collators: pads token-id lists into one batch.

    Args:
        pad_token_id: the tokenizer's padding id.

    Raises:
        ValueError: ``pad_token_id`` is None (the message names the collator).
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError(f"{type(self).__name__} needs a pad_token_id")
        self.pad_token_id = int(pad_token_id)

    def pad(self, sequences: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` (N, L) long padded with ``pad_token_id`` on ``side`` (``"left"`` or ``"right"``) and
        ``attention_mask`` (N, L) long (1 on real tokens), L the longest sequence.

        Raises:
            ValueError: no sequence (an empty batch).
        """
        if not sequences:
            raise ValueError("cannot collate an empty batch")
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            cols = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, cols] = 1
        return input_ids, attention_mask

