"""FSDP2 (torch's ``fully_shard``) applied to one network: one unit per decoder block, found from the model.

:func:`shard_model` is what every module's ``configure_model`` runs under
:class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy` (:func:`~rlhf_lightning.training.fsdp2.shard_networks`); the
blocks come from
the model itself (:func:`decoder_blocks`), so every decoder family is sharded the same way.

Units, and why: each block is one unit (its weights are gathered for its forward and freed after it). The rest
(embeddings, final norm, heads) must be gathered whenever the project calls into the network, and the project
calls a causal LM as a whole (``model(...)``: sampling, log-probabilities) but a scalar model in two pieces (its
backbone, then its head: :mod:`rlhf_lightning.models.forward`). FSDP2 gathers a unit's weights in the forward of
the module it was applied to, so a causal LM gets one root unit (embeddings, norm and ``lm_head``, which keeps
tied input and output embeddings one parameter), and a scalar model one unit for its backbone and one for its
head, each a root of its own.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rlhf_lightning.config.schema import FSDP2Settings

log = logging.getLogger(__name__)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of ``model``, found from the model: the outermost modules whose class is listed in
    the model's ``_no_split_modules`` (transformers' own list of the modules that must stay whole: the decoder
    layer of every family), else the children of its ``layers`` (or ``h``) ``ModuleList``
    (:func:`~rlhf_lightning.models.parts.decoder_layers`). A ``peft`` model is searched through to its base.

    Returns:
        The blocks in the order of ``model.modules()`` (bottom block first), at least one.

    Raises:
        ValueError: neither way finds a block (the message names the model's class).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if blocks:
        return blocks
    from rlhf_lightning.models.parts import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return list(decoder_layers(base))
    except (ValueError, AttributeError):
        raise ValueError(f"{type(model).__name__}: no decoder blocks to shard (no _no_split_modules class found and "
                         "no layers list)") from None


def is_sharded(model: nn.Module | None) -> bool:
    """Whether any module of ``model`` is an FSDP2 unit (``fully_shard`` was applied). ``None``: False."""
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def plain_class(model: nn.Module) -> type:
    """The transformers class of ``model`` as loaded. ``fully_shard`` gives a sharded module a class of its own
    (``FSDP<name>``, a subclass of :class:`~torch.distributed.fsdp.FSDPModule` and of the model's class), which
    ``save_pretrained`` would record in the config's ``architectures`` (where vLLM and pipelines look the class up).
    An unsharded model: its own class."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule) and cls.__mro__[1] is FSDPModule:
        return cls.__mro__[2]
    return cls


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def fsdp_kwargs(mesh, settings: FSDP2Settings) -> dict:
    """The keyword arguments of ``fully_shard`` for ``settings`` (:class:`~rlhf_lightning.config.schema.FSDP2Settings`):
    ``mesh`` (a 1-D ``DeviceMesh`` over the data-parallel ranks), ``reshard_after_forward``, ``mp_policy``
    (``MixedPrecisionPolicy(param_dtype, reduce_dtype)``) and ``offload_policy`` (``CPUOffloadPolicy`` with
    ``cpu_offload``, else none)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    return dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                mp_policy=MixedPrecisionPolicy(param_dtype=_dtype(settings.param_dtype),
                                               reduce_dtype=_dtype(settings.reduce_dtype)),
                offload_policy=CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy())


def shard_model(model: nn.Module, mesh, settings: FSDP2Settings | None = None) -> dict[str, int]:
    """Shard ``model``'s parameters over ``mesh`` with FSDP2, in place: one unit per decoder block
    (:func:`decoder_blocks`), then the rest as the project calls it (see the module docstring): a scalar model
    (one with a ``score``/``classifier``/``v_head`` linear head) as its backbone and its head, any other model as
    one root unit. Every parameter is then a ``DTensor`` sharded on dim 0 across the ranks (frozen ones too),
    and each rank holds 1/N of the weights between forwards. Idempotent: a sharded model is left as it is.

    Collective: call on every rank of ``mesh``, with the same model.

    Args:
        model: a transformers causal LM or sequence-classification model (or a ``peft`` model of one).
        mesh: 1-D ``DeviceMesh`` (the strategy's ``device_mesh["data_parallel"]``); its device type is where the
            shards live (with ``settings.cpu_offload``: CPU between uses).
        settings: :class:`~rlhf_lightning.config.schema.FSDP2Settings` (``None``: the defaults).

    Returns:
        ``{"blocks": number of block units, "units": all units}``.

    Raises:
        ValueError: no decoder block found (:func:`decoder_blocks`).
    """
    from torch.distributed.fsdp import fully_shard

    from rlhf_lightning.models.parts import SCALAR_HEAD_NAMES

    if is_sharded(model):
        return {"blocks": 0, "units": 0}
    kwargs = fsdp_kwargs(mesh, settings or FSDP2Settings())
    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = next((getattr(base, n) for n in SCALAR_HEAD_NAMES if isinstance(getattr(base, n, None), nn.Linear)), None)
    if head is not None:  # the project runs the backbone and the head one after the other
        fully_shard(getattr(base, base.base_model_prefix), **kwargs)
        fully_shard(head, **kwargs)
        units = len(blocks) + 2
    else:
        fully_shard(model, **kwargs)
        units = len(blocks) + 1
    _gather_once(model)
    return {"blocks": len(blocks), "units": units}


def _gather_once(model: nn.Module) -> None:
    """Gather and free every unit's weights once, outside inference mode (collective).

    FSDP2 creates a unit's gather buffers at its first gather and reuses them; made under ``torch.inference_mode``
    (the reward model's and the reference's forwards, Lightning's validation loop on NCCL) they would be
    inference tensors, which a later gather outside it (a training forward) may not write into. Gathering once
    here makes them ordinary tensors whatever runs first. The roots come first in ``model.modules()``, so each
    unit's first gather also settles which units are roots (the modules the forwards enter by).
    """
    from torch.distributed.fsdp import FSDPModule

    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()
