"""FSDP2 training (torch's ``fully_shard``) through Lightning's ``ModelParallelStrategy``: ``trainer=fsdp`` (GPUs,
NCCL) and ``trainer=fsdp_cpu`` (2 CPU processes, gloo).

- :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` with every rank data-parallel (tensor-parallel
  size 1), the sharding settings (:class:`~rlhf_lightning.config.schema.FSDP2Settings`, its keyword arguments: the one
  place they are written), a ``spawn`` start method as the DDP presets (sweeps, tests), sharded checkpoints that
  leave out what the modules leave out (the frozen networks), and a precision check.
- :func:`shard_networks`: what each module's ``configure_model`` calls: its trained networks, and its frozen
  ones unless ``frozen_networks=replicate``, sharded per decoder block
  (:func:`~rlhf_lightning.models.sharding.shard_model`).
- :func:`full_state_dict`: a network's whole weights gathered with every rank taking part, on rank 0 (the
  exports: :func:`rlhf_lightning.modules.common.export_trained`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from torch import nn

from rlhf_lightning.config.schema import FSDP2Settings, as_config
from rlhf_lightning.training.validate import SHARDED_CKPT_METADATA

log = logging.getLogger(__name__)

#: The file of a sharded (directory) checkpoint that holds everything but the weights and optimizer states
#: (Lightning's ``_METADATA_FILENAME``; ``ckpt_path`` may name a directory holding it).
METADATA_FILE = SHARDED_CKPT_METADATA

#: Precisions the strategy takes: mixed precision is FSDP2's (``trainer.strategy.param_dtype``), not autocast's.
FULL_PRECISIONS = ("32-true", "32", 32)


class _SpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, without sending the weights back to the main process: the main process's
    networks are the unsharded ones it built, which a sharded state dict cannot be loaded into (the exports and
    checkpoints on disk are the results). The trainer state, the best checkpoint path and the callback metrics
    come back as with DDP's spawn."""

    def _collect_rank_zero_results(self, trainer, results: Any) -> _WorkerOutput | None:
        if self._strategy.local_rank != 0:
            return None
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback is not None else None
        return _WorkerOutput(best, None, trainer.state, results, self.get_extra_results(trainer))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank: parameters, gradients and optimizer states sharded per decoder
    block (``configure_model`` of each module, :func:`shard_networks`).

    Args:
        start_method: ``spawn`` (workers started inside the running job, as ``trainer=ddp_cpu``: single runs,
            multiruns and tests) or ``popen`` (under SLURM or ``torchrun``, where the processes exist already;
            else Lightning re-runs the command line); the presets take ``${ddp_start_method:}``.
        reshard_after_forward, param_dtype, reduce_dtype, cpu_offload, frozen_networks: the sharding settings,
            :class:`~rlhf_lightning.config.schema.FSDP2Settings` (kept in :attr:`settings`).
        process_group_backend: ``gloo`` (CPU) or ``nccl`` (GPU); ``None``: the device's default.
        timeout: of the process group's collectives.

    Checkpoints are directories (``last.ckpt/``: one shard file per rank, written with
    ``torch.distributed.checkpoint``, and ``meta.pt`` with the loops, callbacks, schedulers and RNG states).
    A checkpoint may leave out networks (PPO's frozen reference and reward model) when the module loads
    non-strictly (``strict_loading`` false): :meth:`load_checkpoint` loads what the directory holds and checks the
    rest only under strict loading.

    Raises:
        TypeError, ValueError: a setting :class:`~rlhf_lightning.config.schema.FSDP2Settings` refuses (one line naming
            ``trainer.strategy.<key>``), or a ``start_method`` other than ``spawn``/``popen``.
    """

    strategy_name = "fsdp2"

    def __init__(self, start_method: str = "spawn", reshard_after_forward: bool = True, param_dtype: str | None = None,
                 reduce_dtype: str | None = None, cpu_offload: bool = False, frozen_networks: str = "shard",
                 process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        if start_method not in ("spawn", "popen"):
            raise ValueError(f"trainer.strategy.start_method={start_method!r}: expected one of spawn, popen")
        self.settings = as_config(FSDP2Settings, dict(
            reshard_after_forward=reshard_after_forward, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
            cpu_offload=cpu_offload, frozen_networks=frozen_networks), "trainer.strategy")
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, **kwargs)
        self._start_method = start_method

    def _configure_launcher(self) -> None:
        if self._start_method == "popen" or self.cluster_environment.creates_processes_externally:
            return super()._configure_launcher()
        self._launcher = _SpawnLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        """Every process is one data-parallel rank: ``data_parallel_size`` = world size, tensor-parallel 1."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        """Refuse what FSDP2 here does not run with, then Lightning's setup (``configure_model`` has sharded the
        networks by now).

        Raises:
            ValueError: ``trainer.precision`` other than 32-true (mixed precision is ``param_dtype``), or
                ``cpu_offload`` without a GPU (one line naming the key).
        """
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in FULL_PRECISIONS:
            raise ValueError(f"trainer.precision={precision} under FSDP2Strategy: use 32-true and set "
                             "trainer.strategy.param_dtype=bfloat16 for mixed precision")
        if self.settings.cpu_offload and self.root_device.type == "cpu":
            raise ValueError("trainer.strategy.cpu_offload=true needs GPUs (the shards already live on the CPU)")
        super().setup(trainer)

    def model_to_device(self) -> None:
        """Move what is not sharded to the device; with ``cpu_offload`` every network is sharded (FSDP2 placed
        the buffers on the device and keeps the shards in CPU memory), so nothing moves."""
        if not self.settings.cpu_offload:
            super().model_to_device()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint directory into the sharded networks and optimizers
        (:func:`load_sharded_checkpoint`); a single-file checkpoint as Lightning does. Returns the rest of the
        checkpoint (loops, callbacks, schedulers, ...)."""
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        return load_sharded_checkpoint(path, self.model, self.optimizers, strict=self.lightning_module.strict_loading,
                                       weights_only=weights_only)


