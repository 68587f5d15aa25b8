"""Profile our PPO iteration: time per phase, then torch.profiler's top operators.

    PYTHONPATH=. python bench/profile_ppo.py --model tiny --steps 5
    PYTHONPATH=. python bench/profile_ppo.py --model smollm2 --steps 2 --rows 30

Same workload as ``bench/ppo_iteration.py`` (8 prompts × 32 sampled tokens, one PPO epoch of one
minibatch), ours only. Phases are wall-clock sums over the profiled iterations of: ``generate``
(sampling), ``make_experience`` (reward model + reference, and old logprobs/values when not reused),
``train_forward`` (policy + critic with autograd), ``backward``, ``optimizer`` (both steps and
zero_grad); ``rest`` is the remainder of ``training_step`` (rewards, GAE, losses, logging).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import ppo_iteration  # noqa: E402


def main(argv=None) -> None:
    def add_arguments(parser):
        parser.add_argument("--rows", type=int, default=25, help="operators listed")
        parser.add_argument("--sort", default="self_cpu_time_total", help="torch.profiler sort key")

    args, tokenizer, device, dtype, sync = benchlib.start(__doc__.splitlines()[0], argv, add_arguments)
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    import rlhf_lightning.modules.ppo as ppo_module

    prompts = ppo_iteration.hh_prompts(tokenizer)
    phases: dict[str, float] = defaultdict(float)
    state = {"active": False}

    def timed(name, fn):
        def wrapper(*a, **k):
            if sync:
                sync()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if sync:
                    sync()
                if state["active"]:
                    phases[name] += time.perf_counter() - start
        return wrapper

    ppo_module.generate = timed("generate", ppo_module.generate)
    ppo_module.make_experience = timed("make_experience", ppo_module.make_experience)
    ppo_module.PPOModule._train_forward = timed("train_forward", ppo_module.PPOModule._train_forward)
    ppo_module.PPOModule.manual_backward = timed("backward", ppo_module.PPOModule.manual_backward)
    ppo_module.PPOModule.training_step = timed("training_step", ppo_module.PPOModule.training_step)

    alternation = benchlib.Alternation(("ours",), sync)
    fit = ppo_iteration.ours_loop(args, tokenizer, prompts, alternation, dtype, device, [], sync)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))

    class Profiled(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step // pl_module.optimizer_steps_per_iteration == args.warmup:
                state["active"] = True
                for opt in trainer.optimizers:
                    opt.step = timed("optimizer", opt.step)
                    opt.zero_grad = timed("optimizer", opt.zero_grad)
                prof.start()

    original_fit = L.Trainer.fit

    def fit_with_profiler(self, *a, **k):
        self.callbacks.append(Profiled())
        return original_fit(self, *a, **k)

    L.Trainer.fit = fit_with_profiler
    benchlib.run_alternating({"ours": fit}, alternation)
    prof.stop()
    n = args.steps
    step = phases.pop("training_step")
    print(f"\nour PPO iteration, {args.model}, {n} iterations after {args.warmup} warm-up, per iteration:")
    accounted = 0.0
    for name in ("generate", "make_experience", "train_forward", "backward", "optimizer"):
        accounted += phases[name]
        print(f"  {name:15} {phases[name] / n:8.3f} s  {100 * phases[name] / step:5.1f}%")
    print(f"  {'rest':14} {(step - accounted) / n:8.3f} s  {100 * (step - accounted) / step:5.1f}%")
    print(f"  {'training_step':14} {step / n:8.3f} s; Lightning loop around it: "
          f"{(sum(alternation.times['ours'][args.warmup:]) - step) / n:.3f} s")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
