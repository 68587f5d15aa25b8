"""The runs of the N-ranks ≡ 1-rank tests (``tests/test_equivalence.py``): one function builds a stage's module, data
and trainer for a case and trains it for two steps, in one process with batch B or in each of N processes with
B / N; what it writes (trained weights, logged metrics) is compared by the tests.

Run as a script under ``torchrun`` it trains every case given on the command line in the same N processes (Lightning
finds the torchrun environment and starts no process of its own), one after the other:

    python -m torch.distributed.run --nproc_per_node 2 tests/equivalence_runs.py OUT_DIR MODEL_DIR DATA_FILE CASE...
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import lightning as L
import torch

#: Prompts answered (or preference pairs) per optimizer step over all processes, and the steps (PPO: iterations).
GLOBAL_BATCH, STEPS = 4, 2
#: Logged metrics compared, by prefix (every stage's own: objective/*, value/*, train and val losses, evaluation).
COMPARED = ("objective/", "value/", "ppo/", "train/", "val/", "rewards/", "logps/", "rollout/", "response/",
            "diagnostics/", "eval/", "reward/")

#: case -> (stage, PPO settings or the stage's keyword arguments). PPO cases: GAE with two optimizers, with the joint
#: one and the adaptive KL controller; each critic-free estimator (DAPO: dynamic sampling over a reward that is flat
#: for some prompts); LoRA with the critic on the policy's base and a critic warm-up iteration.
CASES: dict[str, tuple[str, dict]] = {
    "reward": ("reward", {}),
    # the reward stage on part 1 of 2 of its pairs with the frozen block's output cached by dataset index, for
    # 2 epochs and some (the cache computes in the first, reads in the second and in the validation passes)
    "reward_part_cache": ("reward", {"train_part": [1, 2], "cache_trunk": True, "steps": 7}),
    "value": ("value", {}),
    "dpo": ("dpo", {}),
    "ppo_gae": ("ppo", {"ppo_epochs": 2}),
    "ppo_gae_joint_adaptive_kl": ("ppo", {"ppo_epochs": 2, "joint_optimizer": True, "adaptive_kl": True,
                                          "kl_horizon": 10.0, "kl_loss_coef": 0.1}),
    "grpo": ("ppo", {"adv_estimator": "grpo", "num_generations": 2, "loss_agg": "seq_mean_token_mean",
                     "kl_loss_coef": 0.1}),
    "dr_grpo": ("ppo", {"adv_estimator": "dr_grpo", "num_generations": 2, "loss_agg": "seq_mean_token_sum_norm",
                        "kl_coef": 0.0}),
    "dapo": ("ppo", {"adv_estimator": "grpo", "num_generations": 2, "kl_coef": 0.0, "clip_eps_high": 0.28,
                     "loss_agg": "token_mean", "dynamic_sampling": True, "max_resample_rounds": 2,
                     "reward": "flat_for_some_prompts"}),
    "rloo": ("ppo", {"adv_estimator": "rloo", "num_generations": 2}),
    "reinforce_pp": ("ppo", {"adv_estimator": "reinforce_pp"}),
    "reinforce_pp_baseline": ("ppo", {"adv_estimator": "reinforce_pp_baseline", "num_generations": 2}),
    "gspo": ("ppo", {"adv_estimator": "grpo", "num_generations": 2, "ratio_level": "sequence", "clip_eps": 0.2,
                     "loss_agg": "seq_mean_token_mean"}),
    "lora_share_base_warmup": ("ppo", {"ppo_epochs": 2, "critic_warmup_iterations": 1, "lora": True}),
}
#: Cases run in 2 processes only (their reward depends on the rank): DAPO with a reward flat on rank 0's prompts only.
TWO_PROCESS_CASES: dict[str, tuple[str, dict]] = {
    "dapo_flat_on_rank_0": ("ppo", {**CASES["dapo"][1], "reward": "flat_on_rank_0"}),
}


def flat_for_some_prompts(completions, prompts=None, **kwargs) -> list[float]:
    """A reward function (TRL's signature) that is flat for the prompts whose text hashes to an even number (every
    response 1.0) and the response's length in characters for the others: DAPO's dynamic sampling has flat groups
    to replace."""
    return [1.0 if zlib.crc32(str(p).encode()) % 2 == 0 else float(len(c)) for c, p in zip(completions, prompts,
                                                                                             strict=True)]


def flat_on_rank_0(completions, **kwargs) -> list[float]:
    """Flat (1.0) for every response on rank 0, the response's length on the other ranks: rank 0 alone wants to
    draw more prompts (before issue 21 its extra generation met rank 1's gradient all-reduce)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return [1.0 if rank == 0 else float(len(c)) for c in completions]


class Recorder(L.Callback):
    """Keeps the compared metrics Lightning holds after every training step and validation (reduced over ranks),
    the trainable parameters at the start, and what the reward stage's trunk cache held at the end."""

    def __init__(self):
        self.metrics: list[dict[str, float]] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.trunk_cache: tuple[int, int, int] | None = None  # (sequences kept, computed, read) of this rank

    def on_train_end(self, trainer, pl_module):
        cache = getattr(pl_module, "trunk_cache", None)
        if cache is not None:
            self.trunk_cache = (len(cache), cache.misses, cache.hits)

    def on_train_start(self, trainer, pl_module):
        self.initial = trainable(pl_module)

    def _keep(self, trainer):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(COMPARED)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._keep(trainer)


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, as float64 copies on the CPU."""
    return {k: p.detach().double().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}


def build(case: str, model_dir: str, data_file: str, world_size: int):
    """The module, datamodule and trainer settings of ``case`` with B / ``world_size`` rows per process."""
    from rlhf_lightning.data import DPODataModule, PreferenceDataModule, PromptDataModule
    from rlhf_lightning.models import load_policy, load_reference, load_scalar_model, load_tokenizer
    from rlhf_lightning.models.builders import PolicyBaseCritic
    from rlhf_lightning.modules import DPOModule, PPOModule, RewardModule, ValueModule

    stage, settings = {**CASES, **TWO_PROCESS_CASES}[case]
    batch = GLOBAL_BATCH // world_size
    tokenizer = load_tokenizer(model_dir)
    rm = load_scalar_model(model_dir, frozen=True, seed=1)
    trainer_kwargs = {"limit_val_batches": 0}
    if stage == "reward":
        settings = dict(settings)
        steps = settings.pop("steps", STEPS)
        module = RewardModule(load_scalar_model(model_dir, trainable_layers=1), tokenizer, optim={"lr": 1e-3},
                              cache_trunk=settings.pop("cache_trunk", False))
        dm = PreferenceDataModule(tokenizer, data_file, val_size=8, batch_size=batch, eval_batch_size=2, max_length=48,
                                  **settings)
        trainer_kwargs = {"limit_val_batches": None, "val_check_interval": STEPS}
        return module, dm, steps, trainer_kwargs
    if stage == "value":
        module = ValueModule(load_reference(model_dir), load_scalar_model(model_dir, trainable_layers=1), rm,
                             tokenizer, ref_policy=None, value={"generation": {"max_new_tokens": 5}},
                             critic_optim={"lr": 1e-3})
        return module, PromptDataModule(tokenizer, data_file, batch_size=batch, max_prompt_length=32), STEPS, \
            trainer_kwargs
    if stage == "dpo":
        eval_prompts = PromptDataModule(tokenizer, data_file, max_prompt_length=32, val_size=3)
        module = DPOModule(load_policy(model_dir, trainable_layers=1), load_reference(model_dir), rm, tokenizer,
                           dpo={"optim": {"lr": 1e-3}, "num_sample_prompts": 3, "generation": {"max_new_tokens": 4}})
        dm = DPODataModule(tokenizer, data_file, eval_prompts=eval_prompts, num_eval_prompts=3, val_size=0,
                           batch_size=batch, max_length=48)
        return module, dm, STEPS, trainer_kwargs
    settings = dict(settings)
    lora = {"r": 4} if settings.pop("lora", False) else None
    if lora:
        critic = PolicyBaseCritic.from_source(model_dir, lora=lora)
    elif settings.get("adv_estimator", "gae") == "gae":
        critic = load_scalar_model(model_dir, trainable_layers=1)
    else:
        critic = None
    reward = settings.pop("reward", None)  # a reward function alone instead of the reward model (flat groups)
    functions = [{"fn": globals()[reward]}] if reward else None
    module = PPOModule(load_policy(model_dir, trainable_layers=None if lora else 1, lora=lora),
                       None if lora else load_reference(model_dir), critic, None if reward else rm, tokenizer,
                       ppo={"ppo_epochs": 2, "num_sample_prompts": 3, "log_samples_every_n_steps": 0,
                            "generation": {"max_new_tokens": 6}, **settings},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3}, reward_functions=functions)
    dm = PromptDataModule(tokenizer, data_file, batch_size=batch, max_prompt_length=32, val_size=3)
    return module, dm, STEPS * module.optimizer_steps_per_iteration, trainer_kwargs


def run(case: str, out_dir: str, model_dir: str, data_file: str, world_size: int, precision: str = "64-true") -> dict:
    """Train ``case`` for :data:`STEPS` steps with ``world_size`` processes (1: this process; > 1: the processes of an
    initialised ``torchrun``), and return (rank 0: also write to ``<out_dir>/<case>.pt``) the initial and final
    trainable parameters, the compared metrics after each step and the evaluation's results."""
    from lightning.pytorch.strategies import DDPStrategy

    L.seed_everything(0)
    module, dm, max_steps, trainer_kwargs = build(case, model_dir, data_file, world_size)
    evaluations = {}
    if hasattr(module, "evaluate_samples"):
        evaluate = module.evaluate_samples
        module.evaluate_samples = lambda phase: evaluations.setdefault(phase, evaluate(phase))
    recorder = Recorder()
    strategy = DDPStrategy(process_group_backend="gloo") if world_size > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=max_steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, precision=precision,
                        default_root_dir=out_dir, callbacks=[recorder], **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    result = {"initial": recorder.initial, "final": trainable(module), "metrics": recorder.metrics,
              "evaluations": evaluations, "world_size": world_size, "trunk_cache": recorder.trunk_cache}
    if trainer.is_global_zero:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(out_dir) / f"{case}.pt")
    return result


if __name__ == "__main__":
    out, model, data, *cases = sys.argv[1:]
    world = int(__import__("os").environ["WORLD_SIZE"])
    for name in cases:
        run(name, out, model, data, world)
