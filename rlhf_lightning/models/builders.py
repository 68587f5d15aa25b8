"""Builders for the four networks of RLHF: policy, frozen reference, reward model and critic.

The reward model and the critic are both ``AutoModelForSequenceClassification`` with one label:
a backbone plus a linear ``score`` head applied to every position. The reward model reads the
head at the last non-padding token (one score per sequence); the critic reads it at every
response token (V(s_t)). Saved with ``save_pretrained``, either reloads with
``AutoModelForSequenceClassification.from_pretrained(path)`` and returns the reward as its
single output.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from rlhf_lightning.models.loading import fix_pad_token, resolve_pretrained

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer of a model source (see :func:`resolve_pretrained`).

    Padding is on the left (prompts are left-padded for generation; the collators place
    responses explicitly). A padding token distinct from EOS is chosen where the vocabulary has one.

    Raises:
        FileNotFoundError: the source does not exist.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path, gguf_file),
                                              trust_remote_code=trust_remote_code)
    fix_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def _is_dropout_rate(name: str, value: object) -> bool:
    return isinstance(value, float) and ("dropout" in name.lower() or name.lower().endswith("pdrop"))


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch every dropout of ``model`` off, in place (RLHF needs deterministic log-probabilities and values).

    Three places hold a rate, and each is set to 0: the ``p`` of every ``torch.nn`` dropout module;
    every float attribute of a submodule whose name contains ``dropout`` or ends in ``pdrop``
    (attention layers copy ``config.attention_dropout`` when built, e.g. ``LlamaAttention.attention_dropout``,
    and pass it to the attention function in train mode); and the same fields of the model's config and
    its sub-configs (so a saved or copied model keeps them off). Editing only the config after the
    model is built leaves the copies on.

    Returns:
        The model.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    configs = [getattr(model, "config", None)]
    while configs:
        config = configs.pop()
        if config is None:
            continue
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                setattr(config, name, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
                configs.append(value)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a model in place: no parameter requires a gradient, eval mode. Returns the model."""
    model.requires_grad_(False)
    model.eval()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a decoder-only model (``model.model.layers`` for Llama).

    Raises:
        ValueError: no ``layers`` list is found.
    """
    backbone = getattr(model, model.base_model_prefix, model)
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers to freeze")
    return layers


def train_top_layers(model: nn.Module, trainable_layers: int | None) -> nn.Module:
    """Train only the top ``trainable_layers`` blocks plus the final norm and heads.

    The embeddings and the lower blocks are frozen, so backward stops at the first trainable
    block (a cheaper step on CPU). ``None`` trains everything. With tied input/output
    embeddings the language-model head is frozen with the embeddings.

    Raises:
        ValueError: ``trainable_layers`` is negative.
    """
    if trainable_layers is None:
        return model
    if trainable_layers < 0:
        raise ValueError(f"trainable_layers={trainable_layers} must be >= 0 or null")
    layers = decoder_layers(model)
    model.get_input_embeddings().requires_grad_(False)
    for block in list(layers)[: max(len(layers) - trainable_layers, 0)]:
        block.requires_grad_(False)
    return model


def _finish(model: nn.Module, trainable_layers: int | None, gradient_checkpointing: bool,
            lora: dict | None = None, head: nn.Module | None = None) -> nn.Module:
    from rlhf_lightning.models.lora import apply_lora, lora_settings

    settings = lora_settings(lora)
    if settings is not None and trainable_layers is not None:
        raise ValueError("model.trainable_layers and model.lora.r are exclusive: with LoRA, "
                         "model.lora.layers limits the adapters to the top blocks")
    model.train()  # from_pretrained returns eval mode; dropout is off either way
    disable_dropout(model)
    train_top_layers(model, trainable_layers)
    if settings is not None:  # after disable_dropout: the adapters' dropout is model.lora.dropout
        apply_lora(model, settings, head=head)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_policy(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                trainable_layers: int | None = None, gradient_checkpointing: bool = False,
                trust_remote_code: bool = False, lora: dict | None = None, **_: object) -> nn.Module:
    """A causal LM to train as the policy (``AutoModelForCausalLM``), dropout off.

    Args:
        name_or_path, gguf_file: the source (see :func:`resolve_pretrained`).
        dtype: parameter dtype name (``float32``, ``bfloat16``, ``float16``).
        trainable_layers: train only the top N decoder blocks (``None``: all).
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: ``model.lora`` (:class:`~rlhf_lightning.schema.LoRASettings` or dict; ``None`` or ``r`` null:
            off): train LoRA adapters only (:func:`~rlhf_lightning.models.lora.apply_lora`).

    Raises:
        FileNotFoundError: the source does not exist. ValueError: unknown dtype; ``trainable_layers`` with
        LoRA; a bad ``lora`` setting.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path, gguf_file), dtype=_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return _finish(model, trainable_layers, gradient_checkpointing, lora)


def load_reference(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                   trust_remote_code: bool = False, lora: dict | None = None, **_: object) -> nn.Module | None:
    """The frozen reference policy for the KL penalty: a causal LM, eval mode, no gradients.

    Args:
        lora: PPO's ``model.lora``: when on (``r`` set), the policy is a LoRA model whose adapters switched
            off are the reference, so none is loaded and ``None`` is returned (the value stage's rollout
            policy passes none).
    """
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.models.lora import lora_settings

    if lora_settings(lora) is not None:
        log.info("reference: the LoRA policy with its adapters off (no copy loaded)")
        return None

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path, gguf_file), dtype=_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return freeze(disable_dropout(model))


