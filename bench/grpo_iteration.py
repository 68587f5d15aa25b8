"""GRPO iteration: ours (PPOModule, ``adv_estimator=grpo``, under Lightning's Trainer.fit) vs TRL 1.16's GRPOTrainer.

    # in the trl 1.16 venv (bench/README.md: "DPO" and "GRPO"), from the repository root
    PYTHONPATH=. python bench/grpo_iteration.py --model tiny    --steps 10 --warmup 2 --threads 1
    PYTHONPATH=. python bench/grpo_iteration.py --model smollm2 --steps 5  --warmup 1 --threads 1

Workload (identical for both sides, the RLVR demo's shape, ``conf/experiment/demo_rlvr.yaml``): the first
``--prompts`` (8) training prompts of the ``add_mix`` task (``make_splits("add_mix", 131, 40, seed=0)``, e.g.
``What is 4 + 2? Reply with the number only.``), encoded once by our ``encode_prompt`` (the chat template with
its system message and the assistant header; SmolLM2: 45 tokens each) and given to both sides as token ids
(TRL's own tokenization is skipped: a ``GRPOTrainer`` subclass whose ``_tokenize_prompts`` returns ours), the
same 8 prompts every iteration; ``--generations`` (4) responses per prompt (32 sequences), at most
``--max-new-tokens`` (24) sampled tokens at temperature ``--temperature`` (0.7), no top-k/top-p, decoding
stopped when every row has produced EOS (both sides: ours by its loop, TRL by ``generate``); reward = our
``last_number_answer`` (weight 1) + ``soft_overlong_penalty`` (weight 0.5; L_max 24, L_cache 12, tokens) on
both sides (TRL: ``reward_funcs`` + ``reward_weights``); group-normalised advantages (the group's mean and
unbiased std; TRL's ``scale_rewards="group"``); ONE policy update per iteration: the clipped surrogate
(ε 0.2), token-mean over the batch (ours ``loss_agg=token_mean``, TRL's ``loss_type="dapo"``: the same
normaliser with one process and no accumulation), no KL term (ours ``kl_coef=0`` and ``kl_loss_coef=0``, TRL
``beta=0``), old log-probabilities = the detached training forward (ours: one minibatch, ``reuse_first``;
TRL: ``num_iterations=1`` and ``steps_per_generation == gradient_accumulation_steps``, so it computes none),
gradient-norm clip 1.0, fused ``torch.optim.AdamW`` (lr ``--lr`` 5e-5, no weight decay, constant), fp32, no
gradient checkpointing, dropout-free models. The policy (``load_policy``) trains its top
``--trainable-layers`` (4) blocks and the final norm (SmolLM2's tied embeddings/LM head frozen; on the
2-block tiny model every block trains); ours also holds the frozen reference (``load_reference``; PPOModule
requires one) and shares the frozen lower blocks with it (``ppo.share_trunk``, the default).

What differs, on purpose or by design (see docs/benchmarks/history.md, "GRPO"): ours holds a frozen reference
(PPOModule requires one) but runs no reference pass (``ppo.uses_reference`` is false at β = 0 and no KL loss:
nothing reads it; ``objective/kl`` is not logged); TRL with ``beta=0`` loads no reference. Ours prefills each
distinct prompt once for its 4 responses, drops ended rows from the decoded batch, and keeps the frozen lower
blocks' output from the generation (the shared trunk is not run again), then runs only the trained blocks with
autograd; TRL prefills every row, decodes every row to the end of the batch, and runs the whole model in its
training forward with autograd on (the frozen blocks store nothing: no input requires a gradient). Both run the
LM head on the valid completion tokens only (ours: a boolean ``logits_to_keep``; TRL: its fused LM head,
``add_fused_lm_head``). TRL shuffles the 32 rows before its update (no effect on the work). The sampled
responses differ (different random streams), hence so do their lengths: the generated columns and real tokens
of every iteration are recorded per side.

Recorded per side and iteration (``work``): the generated columns and response tokens, and the tokens that
went through the decoder blocks (hooks on every block: rows × columns per call, divided by the number of
blocks, i.e. full-depth token-forwards) in the generation, in forwards with autograd on and off, plus the
optimizer steps; so equal work can be checked, not assumed.

Timed: one iteration of each framework's own loop (``benchlib``): Lightning's fit loop to
``on_train_batch_end`` (PPOModule runs one whole iteration per ``training_step``), transformers' Trainer loop
(which GRPOTrainer runs, generation inside its ``training_step``) to ``on_step_end``, alternating ours/TRL
in one process after ``--warmup`` iterations each. Generation is timed separately on both sides (our
``rollout.generate`` as PPOModule calls it; TRL's ``model.generate``) for the generation tokens/s:
rows × generated columns per second of the median call (every row is computed at every column, finished or
not). Peak memory: each side alone in a child process (``benchlib``).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PROMPTS, GENERATIONS, NEW_TOKENS, TEMPERATURE, TRAINABLE_LAYERS, LR = 8, 4, 24, 0.7, 4, 5e-5
TASK, N_TRAIN, N_HELDOUT = "add_mix", 131, 40  # the RLVR demo's split (bench/rlvr_task.md)
CLIP_EPS, MAX_GRAD_NORM = 0.2, 1.0
#: The RLVR demo's reward (conf/experiment/demo_rlvr.yaml), on both sides.
REWARD_SPECS = [
    {"fn": "rlhf_lightning.rewards.verifiers.last_number_answer", "weight": 1.0},
    {"fn": "rlhf_lightning.rewards.verifiers.soft_overlong_penalty", "weight": 0.5,
     "kwargs": {"max_length": NEW_TOKENS, "cache_length": 12, "unit": "tokens"}},
]


def add_arguments(parser) -> None:
    """This script's own options (the workload's shape)."""
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per iteration")
    parser.add_argument("--generations", type=int, default=GENERATIONS, help="responses per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS, help="response length cap")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--trainable-layers", type=int, default=TRAINABLE_LAYERS,
                        help="train the top N blocks (both sides; more than the model has: all)")
    parser.add_argument("--lr", type=float, default=LR)


def task_prompts(tokenizer, n: int) -> list[dict]:
    """The first ``n`` training rows of the demo's ``add_mix`` split, each with ``messages`` (the chat prompt)
    and ``ids`` (its token ids by our ``encode_prompt``) added."""
    from rlhf_lightning.data.rlvr import make_splits
    from rlhf_lightning.data.rows import extract_prompt
    from rlhf_lightning.data.tokenization import encode_prompt

    rows, _ = make_splits(TASK, N_TRAIN, N_HELDOUT, seed=0)
    out = []
    for i, row in enumerate(rows[:n]):
        messages = extract_prompt(row, f"{TASK} row {i}")
        out.append({**row, "messages": messages, "ids": encode_prompt(tokenizer, messages)})
    return out


def load_policy_and_reference(args, dtype: str, device, reference: bool):
    """The policy (top ``--trainable-layers`` blocks trainable) and, for ours, the frozen reference; same
    source and weights on both sides."""
    from rlhf_lightning.models import load_policy, load_reference

    name, gguf = benchlib.model_source(args.model)
    policy = load_policy(name, gguf, dtype=dtype, trainable_layers=args.trainable_layers).to(device)
    return policy, (load_reference(name, gguf, dtype=dtype).to(device) if reference else None)


# --------------------------------------------------------------------------- work counters
class Work:
    """Per-side counts of the work each iteration does, from forward pre-hooks on every decoder block.

    ``counts[side]`` (a Counter, reset at each step end into ``per_iteration[side]``):

    * ``generate_tokens`` / ``grad_tokens`` / ``no_grad_tokens``: rows × columns entering the decoder blocks,
      summed over blocks and divided by the number of blocks (full-depth token-forwards, floats), during a
      generate call, and outside it with autograd on / off;
    * ``generated_columns``, ``response_tokens``, ``sequence_tokens``, ``sequence_cells``: from the generate
      calls: the columns decoded, the response tokens up to and including EOS, and the real and total
      (rows × columns) tokens of the prompt + response sequences the training forward reads (padding waste =
      1 − tokens / cells);
    * ``optimizer_steps``.
    """

    def __init__(self):
        self.counts: dict[str, Counter] = {}
        self.per_iteration: dict[str, list[dict]] = {}
        self.generating: dict[str, bool] = {}
        self._thread_side: dict[int, str] = {}
        self._hook = None
        self._lock = threading.Lock()

    def add_side(self, side: str, *models) -> None:
        """Start counting for ``side``, the decoder blocks of ``models`` included (:meth:`count_blocks`)."""
        self.counts[side], self.per_iteration[side], self.generating[side] = Counter(), [], False
        self.count_blocks(side, *models)

    def count_blocks(self, side: str, *models) -> None:
        """Count the tokens entering every decoder block of ``models`` (``None`` entries skipped) for ``side``."""
        from rlhf_lightning.models.parts import decoder_layers

        for model in models:
            if model is None:
                continue
            layers = decoder_layers(model)
            for layer in layers:
                layer.register_forward_pre_hook(self._block_hook(side, len(layers)), with_kwargs=True)

    def _block_hook(self, side: str, depth: int):
        import torch

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows_cols = hidden.shape[0] * hidden.shape[1]
            key = ("generate_tokens" if self.generating[side] else
                   "grad_tokens" if torch.is_grad_enabled() else "no_grad_tokens")
            self.counts[side][key] += rows_cols / depth

        return hook

    def bind_thread(self, side: str) -> None:
        """The calling thread's optimizer steps count for ``side`` (each side's loop runs in its own thread)."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        with self._lock:
            self._thread_side[threading.get_ident()] = side
            if self._hook is None:
                def count_step(optimizer, args, kwargs):
                    owner = self._thread_side.get(threading.get_ident())
                    if owner is not None:
                        self.counts[owner]["optimizer_steps"] += 1

                self._hook = register_optimizer_step_post_hook(count_step)

    def record_generation(self, side: str, prompt_mask, response, eos_ids) -> None:
        """Count a generate call's columns, response tokens (to the first EOS, inclusive) and sequence cells.

        Args:
            prompt_mask: (N, P) the prompts' attention mask. response: (N, R) long sampled tokens.
            eos_ids: the EOS ids that end a response.
        """
        import torch

        is_eos = torch.isin(response, torch.as_tensor(eos_ids, device=response.device))
        seen = is_eos.long().cumsum(1)
        valid = (seen == 0) | (is_eos & (seen == 1))  # up to and including the first EOS
        rows, cols = response.shape
        c = self.counts[side]
        c["generated_columns"] += cols
        c["response_tokens"] += int(valid.sum())
        c["sequence_tokens"] += int(prompt_mask.sum()) + int(valid.sum())
        c["sequence_cells"] += rows * (prompt_mask.shape[1] + cols)

    def step_end(self, side: str) -> None:
        """Close ``side``'s iteration: its counts go to ``per_iteration[side]``."""
        self.per_iteration[side].append({k: round(v, 1) if isinstance(v, float) else v
                                         for k, v in self.counts[side].items()})
        self.counts[side] = Counter()


