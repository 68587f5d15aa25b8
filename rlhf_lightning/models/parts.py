"""The parts of a transformers decoder that the builders, LoRA and the forwards reach into: its decoder blocks
(:func:`decoder_layers`), its scalar head (:func:`score_head`, :data:`SCALAR_HEAD_NAMES`), and the scalar
(sequence-classification) model around a backbone (:func:`scalar_model_config`, :func:`register_scalar_model`).

The reward model and the critic are ``AutoModelForSequenceClassification`` models with one label: a backbone and
a linear head applied at every position."""

from __future__ import annotations

from torch import nn

#: Attribute names of a scalar model's head (transformers' sequence classification models, TRL's value head).
SCALAR_HEAD_NAMES = ("score", "classifier", "v_head")


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


def scalar_model_config(config):
    """Make a transformers config one of a scalar model, in place, and return it: one label, and a padding id
    (the EOS id when the config has none and one EOS), which sequence classification needs to find the last token."""
    config.num_labels = 1
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    return config


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


def score_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence-classification model (``score`` or ``classifier``).

    Raises:
        ValueError: no such head.
    """
    for name in SCALAR_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__} has no scalar head named score/classifier/v_head")
