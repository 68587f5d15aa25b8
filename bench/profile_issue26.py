"""Where our time goes (issue 26): a GRPO iteration, a full-fine-tuning PPO iteration, or a reward-model step,
split into exclusive phases, with the padding and the redundant work of each batch counted.

    # in the trl 1.16 venv (it imports both frameworks, as the benches do), from the repository root
    PYTHONPATH=. python bench/profile_issue26.py --workload grpo   --model smollm2 --steps 3 --warmup 1 --threads 1
    PYTHONPATH=. python bench/profile_issue26.py --workload ppo    --model smollm2 --steps 2 --warmup 1 --threads 1
    PYTHONPATH=. python bench/profile_issue26.py --workload reward --model tiny    --steps 40 --warmup 3 --threads 1
    # + --ops N: torch.profiler's N most expensive operators over the timed steps (inflates the times)

Workloads: ``grpo`` is ``bench/grpo_iteration.py``'s ours side (the RLVR demo's shape: 8 prompts x 4 responses,
<= 24 tokens at T 0.7, top 4 blocks trained); ``ppo`` is ``bench/ppo_iteration.py``'s ours side (8 hh-rlhf
prompts left-padded to 64 tokens x 32 tokens at T 1, policy and critic trained in full, one epoch of one
minibatch); ``reward`` is ``bench/reward_step.py``'s ours side (4 hh-rlhf pairs, Bradley-Terry loss).

Phases are EXCLUSIVE wall-clock times (a stack: time inside a nested phase is not counted in its parent),
summed over the timed steps and divided by their number, from wrappers around our own functions:

* ``generate/prefill``, ``generate/decode``: the policy's forward calls inside a generate call (the first one
  is the prefill); ``generate/sampling+loop``: the rest of the generate call (sampling, masks, the loop);
* ``trunk``: the shared frozen lower blocks (``SharedTrunk.compute``), once per batch;
* ``reward model``: ``sequence_scores`` in the rollout; ``reward functions``: decoding and the verifiers;
* ``reference``: ``response_logprobs`` in the rollout (the reference's log-probabilities, no autograd);
* ``train forward/policy``, ``train forward/critic``: the training forwards with autograd, the LM head
  (``lm head``, also its no-grad calls in the reference) and ``logprobs``/``entropy`` split out;
* ``backward``, ``grad clip``, ``optimizer`` (AdamW steps + zero_grad), ``advantages``, ``logging``;
* ``training_step (rest)``: the remainder of ``training_step``; ``Lightning loop``: the step's wall time
  (``benchlib.Alternation``) minus ``training_step``.

Reward step: ``forward`` (the scores, length groups included), ``loss+metrics`` (the rest of
``training_step``), ``self.log``, ``backward``, ``optimizer`` (AdamW's own ``step``, the closure excluded),
``zero_grad``, and the Lightning loop around them.

Batch facts (``batch``): the training forwards' cells (rows x columns) and real tokens (padding fraction), the
decode steps' row-steps spent on finished rows, and the prompt tokens prefilled more than once (a prompt's
G copies each prefill the same tokens).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import grpo_iteration  # noqa: E402
import ppo_iteration  # noqa: E402
import reward_step  # noqa: E402


class Phases:
    """Exclusive wall time per phase name: a stack of open phases; the clock always runs for the innermost.

    ``active`` False: nothing is recorded (warm-up steps). One thread.
    """

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False
        self._stack: list[str] = []
        self._mark = 0.0
        self._sync = sync

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def push(self, name: str) -> None:
        now = self._now()
        if self._stack and self.active:
            self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self._mark = now
        if self.active:
            self.calls[name] += 1

    def pop(self) -> None:
        now = self._now()
        name = self._stack.pop()
        if self.active:
            self.seconds[name] += now - self._mark
        self._mark = now

    def wrap(self, name, fn):
        """``fn`` timed as phase ``name`` (a string, or ``f(args, kwargs)`` -> string)."""
        def wrapper(*args, **kwargs):
            self.push(name(args, kwargs) if callable(name) else name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()

        wrapper.__wrapped__ = fn
        return wrapper

    def patch(self, owner, attr: str, name) -> None:
        """Replace ``owner.attr`` by its timed wrapper."""
        setattr(owner, attr, self.wrap(name, getattr(owner, attr)))

    def hook_module(self, module, name) -> None:
        """Time every call of ``module`` (forward pre/post hooks) as phase ``name`` (string or ``f()``)."""
        module.register_forward_pre_hook(lambda m, a: self.push(name() if callable(name) else name))
        module.register_forward_hook(lambda m, a, out: self.pop())


def patch_rl(phases: Phases, policy, reference) -> None:
    """Phase wrappers for PPOModule's iteration (GRPO and PPO)."""
    import torch

    import rlhf_lightning.models.forward as forward
    import rlhf_lightning.modules.ppo as ppo_module
    import rlhf_lightning.rollout.experience as experience
    from rlhf_lightning.models.trunk import SharedTrunk

    state = {"generating": False, "calls": 0}

    def generate_phase(args, kwargs):
        state["generating"], state["calls"] = True, 0
        return "generate/sampling+loop"

    plain_generate = ppo_module.generate
    timed_generate = phases.wrap(generate_phase, plain_generate)

    def generate(*a, **k):
        try:
            return timed_generate(*a, **k)
        finally:
            state["generating"] = False

    ppo_module.generate = generate

    def policy_phase():
        if state["generating"]:
            state["calls"] += 1
            return "generate/prefill" if state["calls"] == 1 else "generate/decode"
        return "policy model forward (outside generate)"

    phases.hook_module(policy, policy_phase)

    def head_phase():
        return "generate/lm head" if state["generating"] else (
            "lm head (grad)" if torch.is_grad_enabled() else "lm head (no grad)")

    for model in {id(m): m for m in (policy, reference) if m is not None}.values():
        phases.hook_module(model.get_output_embeddings(), head_phase)
    phases.patch(SharedTrunk, "compute", "trunk")
    phases.patch(experience, "sequence_scores", "reward model")
    phases.patch(experience, "response_logprobs", "reference")
    phases.patch(experience, "response_values", "critic values (no grad)")
    phases.patch(ppo_module, "response_logprobs", "train forward/policy")
    phases.patch(ppo_module, "response_values", "train forward/critic")
    phases.patch(forward, "logprobs_from_logits", "logprobs")
    phases.patch(forward, "entropy_from_logits", "entropy")
    module = ppo_module.PPOModule
    phases.patch(module, "_function_rewards", "reward functions")
    phases.patch(module, "manual_backward", "backward")
    phases.patch(module, "clip_gradients", "grad clip")
    phases.patch(module, "compute_advantages", "advantages")
    phases.patch(module, "log_iteration", "logging")
    phases.patch(module, "training_step", "training_step (rest)")


