"""Networks of RLHF (policy, reference, reward model, critic), where they come from, and their forwards."""

from rlhf_lightning.models.builders import (
    disable_dropout,
    freeze,
    load_critic,
    load_policy,
    load_reference,
    load_reward_model,
    load_scalar_model,
    load_tokenizer,
    train_top_layers,
)
from rlhf_lightning.models.loading import SMOLLM2, SMOLLM2_GGUF, TINY, cache_root, convert_gguf, resolve_pretrained
from rlhf_lightning.models.lora import adapters_disabled, apply_lora, has_lora, merged_named_weights
from rlhf_lightning.models.parts import score_head

__all__ = [
    "SMOLLM2", "SMOLLM2_GGUF", "TINY", "adapters_disabled", "apply_lora", "cache_root", "convert_gguf",
    "disable_dropout", "freeze", "has_lora", "load_critic", "merged_named_weights",
    "load_policy", "load_reference", "load_reward_model", "load_scalar_model", "load_tokenizer", "resolve_pretrained",
    "score_head", "train_top_layers",
]
