"""Peak resident memory of every rank of a multi-process ``train.py`` run: FSDP2 against DDP on 2 CPU processes.

    # SmolLM2 PPO (full fine-tuning), a few iterations, under each preset (one run at a time):
    python bench/rank_memory.py --presets fsdp_cpu fsdp_cpu:trainer.strategy.frozen_networks=replicate ddp_cpu \
        --out bench/results/rank_memory_smollm2_ppo.json

Each run is ``train.py stage=ppo trainer=<preset>`` with :class:`RankPeakMemory` added as a callback: every rank
writes its peak resident set (``VmHWM`` of /proc/self/status, the high-water mark since the worker started, which
includes unpickling the networks the main process built) at fit start (after FSDP2 has sharded the networks),
after each training batch, and at the end, and its current resident set (``VmRSS``) at the same points. The
main process (which built the unsharded networks and spawned the ranks) is reported apart.

The reward model and the critic start from SmolLM2 itself (a new scalar head): the memory is that of the four
networks of PPO with GAE, whatever their training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    """This process's ``field`` (``VmHWM``: peak, ``VmRSS``: current resident set) in MiB, from /proc/self/status.

    Raises:
        RuntimeError: the field is not there (not Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current resident set (``5`` written to /proc/self/clear_refs, Linux
    4.0+); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RankPeakMemory(Callback):
    """Writes ``<out_dir>/rank<r>.json`` on every rank at the end of fit: ``{"rank", "pid", "startup_peak_mib",
    "points": [{"at", "peak_mib", "rss_mib"}, ...], "peak_mib"}`` (MiB of resident memory, Linux).

    ``startup_peak_mib`` is the high-water mark at fit start, after ``configure_model`` sharded the networks: it
    includes the whole networks each spawned rank unpickles before sharding them. The peak is then reset
    (:func:`_reset_peak`), so ``points`` (fit start, after each training batch, the end) and ``peak_mib`` are the
    training's own peak; without the reset they include the start-up peak."""

    def __init__(self, out_dir: str):
        self.out_dir, self.points, self.startup_peak, self.reset = out_dir, [], None, False

    def _point(self, at: str) -> None:
        self.points.append({"at": at, "peak_mib": _status_mb("VmHWM"), "rss_mib": _status_mb("VmRSS")})

    def on_fit_start(self, trainer, pl_module) -> None:
        self.startup_peak = _status_mb("VmHWM")
        self.reset = _reset_peak()
        self._point("fit_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._point(f"batch{batch_idx}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._point("train_end")
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"rank": trainer.global_rank, "pid": os.getpid(), "startup_peak_mib": self.startup_peak,
             "peak_reset": self.reset, "points": self.points,
             "peak_mib": max(p["peak_mib"] for p in self.points)}) + "\n")


def smollm2_dir() -> str:
    """The dequantised SmolLM2 directory (built on first use)."""
    from rlhf_lightning.models import SMOLLM2, SMOLLM2_GGUF, resolve_pretrained

    return resolve_pretrained(SMOLLM2, SMOLLM2_GGUF)


def run_preset(preset: str, run_dir: Path, overrides: list[str]) -> dict:
    """One ``train.py`` PPO run under ``trainer=<preset>``; returns the ranks' :class:`RankPeakMemory` records, the
    main process's peak (``ru_maxrss`` of the child, MiB) and the wall time.

    Raises:
        subprocess.CalledProcessError: the run failed."""
    import resource

    model = smollm2_dir()
    cmd = [sys.executable, str(ROOT / "train.py"), "stage=ppo", f"trainer={preset}", f"reward_model_path={model}",
           f"critic_path={model}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
           "trainer.enable_checkpointing=false", "+callbacks.rank_memory._target_=bench.rank_memory.RankPeakMemory",
           f"+callbacks.rank_memory.out_dir={run_dir / 'rank_memory'}", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout[-3000:], proc.stderr[-5000:])
    main_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "rank_memory").glob("rank*.json"))]
    return {"preset": preset, "overrides": overrides, "wall_s": round(time.time() - start, 1),
            "ranks": ranks, "peak_mib_per_rank": [r["peak_mib"] for r in ranks],
            "startup_peak_mib_per_rank": [r["startup_peak_mib"] for r in ranks],
            "largest_process_peak_mib": max(before, main_peak) / 1024}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["fsdp_cpu", "ddp_cpu"],
                        help="trainer presets, each optionally with overrides: fsdp_cpu:key=value,key=value")
    parser.add_argument("--run-root", default="/tmp/rank_memory")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = parser.parse_args(argv)
    overrides = ["model=smollm2", "iterations=3", "batch_size=4", "ppo.ppo_epochs=1", "ppo.num_minibatches=2",
                 "ppo.generation.max_new_tokens=16", "ppo.num_sample_prompts=0", "max_prompt_length=64",
                 *args.overrides]
    results = []
    for index, spec in enumerate(args.presets):
        preset, _, extra = spec.partition(":")  # fsdp_cpu:trainer.strategy.frozen_networks=replicate
        run_dir = Path(args.run_root) / f"{index}_{preset}_{time.strftime('%H%M%S')}"
        try:
            result = run_preset(preset, run_dir, overrides + [e for e in extra.split(",") if e])
        except subprocess.CalledProcessError as err:  # the others still run; the error is in the results
            print(f"{spec}: failed\n{err.stderr}", flush=True)
            results.append({"preset": spec, "error": err.stderr[-2000:]})
            continue
        print(f"{spec}: training peak RSS per rank "
              f"{[round(m) for m in result['peak_mib_per_rank']]} MiB, start-up peak "
              f"{[round(m) for m in result['startup_peak_mib_per_rank']]} MiB, {result['wall_s']} s", flush=True)
        results.append(result)
    import torch

    out = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "cpus": os.cpu_count(), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