def patch_reward(phases: Phases) -> None:
    """Phase wrappers for RewardModule's step (automatic optimization)."""
    from rlhf_lightning.modules import RewardModule

    phases.patch(RewardModule, "forward", "forward")
    phases.patch(RewardModule, "training_step", "loss+metrics")
    phases.patch(RewardModule, "log", "self.log")
    phases.patch(RewardModule, "log_dict", "self.log")
    phases.patch(RewardModule, "backward", "backward")


def add_arguments(parser) -> None:
    parser.add_argument("--workload", choices=["grpo", "ppo", "reward"], required=True)
    parser.add_argument("--ops", type=int, default=0, help="print torch.profiler's N top operators (0: off)")
    parser.add_argument("--profile-out", type=Path, default=None, help="write the phases and batch facts as JSON")
    grpo_iteration.add_arguments(parser)
    ppo_iteration.add_arguments(parser)


def main(argv=None) -> dict:
    args, tokenizer, device, dtype, sync = benchlib.start(__doc__.splitlines()[0], argv, add_arguments)
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    phases = Phases(sync)
    alternation = benchlib.Alternation(("ours",), sync)
    work = grpo_iteration.Work()
    gen_log: list = []
    if args.workload == "grpo":
        rows = grpo_iteration.task_prompts(tokenizer, args.prompts)
        fit = grpo_iteration.ours_loop(args, tokenizer, rows, alternation, dtype, device, work, gen_log, sync)
    elif args.workload == "ppo":
        import rlhf_lightning.modules.ppo as ppo_module

        prompts = ppo_iteration.hh_prompts(tokenizer)
        fit = ppo_iteration.ours_loop(args, tokenizer, prompts, alternation, dtype, device, [], sync)
        work.add_side("ours")
        counted = ppo_module.generate
        ppo_module.generate = grpo_iteration.timed_generation(
            counted, "ours", work, gen_log, sync, lambda a, k, ro: (ro.attention_mask[:, : ro.response_start],
                                                                   ro.response_ids))
        ppo_module.generate.eos_ids = [tokenizer.eos_token_id]
        for attr in ("plain", "wrapped", "sides"):  # ppo_iteration's per-thread dispatch, read at train start
            setattr(ppo_module.generate, attr, getattr(counted, attr))
    else:
        pairs = reward_step.hh_pairs(tokenizer)
        fit = reward_step.ours_loop(args, tokenizer, pairs, alternation, dtype, device)
        patch_reward(phases)

    prof = profile(activities=[ProfilerActivity.CPU]) if args.ops else None
    state = {"steps": 0}

    class Profiled(L.Callback):
        """Start recording at the first timed step; time the optimizers' own steps and zero_grad."""

        def on_train_start(self, trainer, pl_module):
            if args.workload != "reward":
                patch_rl(phases, pl_module.policy, pl_module.ref_policy)
            if args.workload == "ppo":
                work.count_blocks("ours", pl_module.policy, pl_module.ref_policy, pl_module.critic,
                                  pl_module.reward_model)
                work.bind_thread("ours")
            for opt in trainer.optimizers:
                opt.step = phases.wrap("optimizer", opt.step)
                opt.zero_grad = phases.wrap("optimizer" if args.workload != "reward" else "zero_grad",
                                            opt.zero_grad)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if state["steps"] == args.warmup:
                phases.active = True
                if prof is not None:
                    prof.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["steps"] += 1
            if args.workload == "ppo":  # grpo_iteration's loop closes its own iterations
                work.step_end("ours")

    plain_fit = L.Trainer.fit

    def fit_with_profiler(self, *a, **k):
        self.callbacks.append(Profiled())
        return plain_fit(self, *a, **k)

    L.Trainer.fit = fit_with_profiler
    benchlib.run_alternating({"ours": fit}, alternation)
    if prof is not None:
        prof.stop()
    n = args.steps
    times = alternation.times["ours"][args.warmup:]
    step_s = sum(times) / n
    table = {name: s / n for name, s in sorted(phases.seconds.items(), key=lambda kv: -kv[1])}
    inside = sum(table.values())
    table["Lightning loop (outside the phases)"] = step_s - inside
    print(f"\nours, {args.workload}, model {args.model}, {n} timed steps after {args.warmup}: "
          f"{step_s:.3f} s per step (median {sorted(times)[len(times) // 2]:.3f} s)")
    for name, s in table.items():
        calls = phases.calls.get(name, 0) / n
        print(f"  {name:38} {s:8.3f} s {100 * s / step_s:6.1f}%   calls/step {calls:6.1f}")
    result = {"workload": args.workload, "model": args.model, "steps": n, "warmup": args.warmup,
              "threads": torch.get_num_threads(), "step_s": step_s, "all_step_s": [round(t, 4) for t in times],
              "phases_s": {k: round(v, 4) for k, v in table.items()},
              "calls_per_step": {k: v / n for k, v in phases.calls.items()}, "versions": benchlib.versions(),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if work.per_iteration.get("ours"):
        facts = grpo_iteration.summarize_work(work, args.warmup)["ours"]["mean"]
        calls = gen_log[args.warmup:]
        rows = calls[0]["rows"] if calls else 0
        facts["finished_row_step_fraction"] = round(
            1 - facts["response_tokens"] / max(rows * facts["generated_columns"], 1), 3)
        result["batch"] = facts
        print("  batch per step: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    if args.profile_out:
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        args.profile_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
