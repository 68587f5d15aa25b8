"""Pieces shared by the LightningModules: optimizers and schedules, model export, the shared trunk, reductions over
ranks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.algorithms.ops import BatchCounts
from rlhf_lightning.algorithms.schedules import lr_multiplier
from rlhf_lightning.config.schema import OptimConfig

log = logging.getLogger(__name__)


def sum_over_ranks(module):
    """A function summing a tensor over the ranks of ``module``'s trainer (``strategy.reduce``, a collective),
    or ``None`` in one process (or without a trainer)."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return None
    strategy = trainer.strategy
    return lambda tensor: strategy.reduce(tensor, reduce_op="sum")


def gather_rows(module):
    """A function concatenating a ``(B,)`` tensor of every rank of ``module``'s trainer (``all_gather``, a
    collective; every rank must hold B rows), or ``None`` in one process (or without a trainer)."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return None
    return lambda rows: module.all_gather(rows).reshape(-1)


def batch_counts(module, mask: torch.Tensor) -> BatchCounts:
    """The token, sequence and row counts of ``mask`` (``(b, R)`` bool, this rank's part of a (mini)batch)
    summed over the ranks of ``module``'s trainer (:class:`~rlhf_lightning.algorithms.ops.BatchCounts`,
    :func:`sum_over_ranks`):
    the denominators of the losses and statistics of the whole (mini)batch. One all-reduce when distributed."""
    trainer = module._trainer
    return BatchCounts.of(mask, sum_over_ranks(module), trainer.world_size if trainer is not None else 1)


def schedule_lambda(config: OptimConfig, total_steps: float | None = None):
    """:class:`OptimConfig`'s schedule as a ``LambdaLR`` lambda: ``step -> lr_multiplier(step, ...)``.

    A plain function (not a callable object), so ``LambdaLR.state_dict`` leaves it out and a resumed run
    uses the total of its own trainer.

    Raises:
        ValueError: a decaying ``scheduler`` without a finite ``total_steps``.
    """
    warmup, scheduler = config.warmup_steps, config.scheduler
    lr_multiplier(0, warmup, total_steps, scheduler)  # fail now, not at the first step
    return lambda step: lr_multiplier(step, warmup, total_steps, scheduler)


def scheduler_total_steps(trainer, optimizer_steps_per_iteration: int | None = None) -> float:
    """The number of scheduler steps in a run (:class:`OptimConfig`'s ``scheduler``), from its trainer.

    Args:
        trainer: the ``lightning.Trainer`` (call from ``configure_optimizers``).
        optimizer_steps_per_iteration: ``None`` for automatic optimization (one scheduler step per optimizer
            step: ``trainer.estimated_stepping_batches``, which counts ``max_steps``, epochs and gradient
            accumulation). PPO: its optimizer steps per iteration; one scheduler step per iteration, so
            ``ceil(trainer.max_steps / optimizer_steps_per_iteration)`` (Lightning finishes the batch that
            reaches ``max_steps``), or without ``max_steps`` the batches of all epochs.

    Returns:
        A positive number, or ``inf`` when the run has no end (``max_steps`` and ``max_epochs`` both -1).
    """
    if optimizer_steps_per_iteration is None:
        return trainer.estimated_stepping_batches
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return math.ceil(trainer.max_steps / optimizer_steps_per_iteration)
    return trainer.estimated_stepping_batches  # max_steps -1: batches x epochs, one iteration per batch


def fused_adamw_allowed(trainer) -> bool:
    """Whether fused AdamW can run under ``trainer`` (``None``: no trainer, yes).

    Not when the precision plugin has a ``GradScaler`` (``trainer.precision=16-mixed``) and
    ``trainer.gradient_clip_val`` is set: a fused AdamW unscales the gradients inside its ``step``, so
    Lightning cannot unscale them before clipping and raises "does not allow for gradient clipping
    because it performs unscaling of gradients internally" (``MixedPrecision.clip_gradients``,
    lightning/pytorch/plugins/precision/amp.py). The default AdamW is used then.
    """
    if trainer is None:
        return True
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler is None or not trainer.gradient_clip_val


def _adamw_kwargs(config: OptimConfig) -> dict:
    return dict(lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)


def make_optimizer(parameters, config: OptimConfig, total_steps: float | None = None, fused: bool = True):
    """AdamW over the parameters that require gradients, with ``config``'s warm-up and schedule.

    The fused implementation (``fused=True``) where torch has one for the parameters' device and
    dtype (CPU, CUDA), else the default one. One parameter group: :func:`make_grouped_optimizer` with
    a single, unnamed group (``total_steps`` and ``fused`` as there).

    Returns:
        (optimizer, LambdaLR scheduler).

    Raises:
        ValueError: nothing to train; a decaying schedule without a finite ``total_steps``.
    """
    return make_grouped_optimizer([(None, parameters, config)], total_steps, fused)


def make_grouped_optimizer(groups, total_steps: float | None = None, fused: bool = True):
    """One AdamW with one parameter group per ``(name, parameters, config)`` entry of ``groups``.

    Each group keeps its own settings from its :class:`OptimConfig` (``lr``, ``weight_decay``,
    ``betas``, ``eps``) and only the parameters that require gradients; a group with a ``name`` (a
    string) carries it under the param group's ``"name"`` key (``LearningRateMonitor`` uses it), one
    whose name is ``None`` gets no such key. The optimizer's defaults are the first group's settings.
    The fused implementation (``fused=True``) where torch has one for the parameters' device and
    dtype (CPU, CUDA), else the default one; ``fused=False`` (see :func:`fused_adamw_allowed`): the
    default one.

    The scheduler is one ``LambdaLR`` with one lambda per group, :func:`schedule_lambda` of that group's
    ``warmup_steps`` and ``scheduler`` over ``total_steps`` scheduler steps (:func:`scheduler_total_steps`;
    only decaying schedules need it): stepping it once moves every group along its own schedule.

    Returns:
        (optimizer, LambdaLR scheduler).

    Raises:
        ValueError: ``groups`` is empty, a group has no trainable parameter, or a group's decaying schedule
            has no finite ``total_steps`` (the message names the group).
    """
    groups = list(groups)
    if not groups:
        raise ValueError("make_grouped_optimizer: no parameter groups given")
    param_groups, lambdas = [], []
    for index, (name, parameters, config) in enumerate(groups):
        params = [p for p in parameters if p.requires_grad]
        if not params:
            where = f" in {name}" if name else ""
            raise ValueError(f"no trainable parameters{where}: check trainable_layers / frozen settings")
        # The first group takes its settings from the optimizer's defaults (below), so a single
        # unnamed group is exactly AdamW(params, **settings): same param group, same state_dict.
        group = {"params": params, **(_adamw_kwargs(config) if index else {})}
        if name is not None:
            group["name"] = name
        param_groups.append(group)
        try:
            lambdas.append(schedule_lambda(config, total_steps))
        except ValueError as err:
            raise ValueError(f"{err}" + (f" (parameter group {name})" if name else "")) from None
    defaults = _adamw_kwargs(groups[0][2])
    # Fresh group dicts for each attempt: AdamW fills its defaults (``fused`` included) into them.
    optimizer = None
    if fused:
        try:  # one fused kernel per step: ~6x faster than the default multi-tensor AdamW on CPU
            optimizer = torch.optim.AdamW([dict(g) for g in param_groups], fused=True, **defaults)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            pass
    if optimizer is None:
        optimizer = torch.optim.AdamW([dict(g) for g in param_groups], **defaults)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas if len(lambdas) > 1 else lambdas[0])
    return optimizer, scheduler


def export_pretrained(model: nn.Module, tokenizer, directory: str | Path | None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Write ``model`` (``save_pretrained``, safetensors) and its tokenizer to ``directory``.

    A LoRA network (:func:`~rlhf_lightning.models.lora.has_lora`) is written merged (loadable by plain
    transformers, as a full fine-tune) and its adapter beside it in ``<directory>_adapter`` (loadable by
    ``peft``; a scalar model's head is saved with it, :func:`~rlhf_lightning.models.lora.save_lora_export`).

    Call on the global-zero rank only (a sharded network: :func:`export_trained` on every rank). ``None`` skips
    the export. Returns the directory.

    Args:
        state_dict: the weights to write instead of ``model``'s own (a sharded network's, gathered by
            :func:`~rlhf_lightning.training.fsdp2.full_state_dict`); ``model`` then gives the config and the class.
    """
    from rlhf_lightning.models.lora import has_lora, save_lora_export
    from rlhf_lightning.models.parts import SCALAR_HEAD_NAMES

    if directory is None:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if has_lora(model):
        heads = tuple(name for name in SCALAR_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Linear))
        adapter_dir = save_lora_export(model, directory, heads, state_dict=state_dict)
        log.info("wrote the LoRA adapter of %s to %s", type(model).__name__, adapter_dir)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
        _record_plain_class(model, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    log.info("wrote %s to %s", type(model).__name__, directory)
    return directory


def _record_plain_class(model: nn.Module, directory: Path) -> None:
    """Name the plain transformers class in ``<directory>/config.json``'s ``architectures`` where ``save_pretrained``
    wrote a sharded model's own (``FSDPLlamaForCausalLM``: :func:`~rlhf_lightning.models.sharding.plain_class`)."""
    import json

    from rlhf_lightning.models.sharding import plain_class

    name = plain_class(model).__name__
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures") != [name]:
        config["architectures"] = [name]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_trained(module, model: nn.Module | None, tokenizer, directory: str | Path | None) -> Path | None:
    """:func:`export_pretrained` of one of ``module``'s networks, called on every rank at the end of fit.

    Under :class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy` every rank takes part in gathering the network's whole
    weights (:func:`~rlhf_lightning.training.fsdp2.full_state_dict`, a collective) and the global-zero rank writes them;
    elsewhere the global-zero rank writes its own copy and the other ranks do nothing (no communication). Then
    every rank waits for the files (``strategy.barrier``), so a rank that goes on to read them finds them.

    Returns:
        The directory on the global-zero rank, else ``None``; ``None`` also when ``model`` or ``directory`` is
        ``None`` (nothing written, nothing gathered).
    """
    from rlhf_lightning.models.sharding import is_sharded
    from rlhf_lightning.training.fsdp2 import fsdp2_settings, full_state_dict

    if model is None or directory is None:
        return None
    trainer = module.trainer
    state = full_state_dict(model) if fsdp2_settings(module) is not None and is_sharded(model) else None
    written = export_pretrained(model, tokenizer, directory, state_dict=state) if trainer.is_global_zero else None
    trainer.strategy.barrier("export")
    return written


def find_shared_trunk(module, enabled: bool):
    """The frozen trunk shared by a module's ``policy``, ``ref_policy``, ``critic`` and ``reward_model``.

    Tries all four together, then the pairs (policy, reference) and (critic, reward model); see
    :func:`rlhf_lightning.models.trunk.shared_trunk_for`. Call in ``on_fit_start`` (the strategy is
    known and the weights are in place).

    Returns:
        a :class:`~rlhf_lightning.models.trunk.SharedTrunk`, or ``None`` (off, sharded strategy, or
        nothing shared).
    """
    from rlhf_lightning.models.lora import has_lora
    from rlhf_lightning.models.trunk import shared_trunk_for

    names = ("policy", "ref_policy", "critic", "reward_model")
    models = {name: getattr(module, name, None) for name in names}
    if models["ref_policy"] is None and has_lora(models["policy"]):
        models["ref_policy"] = models["policy"]  # the reference is the LoRA policy with its adapters off
    return shared_trunk_for(module.trainer.strategy, enabled, models,
                            groups=[["policy", "ref_policy"], ["critic", "reward_model"]])


def drop_frozen_lora_weights(state_dict: dict, networks: dict[str, nn.Module | None]) -> int:
    """Leave a LoRA network's frozen base weights out of a checkpoint's ``state_dict``, in place: they are
    reloaded from the network's source, and only its adapters and head (what requires a gradient) change.

    Args:
        state_dict: the LightningModule's checkpoint ``state_dict``.
        networks: attribute name (``policy``, ``critic``, ``model``) → network; networks without LoRA and
            ``None`` entries are left as they are.

    Returns:
        The number of keys removed.
    """
    from rlhf_lightning.models.lora import has_lora, trainable_state_keys

    removed = 0
    for prefix, model in networks.items():
        if not has_lora(model):
            continue
        keep = {f"{prefix}.{key}" for key in trainable_state_keys(model)}
        for key in [k for k in state_dict if k.startswith(prefix + ".") and k not in keep]:
            del state_dict[key]
            removed += 1
    return removed


def check_lora_strategy(strategy: object, networks: dict[str, nn.Module | None]) -> None:
    """Refuse LoRA networks under FSDP1 (Lightning's ``FSDPStrategy``) and DeepSpeed.

    Their parameters are flattened or partitioned there, which the adapters' switching off (PPO's reference),
    the merged export and the adapter-only checkpoints do not handle; DDP, single-device strategies and FSDP2
    (:class:`~rlhf_lightning.training.fsdp2.FSDP2Strategy`: parameters stay per module, sharded on their first
    dimension,
    the exports merge the gathered weights) take it.

    Raises:
        ValueError: one line naming the strategy and ``model.lora.r``.
    """
    from rlhf_lightning.models.lora import has_lora
    from rlhf_lightning.training.fsdp2 import FSDP2Strategy

    name = type(strategy).__name__
    if isinstance(strategy, FSDP2Strategy):
        return
    if ("FSDP" in name or "DeepSpeed" in name) and any(has_lora(m) for m in networks.values()):
        raise ValueError(f"model.lora.r is set but {name} cannot train LoRA networks here: use trainer=ddp or a "
                         "single device, or model.lora.r=null")
