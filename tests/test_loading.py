"""Public helpers of rlhf_lightning.models.loading used across modules: gguf_cache_dir and fix_pad_token."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from rlhf_lightning.models.loading import (
    SMOLLM2,
    SMOLLM2_GGUF,
    fix_pad_token,
    gguf_cache_dir,
    gguf_tokenizer_dir,
    package_dir,
)


def test_gguf_cache_dir_names(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    full, tok = gguf_cache_dir(gguf), gguf_cache_dir(str(gguf), tokenizer_only=True)
    assert full.parent == tmp_path / "cache" and full.name.startswith("Model.Q4-") and len(full.name) == 21
    assert tok == full.with_name(full.name + "-tokenizer")
    assert gguf_cache_dir(gguf) == full  # the same file: the same directory
    os.utime(gguf, ns=(0, 10**9))
    assert gguf_cache_dir(gguf) != full  # a changed file is converted again
    with pytest.raises(FileNotFoundError):
        gguf_cache_dir(tmp_path / "missing.gguf")


def test_gguf_tokenizer_dir_is_gguf_cache_dir():
    """validate.py finds the cached tokenizer through gguf_cache_dir: it must be where loading puts it."""
    gguf = package_dir(SMOLLM2) / SMOLLM2_GGUF
    assert gguf_tokenizer_dir(package_dir(SMOLLM2), SMOLLM2_GGUF) == gguf_cache_dir(gguf, tokenizer_only=True)


def _tok(pad, unk, eos=2):
    ids = {"<pad>": 0, "<unk>": 1, "<eos>": eos}
    tok = SimpleNamespace(pad_token=pad, unk_token=unk, eos_token="<eos>")
    tok.pad_token_id = ids.get(pad)
    tok.unk_token_id = ids.get(unk)
    tok.eos_token_id = eos
    return tok


@pytest.mark.parametrize("pad, unk, expected", [
    (None, "<unk>", "<unk>"),     # no pad: UNK pads
    ("<eos>", "<unk>", "<unk>"),  # pad == EOS (SmolLM2): UNK pads instead
    ("<eos>", None, "<eos>"),     # no UNK: EOS stays
    (None, None, "<eos>"),        # nothing else: EOS pads
    ("<pad>", "<unk>", "<pad>"),  # a pad of its own is kept
])
def test_fix_pad_token(pad, unk, expected):
    tok = _tok(pad, unk)
    fix_pad_token(tok)
    assert tok.pad_token == expected


def test_fix_pad_token_keeps_eos_when_unk_is_eos():
    tok = _tok("<eos>", "<unk>", eos=1)  # UNK and EOS are one token: nothing distinct to pad with
    fix_pad_token(tok)
    assert tok.pad_token == "<eos>"
