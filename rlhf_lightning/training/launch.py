"""How multi-process training starts inside Hydra jobs, and which device a parallel job uses.

Two OmegaConf resolvers used by the presets of ``conf/trainer`` and ``conf/hydra/launcher``:

- ``${ddp_start_method:}`` (:func:`ddp_start_method`): ``spawn`` when Lightning has to start the
  worker processes itself. Spawned workers start inside the running job, so one job of a
  ``python train.py -m`` sweep trains with several processes without re-running the command line
  (the ``popen`` start method re-runs ``sys.argv``, i.e. the whole sweep, in every worker).
  ``popen`` where a cluster manager already started one process per device (SLURM tasks, e.g. the
  submitit launcher with ``tasks_per_node = trainer.devices``, or ``torchrun``): Lightning then
  starts nothing and each process is one rank.
- ``${claim_device:N}`` (:func:`claim_device`): for jobs run side by side in worker processes
  (the joblib launcher), one of N devices per worker process, held with a file lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

#: File locks held by this process (device index -> open file); released when the process exits.
_CLAIMED: dict[int, object] = {}


def ddp_start_method() -> str:
    """``"popen"`` under SLURM with several tasks or under torchelastic (``torchrun``), where the processes
    exist already and Lightning's popen launcher starts none; ``"spawn"`` otherwise."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "popen" if SLURMEnvironment.detect() or TorchElasticEnvironment.detect() else "spawn"


def claim_device(num_devices: int | str, lock_dir: str | os.PathLike | None = None) -> int:
    """Index of the device this process uses, out of ``num_devices``, claimed with an exclusive lock
    on ``<lock_dir>/device<i>.lock`` (default: ``$RLHF_LIGHTNING_LOCKS``, else ``/tmp/rlhf_lightning_devices``).

    The first call in a process takes the lowest free index and keeps its lock until the process
    exits; later calls return the same index. With the joblib launcher (``n_jobs`` ≤ ``num_devices``),
    every worker process, and so every job running at a time, has a device of its own.

    Raises:
        ValueError: ``num_devices`` < 1.
        RuntimeError: every device is held by another process.
    """
    num_devices = int(num_devices)
    if num_devices < 1:
        raise ValueError(f"claim_device: num_devices={num_devices} must be >= 1")
    if _CLAIMED:
        return next(iter(_CLAIMED))
    lock_dir = Path(lock_dir or os.environ.get("RLHF_LIGHTNING_LOCKS", "/tmp/rlhf_lightning_devices"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(num_devices):
        handle = open(lock_dir / f"device{index}.lock", "w")  # noqa: SIM115  (held open for the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _CLAIMED[index] = handle
        return index
    raise RuntimeError(f"all {num_devices} devices are held by other processes (locks in {lock_dir}): "
                       "run fewer parallel jobs (hydra.launcher.n_jobs) than devices")
