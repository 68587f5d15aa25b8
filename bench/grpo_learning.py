"""RLVR learning per CPU second: ours (the RLVR demo's GRPO) vs TRL 1.16's GRPOTrainer, one side and seed per call.

    # in the trl 1.16 venv (bench/README.md, "GRPO"), from the repository root; one JSON per side and seed
    PYTHONPATH=. python bench/grpo_learning.py --side ours --seed 0 --out bench/results/learning/ours_s0.json
    PYTHONPATH=. python bench/grpo_learning.py --side trl  --seed 0 --chunk 10 --out bench/results/learning/trl_s0.json
    PYTHONPATH=. python bench/grpo_learning.py --summary bench/results/learning/*.json   # the ratio over seeds

Workload: the RLVR demo (``conf/experiment/demo_rlvr.yaml``, ``scripts/demo_rlvr.sh``) on both sides: the
``add_mix`` task's split (``make_splits("add_mix", 131, 40, seed=0)``: 131 training and 40 held-out prompts),
the training prompts shuffled by ``--seed`` (each side its own seeded shuffle), ``--iterations`` (40) iterations
of 8 prompts × 4 responses, ≤ 24 sampled tokens at T 0.7, reward ``last_number_answer`` + 0.5 ·
``soft_overlong_penalty``, group-normalised advantages, one update per iteration (clip 0.2, token mean, no KL,
gradient clip 1.0, AdamW lr 5e-5 constant), the top 4 blocks trained; every other setting as
``bench/grpo_iteration.py`` sets it (TRL: ``GRPOConfig`` there, with ``shuffle_dataset=True`` and ``seed``).
Ours is PPOModule with the demo's settings (``adv_estimator=grpo``, ``ppo.uses_reference`` false: no reference
pass), in ``Trainer.fit``.

Measured: the CPU seconds (``time.process_time``: user + system of every thread of this process) of the
training loop alone (``Trainer.fit`` / ``GRPOTrainer.train``, model loading and evaluation excluded), and the
held-out accuracy of the policy before (the base model) and after training, by ONE evaluation for both sides:
greedy decoding of ≤ 24 tokens on the 40 held-out prompts with our sampler, scored by ``last_number_answer``
(the demo's ``eval/reward/last_number_answer``). Learning per CPU second = (accuracy after − before) / CPU
seconds; ``--summary`` gives each side's mean over seeds and their ratio (ours / TRL).

TRL's loop takes ~40 s an iteration on SmolLM2 here; ``--chunk N`` runs it N iterations per call (a
checkpoint under ``--work-dir`` holds the model, optimizer and RNG states between calls; call again with the
same arguments until the JSON is written), so that no call holds the shared lock for long.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import grpo_iteration  # noqa: E402

PROMPTS, ITERATIONS = 8, 40


def heldout_accuracy(policy, tokenizer, rows: list[dict]) -> float:
    """Share of ``rows`` (held-out prompts with ``ids`` and ``answer``) whose greedy response (≤ 24 tokens, our
    sampler) ``last_number_answer`` scores 1."""
    import torch

    from rlhf_lightning.data import PromptCollator
    from rlhf_lightning.rewards.verifiers import last_number_answer
    from rlhf_lightning.rollout.sampler import GenerationConfig, generate

    items = [{"input_ids": r["ids"], "prompt_index": i} for i, r in enumerate(rows)]
    batch = PromptCollator(tokenizer.pad_token_id)(items)
    config = GenerationConfig(max_new_tokens=grpo_iteration.NEW_TOKENS, temperature=grpo_iteration.TEMPERATURE)
    with torch.no_grad():
        ro = generate(policy, batch["input_ids"], batch["attention_mask"], config, tokenizer.eos_token_id,
                      tokenizer.pad_token_id, do_sample=False)
    completions = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
    scores = last_number_answer(completions, answer=[r["answer"] for r in rows])
    return sum(1.0 for s in scores if s == 1.0) / len(rows)


def split_rows(tokenizer) -> tuple[list[dict], list[dict]]:
    """The demo's training and held-out rows, each with ``messages`` and our token ids ``ids``."""
    from rlhf_lightning.data.rlvr import make_splits
    from rlhf_lightning.data.rows import extract_prompt
    from rlhf_lightning.data.tokenization import encode_prompt

    train, heldout = make_splits(grpo_iteration.TASK, grpo_iteration.N_TRAIN, grpo_iteration.N_HELDOUT, seed=0)

    def encode(rows, name):
        out = []
        for i, row in enumerate(rows):
            messages = extract_prompt(row, f"{name} row {i}")
            out.append({**row, "messages": messages, "ids": encode_prompt(tokenizer, messages)})
        return out

    return encode(train, "train"), encode(heldout, "heldout")