def timed_generation(fn, side: str, work: Work, log: list, sync, split):
    """``fn`` wrapped: each call's seconds and generated columns appended to ``log``, its tokens counted in
    ``work``; ``split(args, kwargs, out)`` -> (prompt attention mask (N, P), response tokens (N, R))."""

    def wrapper(*args, **kwargs):
        if sync:
            sync()
        work.generating[side] = True
        start = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            if sync:
                sync()
        finally:
            work.generating[side] = False
        seconds = time.perf_counter() - start
        prompt_mask, response = split(args, kwargs, out)
        work.record_generation(side, prompt_mask, response, wrapper.eos_ids)
        log.append({"rows": response.shape[0], "columns": response.shape[1], "seconds": seconds})
        return out

    wrapper.eos_ids = None
    return wrapper


# --------------------------------------------------------------------------- the two loops
def ours_loop(args, tokenizer, rows, alternation, dtype, device, work: Work, gen_log: list, sync):
    """A callable running Trainer.fit on PPOModule (GRPO) for warmup + steps iterations."""
    import lightning as L
    from torch.utils.data import DataLoader

    import rlhf_lightning.modules.ppo as ppo_module
    from rlhf_lightning.data import PromptCollator
    from rlhf_lightning.data.preference import ListDataset
    from rlhf_lightning.modules import PPOModule

    total = args.warmup + args.steps
    policy, reference = load_policy_and_reference(args, dtype, device, reference=True)
    work.add_side("ours", policy, reference)
    if not hasattr(ppo_module.generate, "bench_plain"):  # PPOModule.collect calls modules.ppo.generate
        plain = ppo_module.generate
        ppo_module.generate = timed_generation(
            plain, "ours", work, gen_log, sync,
            lambda a, k, ro: (ro.attention_mask[:, : ro.response_start], ro.response_ids))
        ppo_module.generate.bench_plain = plain
    ppo_module.generate.eos_ids = [tokenizer.eos_token_id]

    class Prompts(L.LightningDataModule):
        """The same ``--prompts`` prompts every iteration, with the columns the reward functions read."""

        prompts = [r["messages"] for r in rows]

        def columns(self, prompt_index):
            return {"answer": [rows[int(i)]["answer"] for i in prompt_index]}

        def train_dataloader(self):
            items = [{"input_ids": r["ids"], "prompt_index": i} for i, r in enumerate(rows)]
            return DataLoader(ListDataset(items * total), batch_size=len(rows), shuffle=False,
                              collate_fn=PromptCollator(tokenizer.pad_token_id))

    ppo = {"adv_estimator": "grpo", "num_generations": args.generations, "kl_coef": 0.0, "kl_loss_coef": 0.0,
           "ppo_epochs": 1, "num_minibatches": 1, "loss_agg": "token_mean", "clip_eps": CLIP_EPS,
           "max_grad_norm": MAX_GRAD_NORM, "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
           "generation": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}}
    module = PPOModule(policy, reference, None, None, tokenizer, ppo=ppo, policy_optim={"lr": args.lr},
                       reward_functions=REWARD_SPECS)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            work.bind_thread("ours")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            work.step_end("ours")
            alternation.step_end("ours")

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if dtype == "bfloat16" else "32-true",
                        max_steps=module.optimizer_steps_per_iteration * total, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])
    return lambda: trainer.fit(module, datamodule=Prompts())


