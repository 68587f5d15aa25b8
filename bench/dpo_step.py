"""DPO training step: ours (DPOModule under Lightning's Trainer.fit) vs TRL's DPOTrainer (trl 1.16).

    # in the trl 1.16 venv (bench/README.md: "DPO"), from the repository root
    PYTHONPATH=. python bench/dpo_step.py --model tiny --steps 20 --threads 1
    PYTHONPATH=. python bench/dpo_step.py --model smollm2 --steps 4 --warmup 1 --threads 1 --trainable-layers 2

Workload (identical for both): 4 hh-rlhf harmless pairs (prompt + chosen and prompt + rejected, at most 128
tokens each, the token ids of our PreferenceDataModule on both sides: TRL's own tokenization is skipped) every
step, the same 4 pairs in the same order; the same policy (``load_policy``, the top ``--trainable-layers``
blocks trainable, or all) and the same frozen reference (``load_reference``); sigmoid DPO loss, β = 0.1; a
forward of the 8 sequences, backward, fused ``torch.optim.AdamW`` step (both sides; lr 1e-6, no weight decay,
no gradient clipping, constant lr); fp32, no gradient checkpointing (TRL's ``bf16`` and
``gradient_checkpointing`` off).

TRL runs its default configuration (``precompute_ref_log_probs=False``): the reference forward runs in
every step. Ours computes the reference log-probabilities once, before the first step (``on_fit_start``,
inside the first, dropped, step; its time is reported separately as ``ref_pass_s``). ``--trl-precompute``
runs TRL with ``precompute_ref_log_probs=True`` instead (its pass, in ``train()`` before the first step,
is in its dropped first step too).

Timed: one full step of each framework's own loop (``benchlib``): Lightning's fit loop from batch fetch to
``on_train_batch_end``, transformers' Trainer loop (which DPOTrainer runs) to ``on_step_end``, alternating
ours/TRL in one process after ``--warmup`` steps each. Peak memory: each side alone in a child process.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from reward_step import PAIRS, hh_pairs  # noqa: E402

LR, BETA = 1e-6, 0.1


def add_arguments(parser) -> None:
    parser.add_argument("--trainable-layers", type=int, default=None,
                        help="train only the top N decoder blocks of the policy (both sides; default: all)")
    parser.add_argument("--trl-precompute", action="store_true",
                        help="TRL with precompute_ref_log_probs=True (default: TRL's default, False)")


def load_models(args, dtype: str, device):
    """(policy, reference): same source, same weights; the policy's top ``--trainable-layers`` blocks train."""
    from rlhf_lightning.models import load_policy, load_reference

    name, gguf = benchlib.model_source(args.model)
    policy = load_policy(name, gguf, dtype=dtype, trainable_layers=args.trainable_layers)
    return policy.to(device), load_reference(name, gguf, dtype=dtype).to(device)


def ours_loop(args, tokenizer, pairs, alternation, dtype, device, timings):
    """A callable running Trainer.fit on DPOModule for warmup + steps steps."""
    import lightning as L
    from torch.utils.data import DataLoader

    from rlhf_lightning.data import DPOCollator
    from rlhf_lightning.data.datamodule import ListDataset
    from rlhf_lightning.modules import DPOModule

    total = args.warmup + args.steps
    collator = DPOCollator(tokenizer.pad_token_id)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(ListDataset(pairs * total), batch_size=PAIRS, shuffle=False, collate_fn=collator)

        def reference_dataloader(self):
            return DataLoader(ListDataset(pairs), batch_size=2 * PAIRS, shuffle=False, collate_fn=collator)

    policy, reference = load_models(args, dtype, device)
    module = DPOModule(policy, reference, None, tokenizer,
                       dpo={"beta": BETA, "num_sample_prompts": 0, "optim": {"lr": LR}})
    precompute = module.precompute_reference

    def timed_precompute():
        start = time.perf_counter()
        result = precompute()
        timings["ref_pass_s"] = time.perf_counter() - start
        return result

    module.precompute_reference = timed_precompute

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            alternation.step_end("ours")

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if dtype == "bfloat16" else "32-true", max_steps=total,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Clock()])
    return lambda: trainer.fit(module, datamodule=Data())


def trl_loop(args, tokenizer, pairs, alternation, dtype, device):
    """A callable running TRL's DPOTrainer.train for warmup + steps steps, on our token ids."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that already hold ``prompt_ids``/``chosen_ids``/``rejected_ids`` (ours)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    total = args.warmup + args.steps
    rows = [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs] * total
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-dpo-"), per_device_train_batch_size=PAIRS, max_steps=total,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, beta=BETA,
        loss_type=["sigmoid"], max_length=None, bf16=False, gradient_checkpointing=False,
        precompute_ref_log_probs=args.trl_precompute, precompute_ref_batch_size=2 * PAIRS,
        use_cpu=device.type == "cpu", report_to="none", save_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", seed=0, logging_steps=1)

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            alternation.step_end("trl")

    policy, reference = load_models(args, dtype, device)
    trainer = PretokenizedDPOTrainer(model=policy, ref_model=reference, args=config,
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                     callbacks=[Clock()])
    return trainer.train


def main(argv=None) -> dict | None:
    import torch

    args, tokenizer, device, dtype, sync = benchlib.start(__doc__.splitlines()[0], argv, add_arguments)
    pairs = hh_pairs(tokenizer)
    timings: dict[str, float] = {}
    builders = {"ours": lambda alt: ours_loop(args, tokenizer, pairs, alt, dtype, device, timings),
                "trl": lambda alt: trl_loop(args, tokenizer, pairs, alt, dtype, device)}
    ran = benchlib.run_sides(args, builders, sync, __file__, argv)
    if ran is None:
        return None
    alternation, memory = ran
    lengths = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    policy, _ = load_models(args, dtype, "cpu")
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    extra = {"batch": f"{PAIRS} pairs = {2 * PAIRS} sequences, lengths {lengths}",
             "params": sum(p.numel() for p in policy.parameters()), "trainable_params": trainable,
             "trainable_layers": args.trainable_layers, "trl_precompute_ref_log_probs": args.trl_precompute,
             "ours_ref_pass_s": timings.get("ref_pass_s"), "threads": torch.get_num_threads()}
    return benchlib.report("dpo_step", args, alternation, memory, extra, tokens={"train": sum(lengths)})


if __name__ == "__main__":
    main()