def load_sharded_checkpoint(path: Path, module: nn.Module, optimizers: list, strict: bool = True,
                            weights_only: bool | None = None) -> dict[str, Any]:
    """Load a directory written by :class:`FSDP2Strategy` (Lightning's layout: ``state_dict`` and
    ``optimizer_<i>`` in ``torch.distributed.checkpoint`` shards, the rest in ``meta.pt``) into ``module`` and
    ``optimizers``, in place, on every rank (collective).

    DCP reads each rank's part of every tensor whatever the world size that wrote it (the checkpoint stores the
    global shapes), so a checkpoint of N ranks loads into M.

    Args:
        path: the checkpoint directory.
        module: the LightningModule with its networks sharded (and replicated ones, plain).
        optimizers: the trainer's optimizers, in order (``optimizer_<i>``).
        strict: every entry of ``module``'s state dict must be in the checkpoint; false: entries it does not
            hold (networks the module leaves out of its checkpoints) keep their current values.

    Returns:
        The contents of ``meta.pt`` (everything but weights and optimizer states).

    Raises:
        KeyError: ``strict`` and the checkpoint lacks entries (the first few named).
        FileNotFoundError: no ``meta.pt`` in ``path``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = get_model_state_dict(module)
    present = {key: value for key, value in state.items() if f"state_dict.{key}" in saved}
    missing = sorted(state.keys() - present.keys())
    if strict and missing:
        raise KeyError(f"{path}: the checkpoint lacks {len(missing)} weights the module loads strictly, e.g. "
                       f"{', '.join(missing[:3])}")
    dcp.load({"state_dict": present}, checkpoint_id=path)
    set_model_state_dict(module, present, options=StateDictOptions(strict=False))
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / METADATA_FILE, weights_only=weights_only)


def fsdp2_settings(module) -> FSDP2Settings | None:
    """The :class:`~rlhf_lightning.config.schema.FSDP2Settings` of ``module``'s trainer strategy, or ``None`` when the
    module has no trainer or the strategy is not :class:`FSDP2Strategy`."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    return strategy.settings if isinstance(strategy, FSDP2Strategy) else None


def shard_networks(module, trained: tuple[str, ...], frozen: tuple[str, ...] = ()) -> dict[str, str]:
    """Under :class:`FSDP2Strategy`, shard ``module``'s networks per decoder block
    (:func:`~rlhf_lightning.models.sharding.shard_model`) over the data-parallel mesh: the ``trained`` ones always,
    the ``frozen`` ones unless ``frozen_networks=replicate``; attributes that are ``None`` are skipped. Other
    strategies: nothing. Call from ``configure_model`` (every rank, after the process group exists; Lightning
    may call it again: sharded networks are left as they are).

    Args:
        module: the LightningModule.
        trained, frozen: attribute names of its networks.

    Returns:
        attribute name → ``"sharded"`` or ``"replicated"`` (empty under other strategies); logged once.

    Raises:
        ValueError: a critic on the LoRA policy's base (``critic.share_base``) among the trained networks.
    """
    from rlhf_lightning.models.lora import CRITIC_ADAPTER, adapter_of
    from rlhf_lightning.models.sharding import shard_model

    settings = fsdp2_settings(module)
    if settings is None:
        return {}
    if any(getattr(module, n, None) is not None and adapter_of(getattr(module, n)) == CRITIC_ADAPTER for n in trained):
        raise ValueError("critic.share_base=true is not supported under FSDP2 (the critic would run the sharded "
                         "policy's backbone outside the policy's forward): set critic.share_base=false")
    mesh = module.device_mesh["data_parallel"]
    placement = {}
    for name in (*trained, *frozen):
        network = getattr(module, name, None)
        if network is None:
            continue
        if name in frozen and settings.frozen_networks == "replicate":
            placement[name] = "replicated"
            continue
        units = shard_model(network, mesh, settings)
        placement[name] = "sharded"
        if units["units"]:
            log.info("FSDP2: %s sharded over %d ranks in %d units (%d decoder blocks)", name, mesh.size(),
                     units["units"], units["blocks"])
    return placement


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights of a sharded network, gathered with every rank taking part (collective: call on every
    rank), on rank 0 in CPU memory (``get_model_state_dict`` with ``full_state_dict`` and ``cpu_offload``).

    Returns:
        state-dict key → tensor (the unsharded parameters' own dtype) on global rank 0; ``None`` on the others.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return state if rank == 0 else None