def load_scalar_model(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                      trainable_layers: int | None = None, gradient_checkpointing: bool = False,
                      frozen: bool = False, trust_remote_code: bool = False, seed: int = 0,
                      head: str = "keep", lora: dict | None = None, **_: object) -> nn.Module:
    """A backbone with a scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``).

    Used as reward model (head read at the last token) and as critic (head read at every
    token). A head created here (from a plain causal-LM checkpoint) is initialised with
    N(0, 1/(hidden+1)) (Huang et al. 2024, N+ implementation details, detail 3), seeded by
    ``seed``; a head found in the checkpoint (a saved reward model or critic) is kept, unless
    ``head`` says otherwise.

    Args:
        head: ``keep`` (the checkpoint's head, else a new normal one), ``normal`` (always a new
            N(0, 1/(hidden+1)) head) or ``zero`` (weights and bias 0: the model outputs 0
            everywhere until it learns). A critic started from a reward model keeps its backbone
            either way; ``zero`` drops the reward model's head, whose readings at tokens other than
            the last are noise to a critic (PPO's ``critic_head``).
        lora: ``model.lora`` (``None`` or ``r`` null: off): train LoRA adapters and the head only
            (:func:`~rlhf_lightning.models.lora.apply_lora`); ignored with ``frozen``.

    Raises:
        FileNotFoundError: the source does not exist. ValueError: unknown dtype or ``head``.
    """
    if head not in ("keep", "normal", "zero"):
        raise ValueError(f"head={head!r}: expected keep, normal or zero")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_pretrained(name_or_path, gguf_file)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    config.num_labels = 1
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    register_scalar_model(type(config))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=_dtype(dtype),
                                                                   trust_remote_code=trust_remote_code)
        if head == "zero":
            nn.init.zeros_(score_head(model).weight)
        elif head == "normal" or not has_head:
            torch.manual_seed(seed)  # the same head for a seed, whatever loading drew before
            nn.init.normal_(score_head(model).weight, std=1.0 / math.sqrt(config.hidden_size + 1))
        if (head != "keep" or not has_head) and score_head(model).bias is not None:
            nn.init.zeros_(score_head(model).bias)
    if frozen:
        return freeze(_finish(model, trainable_layers, gradient_checkpointing))
    return _finish(model, trainable_layers, gradient_checkpointing, lora, head=score_head(model))


def register_scalar_model(config_class: type) -> type:
    """The ``AutoModelForSequenceClassification`` class for a config class, registered if transformers has none.

    Families such as Granite have a causal LM but no sequence-classification class. For them a class
    ``<Family>ForSequenceClassification`` is made from transformers' own
    ``GenericForSequenceClassification`` (the backbone as ``model`` plus a bias-free linear ``score``
    head, as Llama's) on the family's ``PreTrainedModel``, and registered with
    ``AutoModelForSequenceClassification``. Its exports name that class in ``config.json``
    (``architectures``) and reload with ``rlhf_lightning.models.load_scalar_model(path)`` (which
    registers it first; ``AutoModelForSequenceClassification.from_pretrained(path)`` works in a process
    that has called this function for the config class).

    Args:
        config_class: a transformers ``PretrainedConfig`` subclass (e.g. ``GraniteConfig``).

    Returns:
        The model class ``AutoModelForSequenceClassification`` uses for it.

    Raises:
        ValueError: transformers has no base model for the config either (nothing to put a head on).
    """
    from transformers import AutoModelForSequenceClassification, PreTrainedModel
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING

    if config_class in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[config_class]
    if config_class not in MODEL_MAPPING:
        raise ValueError(f"{config_class.__name__}: transformers has no base model to put a scalar head on")
    base = MODEL_MAPPING[config_class]  # e.g. GraniteModel
    pretrained = next(c for c in base.__mro__[1:] if issubclass(c, PreTrainedModel) and c is not PreTrainedModel)
    name = base.__name__.removesuffix("Model") + "ForSequenceClassification"
    cls = type(name, (GenericForSequenceClassification, pretrained), {"__module__": __name__})
    AutoModelForSequenceClassification.register(config_class, cls, exist_ok=True)
    globals()[name] = cls  # findable by its qualified name (pickling)
    return cls


def load_critic(adv_estimator: str, **kwargs) -> nn.Module | None:
    """The critic of an RLHF stage: :func:`load_scalar_model` with ``kwargs`` when ``adv_estimator`` uses one
    (:data:`rlhf_lightning.losses.CRITIC_ESTIMATORS`), else ``None`` (critic-free estimators load none).

    Raises:
        As :func:`load_scalar_model`.
    """
    from rlhf_lightning.losses import CRITIC_ESTIMATORS

    return load_scalar_model(**kwargs) if adv_estimator in CRITIC_ESTIMATORS else None


def load_reward_model(name_or_path: str | None, **kwargs) -> nn.Module | None:
    """The frozen reward model: :func:`load_scalar_model` (``frozen=True`` unless given) from ``name_or_path``,
    or ``None`` when it is null (PPO's reward then comes from reward functions alone).

    Raises:
        As :func:`load_scalar_model`.
    """
    if name_or_path is None:
        return None
    return load_scalar_model(name_or_path, **{"frozen": True, **kwargs})


def score_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence-classification model (``score`` or ``classifier``).

    Raises:
        ValueError: no such head.
    """
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__} has no scalar head named score/classifier/v_head")
