"""Reward-model training step: ours (RewardModule under Lightning's Trainer.fit) vs TRL's RewardTrainer.

    PYTHONPATH=. python bench/reward_step.py --model tiny --steps 20
    PYTHONPATH=. python bench/reward_step.py --model smollm2 --steps 10

Workload (identical for both): 4 hh-rlhf harmless pairs (prompt+chosen, prompt+rejected, at most
128 tokens each, right-padded to the batch's longest) every step, the same 4 pairs in the same order;
the same model (``load_scalar_model``, same seed: same weights and head); a forward of the 8
sequences, Bradley-Terry loss + 0.01 centering (ours ``center_coef``, TRL ``center_rewards_coefficient``),
backward, fused ``torch.optim.AdamW`` step (both sides: TRL's default ``adamw_torch_fused``; lr 1e-5,
no weight decay, no gradient clipping, constant lr).
TRL runs with ``bf16=False`` and ``gradient_checkpointing=False`` (its defaults are True), like ours.

``--lora R`` adds a third side, ``ours_lora``: ours with LoRA adapters of rank R (alpha 32, every linear
layer of every block) and the head trained in full; same workload and lr.

Timed: one full step of each framework's own loop (see ``benchlib``): Lightning's fit loop from
batch fetch to ``on_train_batch_end``, and transformers' Trainer loop (which RewardTrainer runs)
to ``on_step_end``, alternating ours/TRL in one process after ``--warmup`` steps each. Peak memory:
each side alone in a child process.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PAIRS, MAX_LENGTH, LR, CENTER = 4, 128, 1e-5, 0.01


def hh_pairs(tokenizer, n: int = PAIRS, max_length: int = MAX_LENGTH) -> list[dict]:
    """The first ``n`` hh-rlhf harmless pairs of a seeded subset, tokenized and truncated to
    ``max_length`` tokens by our PreferenceDataModule: dicts of ``prompt_ids``/``chosen_ids``/``rejected_ids``."""
    from rlhf_lightning.data import PreferenceDataModule

    dm = PreferenceDataModule(tokenizer, str(benchlib.DATA), max_length=max_length, val_size=0, limit=4 * n,
                              batch_size=n, seed=0)
    dm.setup()
    return dm.train_dataset.items[:n]


def load_model(args, tokenizer, dtype: str, device, lora: dict | None = None):
    """The scalar model every side trains: same source, same seed, padding id of the tokenizer; ``lora``: its
    ``model.lora`` (``None``: full fine-tuning)."""
    from rlhf_lightning.models import load_scalar_model

    name, gguf = benchlib.model_source(args.model)
    model = load_scalar_model(name, gguf, dtype=dtype, seed=0, lora=lora)
    model.config.pad_token_id = tokenizer.pad_token_id  # TRL's model pools at the last non-pad token
    return model.to(device)


def ours_loop(args, tokenizer, pairs, alternation, dtype, device, side: str = "ours"):
    """A callable running Trainer.fit on RewardModule for warmup + steps steps (``side`` ours_lora: with
    ``--lora``'s adapters)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from rlhf_lightning.data import PreferenceCollator
    from rlhf_lightning.data.datamodule import ListDataset
    from rlhf_lightning.modules import RewardModule

    total = args.warmup + args.steps
    model = load_model(args, tokenizer, dtype, device, benchlib.lora_settings(args, side))
    module = RewardModule(model, tokenizer, optim={"lr": LR}, center_coef=CENTER)
    loader = DataLoader(ListDataset(pairs * total), batch_size=PAIRS, shuffle=False,
                        collate_fn=PreferenceCollator(tokenizer.pad_token_id))

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            alternation.step_end(side)

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if dtype == "bfloat16" else "32-true", max_steps=total,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Clock()])
    return lambda: trainer.fit(module, train_dataloaders=loader)


def trl_loop(args, tokenizer, pairs, alternation, dtype, device):
    """A callable running TRL's RewardTrainer.train for warmup + steps steps."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    total = args.warmup + args.steps
    rows = [{"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"]}
            for p in pairs] * total
    config = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-reward-"), per_device_train_batch_size=PAIRS, max_steps=total,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        center_rewards_coefficient=CENTER, max_length=None, bf16=False, gradient_checkpointing=False,
        use_cpu=device.type == "cpu", report_to="none", save_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", seed=0)

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            alternation.step_end("trl")

    trainer = RewardTrainer(model=load_model(args, tokenizer, dtype, device), args=config,
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Clock()])
    return trainer.train


def main(argv=None) -> dict | None:
    import torch

    args, tokenizer, device, dtype, sync = benchlib.start(__doc__.splitlines()[0], argv)
    pairs = hh_pairs(tokenizer)
    builders = {"ours": lambda alt: ours_loop(args, tokenizer, pairs, alt, dtype, device),
                "trl": lambda alt: trl_loop(args, tokenizer, pairs, alt, dtype, device)}
    if args.lora:
        builders[benchlib.LORA_SIDE] = lambda alt: ours_loop(args, tokenizer, pairs, alt, dtype, device,
                                                             benchlib.LORA_SIDE)
    ran = benchlib.run_sides(args, builders, sync, __file__, argv)
    if ran is None:
        return None
    alternation, memory = ran
    lengths = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    tokens = sum(lengths)
    n_params = sum(p.numel() for p in load_model(args, tokenizer, dtype, "cpu").parameters())
    extra = {"batch": f"{PAIRS} pairs = {2 * PAIRS} sequences, lengths {lengths}, padded to {max(lengths)}",
             "params": n_params, "threads": torch.get_num_threads(), "lora_r": args.lora,
             "lora_layers": args.lora_layers}
    return benchlib.report("reward_step", args, alternation, memory, extra, tokens={"train": tokens},
                           flops_per_step=6 * n_params * tokens)


if __name__ == "__main__":
    main()