def trl_reward_functions() -> tuple[list, list[float]]:
    """``REWARD_SPECS`` as TRL takes them: named callables (TRL logs ``__name__``) and their weights."""
    from rlhf_lightning.rewards.functions import load_reward_functions

    functions = []
    for loaded in load_reward_functions(REWARD_SPECS):
        def call(*a, _fn=loaded.fn, **k):
            return _fn(*a, **k)

        call.__name__ = loaded.name
        functions.append(call)
    return functions, [spec["weight"] for spec in REWARD_SPECS]


def trl_loop(args, tokenizer, rows, alternation, dtype, device, work: Work, gen_log: list, sync):
    """A callable running TRL's GRPOTrainer.train for warmup + steps iterations, on our prompt token ids."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ids_of = {r["prompt"]: r["ids"] for r in rows}

    class PretokenizedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose prompts (plain strings, the task's question) map to our token ids."""

        def _tokenize_prompts(self, prompts):
            return [list(ids_of[p]) for p in prompts], None, {}

    total = args.warmup + args.steps
    policy, _ = load_policy_and_reference(args, dtype, device, reference=False)
    work.add_side("trl", policy)
    policy.generate = timed_generation(policy.generate, "trl", work, gen_log, sync,
                                       lambda a, k, out: (k["attention_mask"], out[:, k["input_ids"].shape[1]:]))
    n = len(rows) * args.generations
    functions, weights = trl_reward_functions()
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-grpo-"), per_device_train_batch_size=n,
        gradient_accumulation_steps=1, num_generations=args.generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, beta=0.0, num_iterations=1, epsilon=CLIP_EPS,
        loss_type="dapo", scale_rewards="group", reward_weights=weights, mask_truncated_completions=False,
        shuffle_dataset=False, max_steps=total, bf16=False, gradient_checkpointing=False,
        use_cpu=device.type == "cpu", report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10,
        log_completions=False, seed=0)

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            work.bind_thread("trl")

        def on_step_end(self, args_, state, control, **kwargs):
            work.step_end("trl")
            alternation.step_end("trl")

    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    trainer = PretokenizedGRPOTrainer(model=policy, reward_funcs=functions, args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[Clock()])
    policy.generate.eos_ids = list(trainer.eos_token_ids)
    return trainer.train