def train_ours(args, tokenizer, rows: list[dict]):
    """PPOModule (the demo's GRPO) trained ``--iterations`` iterations; returns (policy, CPU seconds of fit)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from rlhf_lightning.data import PromptCollator
    from rlhf_lightning.data.datamodule import ListDataset
    from rlhf_lightning.modules import PPOModule

    L.seed_everything(args.seed)
    policy, reference = grpo_iteration.load_policy_and_reference(args, "float32", torch.device("cpu"), True)

    class Prompts(L.LightningDataModule):
        prompts = [r["messages"] for r in rows]

        def columns(self, prompt_index):
            return {"answer": [rows[int(i)]["answer"] for i in prompt_index]}

        def train_dataloader(self):
            items = [{"input_ids": r["ids"], "prompt_index": i} for i, r in enumerate(rows)]
            return DataLoader(ListDataset(items), batch_size=PROMPTS, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed),
                              collate_fn=PromptCollator(tokenizer.pad_token_id))

    ppo = {"adv_estimator": "grpo", "num_generations": grpo_iteration.GENERATIONS, "kl_coef": 0.0,
           "kl_loss_coef": 0.0, "ppo_epochs": 1, "num_minibatches": 1, "loss_agg": "token_mean",
           "clip_eps": grpo_iteration.CLIP_EPS, "max_grad_norm": grpo_iteration.MAX_GRAD_NORM,
           "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
           "generation": {"max_new_tokens": grpo_iteration.NEW_TOKENS, "temperature": grpo_iteration.TEMPERATURE}}
    module = PPOModule(policy, reference, None, None, tokenizer, ppo=ppo, policy_optim={"lr": grpo_iteration.LR},
                       reward_functions=grpo_iteration.REWARD_SPECS)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=module.optimizer_steps_per_iteration * args.iterations,
                        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    start = time.process_time()
    trainer.fit(module, datamodule=Prompts())
    return policy, time.process_time() - start, {"iterations": module.iteration}


def train_trl(args, tokenizer, rows: list[dict]):
    """TRL's GRPOTrainer on the same prompts, ``--chunk`` iterations per call; returns (policy, CPU seconds of
    this call's ``train``, facts), the policy ``None`` until the last chunk."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ids_of = {r["prompt"]: r["ids"] for r in rows}

    class PretokenizedGRPOTrainer(GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            return [list(ids_of[p]) for p in prompts], None, {}

    work = args.work_dir / f"trl_s{args.seed}"
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    done = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
    stop_at = min(args.iterations, done + (args.chunk or args.iterations))
    policy, _ = grpo_iteration.load_policy_and_reference(args, "float32", torch.device("cpu"), False)
    functions, weights = grpo_iteration.trl_reward_functions()
    n = PROMPTS * grpo_iteration.GENERATIONS
    config = GRPOConfig(
        output_dir=str(work), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=grpo_iteration.GENERATIONS, max_completion_length=grpo_iteration.NEW_TOKENS,
        temperature=grpo_iteration.TEMPERATURE, top_p=1.0, top_k=0, learning_rate=grpo_iteration.LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=grpo_iteration.MAX_GRAD_NORM, beta=0.0,
        num_iterations=1, epsilon=grpo_iteration.CLIP_EPS, loss_type="dapo", scale_rewards="group",
        reward_weights=weights, mask_truncated_completions=False, shuffle_dataset=True, max_steps=args.iterations,
        bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="steps",
        save_steps=args.chunk or args.iterations, save_only_model=False, disable_tqdm=True, logging_steps=10,
        log_completions=False, seed=args.seed)

    class StopAt(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step >= stop_at:
                control.should_training_stop = True
                control.should_save = stop_at < args.iterations

    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    trainer = PretokenizedGRPOTrainer(model=policy, reward_funcs=functions, args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[StopAt()])
    start = time.process_time()
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.process_time() - start
    facts = {"iterations": trainer.state.global_step, "from_iteration": done}
    return (policy if trainer.state.global_step >= args.iterations else None), seconds, facts


def summary(paths: list[Path]) -> dict:
    """Each side's per-seed results, means, and the ratio of the mean learning per CPU second (ours / TRL)."""
    results = [json.loads(p.read_text()) for p in paths]
    out: dict = {"runs": results, "sides": {}}
    for side in ("ours", "trl"):
        runs = [r for r in results if r["side"] == side]
        if runs:
            out["sides"][side] = {
                "seeds": [r["seed"] for r in runs],
                "gain_mean": statistics.mean(r["accuracy_after"] - r["accuracy_before"] for r in runs),
                "cpu_seconds_mean": statistics.mean(r["cpu_seconds"] for r in runs),
                "gain_per_cpu_second_mean": statistics.mean(r["gain_per_cpu_second"] for r in runs)}
    if len(out["sides"]) == 2:
        ours, trl = out["sides"]["ours"], out["sides"]["trl"]
        out["ratio_of_means"] = ((ours["gain_mean"] / ours["cpu_seconds_mean"]) /
                                 (trl["gain_mean"] / trl["cpu_seconds_mean"]) if trl["gain_mean"] else None)
    return out


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "trl"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--chunk", type=int, default=0, help="TRL: iterations per call (0: all)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--trainable-layers", type=int, default=grpo_iteration.TRAINABLE_LAYERS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/grpo_learning"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summary", type=Path, nargs="*")
    args = parser.parse_args(argv)
    if args.summary:
        result = summary(args.summary)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        benchlib.write_result(args.out, result)
        return result
    import torch

    torch.set_num_threads(1)
    benchlib.quiet()
    from rlhf_lightning.models import load_tokenizer

    name, gguf = benchlib.model_source(args.model)
    tokenizer = load_tokenizer(name, gguf)
    train, heldout = split_rows(tokenizer)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / f"{args.side}_s{args.seed}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"cpu_seconds": 0.0, "calls": []}
    if "accuracy_before" not in state:
        base, _ = grpo_iteration.load_policy_and_reference(args, "float32", torch.device("cpu"), False)
        state["accuracy_before"] = heldout_accuracy(base, tokenizer, heldout)
    policy, seconds, facts = (train_ours if args.side == "ours" else train_trl)(args, tokenizer, train)
    state["cpu_seconds"] += seconds
    state["calls"].append({**facts, "cpu_seconds": seconds})
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    if policy is None:
        print(f"{args.side} seed {args.seed}: {facts['iterations']} of {args.iterations} iterations; call again")
        return None
    after = heldout_accuracy(policy, tokenizer, heldout)
    result = {"side": args.side, "seed": args.seed, "iterations": args.iterations, "model": args.model,
              "accuracy_before": state["accuracy_before"], "accuracy_after": after,
              "cpu_seconds": state["cpu_seconds"], "calls": state["calls"],
              "gain_per_cpu_second": (after - state["accuracy_before"]) / state["cpu_seconds"],
              "versions": benchlib.versions()}
    print(json.dumps({k: v for k, v in result.items() if k not in ("calls", "versions")}))
    benchlib.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
