"""Crash-safe checkpoint files: a CheckpointIO plugin that never leaves a half-written checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable on local file systems.

    ``save_checkpoint`` writes ``torch.save(checkpoint)`` to a temporary file beside the target
    (``.<name>.<pid>.tmp``, same directory so the rename stays on one file system), flushes and
    ``fsync``s it, renames it over the target with ``os.replace`` (atomic on POSIX and Windows), then
    ``fsync``s the directory. A process killed at any point leaves either the previous file or the new
    one, never a truncated one (a stray ``.tmp`` file at most). Loading is Lightning's
    (``torch.load`` with ``weights_only`` as Lightning passes it).

    Wired into every trainer preset as ``trainer.plugins`` (``conf/trainer/cpu.yaml``). Remote paths
    (``s3://...``) go to ``TorchCheckpointIO``, whose fsspec transaction is the store's atomic upload.

    Raises:
        TypeError: ``storage_options`` given (as ``TorchCheckpointIO``).
        OSError: the directory cannot be created or written.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