# --------------------------------------------------------------------------- report
def summarize_work(work: Work, warmup: int) -> dict:
    """Per side: the timed iterations' counts (lists) and their per-iteration means."""
    out = {}
    for side, iterations in work.per_iteration.items():
        timed = iterations[warmup:]
        keys = sorted({k for it in timed for k in it})
        out[side] = {"per_iteration": timed,
                     "mean": {k: round(sum(it.get(k, 0) for it in timed) / max(len(timed), 1), 1) for k in keys}}
        mean = out[side]["mean"]
        if mean.get("sequence_cells"):
            mean["padding_fraction"] = round(1 - mean["sequence_tokens"] / mean["sequence_cells"], 3)
    return out


def main(argv=None) -> dict | None:
    import torch

    args, tokenizer, device, dtype, sync = benchlib.start(__doc__.splitlines()[0], argv, add_arguments)
    rows = task_prompts(tokenizer, args.prompts)
    work = Work()
    gen_logs = {side: [] for side in benchlib.SIDES}
    builders = {side: (lambda alt, side=side, loop=loop: loop(args, tokenizer, rows, alt, dtype, device, work,
                                                               gen_logs[side], sync))
                for side, loop in (("ours", ours_loop), ("trl", trl_loop))}
    torch.manual_seed(0)
    ran = benchlib.run_sides(args, builders, sync, __file__, argv)
    if ran is None:
        return None
    alternation, memory = ran
    rates, real_rates, gen_median = {}, {}, {}
    for side, log in gen_logs.items():
        calls = sorted(log[args.warmup:], key=lambda c: c["seconds"])
        if calls:
            mid = calls[len(calls) // 2]
            gen_median[side] = mid
            rates[side] = mid["rows"] * mid["columns"] / mid["seconds"]
    summary = summarize_work(work, args.warmup)
    for side, mean in ((s, w["mean"]) for s, w in summary.items()):
        seconds = sum(c["seconds"] for c in gen_logs[side][args.warmup:])
        if seconds and mean.get("response_tokens"):
            real_rates[side] = mean["response_tokens"] * len(gen_logs[side][args.warmup:]) / seconds
    policy, _ = load_policy_and_reference(args, dtype, "cpu", reference=False)
    extra = {"batch": f"{args.prompts} prompts x {args.generations} responses, prompt lengths "
                      f"{[len(r['ids']) for r in rows]}, <= {args.max_new_tokens} sampled tokens at T "
                      f"{args.temperature}", "task": TASK,
             "params": sum(p.numel() for p in policy.parameters()),
             "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
             "trainable_layers": args.trainable_layers, "lr": args.lr, "threads": torch.get_num_threads(),
             "generate_median_call": gen_median, "work": summary}
    result = benchlib.report("grpo_iteration", args, alternation, memory, extra)
    result["generation_tokens_per_s"] = rates  # rows x generated columns / s, median call
    result["generation_response_tokens_per_s"] = real_rates  # response tokens up to EOS / s, all timed calls
    for side in rates:
        print(f"  {side}: generation {rates[side]:.1f} tokens/s (rows x columns, median call), "
              f"{real_rates.get(side, float('nan')):.1f} response tokens/s; per iteration: "
              + ", ".join(f"{k} {v}" for k, v in summary[side]["mean"].items()))
    if "ours" in rates and "trl" in rates:
        result["generation_tokens_per_s_ratio"] = rates["ours"] / rates["trl"]
        print(f"  generation tokens/s ratio (ours/TRL): {result['generation_tokens_per_s_ratio']:.3f}")
    benchlib.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
