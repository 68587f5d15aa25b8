"""DPOModule: the policy trained directly on preference pairs (DPO, IPO, SLiC's hinge) against a frozen reference."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch import nn

from rlhf_lightning.algorithms.losses import dpo_loss
from rlhf_lightning.config.schema import DPOConfig, EvalConfig, as_config
from rlhf_lightning.evaluation.heldout import HeldOutEvaluation
from rlhf_lightning.evaluation.judges import load_judges
from rlhf_lightning.models.forward import response_logprobs
from rlhf_lightning.models.lora import adapters_disabled, has_lora, log_network_memory
from rlhf_lightning.modules.common import (
    check_lora_strategy,
    drop_frozen_lora_weights,
    export_trained,
    fused_adamw_allowed,
    make_optimizer,
    scheduler_total_steps,
)
from rlhf_lightning.rollout.experience import Experience, adapter_off_logprobs, make_experience
from rlhf_lightning.rollout.sampler import generate, prompt_noise
from rlhf_lightning.training.fsdp2 import shard_networks

log = logging.getLogger(__name__)

#: Keys of the frozen networks, left out of checkpoints (they are reloaded from their sources).
FROZEN_PREFIXES = ("ref_policy.", "reward_model.")
#: Format version of the reference log-probability cache file.
REF_CACHE_VERSION = 1


class DPOModule(L.LightningModule):
    """Direct preference optimisation of a causal LM (Rafailov et al. 2023), with IPO (Azar et al. 2023) and
    the hinge loss of SLiC (Zhao et al. 2023) as ``dpo.loss_type``.

    Before training (:meth:`on_fit_start`) the reference's log-probabilities of every training and validation
    pair are computed in one pass (:meth:`reference_logps`) and cached in ``ref_logps_path`` keyed by the pairs
    (:func:`~rlhf_lightning.data.pair_key`); a resumed run (or a second run with the same path) reads them back.
    Each ``training_step`` then runs the policy alone on a batch from
    :class:`~rlhf_lightning.data.DPOCollator` (chosen rows 0..B−1, rejected rows B..2B−1), sums the response
    tokens' log-probabilities (IPO: averages them over the response's tokens), and minimises the mean of
    :func:`~rlhf_lightning.algorithms.losses.dpo_loss`.

    Logged (train, and ``val/...`` on the validation pairs): ``loss``; ``rewards/chosen``, ``rewards/rejected``
    (the implicit rewards β·(log π − log π_ref), means), ``rewards/margins`` (chosen − rejected),
    ``rewards/accuracies`` (fraction with chosen > rejected); ``logps/chosen``, ``logps/rejected`` (policy).
    Before the first and after the last step, the held-out prompts are answered and scored as in PPO
    (:func:`~rlhf_lightning.evaluation.heldout.evaluate_policy`: ``eval/score_*``, ``eval/kl_*``). At the end the
    policy is written to ``export_dir`` (``save_pretrained``).

    Args:
        policy: the causal LM to train (a LoRA model with ``model.lora``).
        ref_policy: the frozen reference (the policy's initial weights); ``None`` for a LoRA policy, whose
            adapters switched off (:func:`~rlhf_lightning.models.lora.adapters_disabled`) are the reference.
        reward_model: frozen ``AutoModelForSequenceClassification`` scoring the evaluation's responses;
            ``None``: the evaluation's scores are 0 (its KL is still measured).
        tokenizer: for EOS/pad ids, decoding samples, and the export.
        dpo: :class:`~rlhf_lightning.config.schema.DPOConfig` or dict.
        export_dir: where the trained policy is written at the end of fit (``None``: not written).
        samples_path: JSON-lines file of the evaluation's responses.
        ref_logps_path: the reference log-probability cache (``None``: kept in memory only).
        eval: :class:`~rlhf_lightning.config.schema.EvalConfig` or dict: the held-out evaluation's judges and
            schedule (``every_n_iterations`` counts optimizer steps here), as PPO's.

    Raises:
        ValueError, TypeError: a setting :class:`~rlhf_lightning.config.schema.DPOConfig` refuses; ``ref_policy`` is
            ``None`` and the policy has no LoRA adapters.
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module | None, reward_model: nn.Module | None, tokenizer,
                 dpo: DPOConfig | dict | None = None, export_dir: str | None = None, samples_path: str | None = None,
                 ref_logps_path: str | None = None, eval: EvalConfig | dict | None = None):
        super().__init__()
        if ref_policy is None and not has_lora(policy):
            raise ValueError("DPOModule: ref_policy=None needs a LoRA policy (model.lora.r), whose adapters switched "
                             "off are the reference")
        self.strict_loading = False  # frozen networks are not in checkpoints
        self.policy, self.ref_policy, self.reward_model = policy, ref_policy, reward_model
        self.tokenizer = tokenizer
        self.dpo = as_config(DPOConfig, dpo, "dpo")
        self.export_dir, self.samples_path, self.ref_logps_path = export_dir, samples_path, ref_logps_path
        cfg, eval_config = self.dpo, as_config(EvalConfig, eval, "eval")
        self.heldout = HeldOutEvaluation(self.collect, cfg.num_sample_prompts, cfg.kl_estimator, cfg.eval_seed,
                                         cfg.eval_greedy, samples_path, eval_config.every_n_iterations,
                                         load_judges(eval_config),
                                         int(tokenizer.eos_token_id) if cfg.generation.score_with_eos else None)
        #: pair key -> (chosen sum, rejected sum, chosen tokens, rejected tokens) under the reference
        self.ref_cache: dict[str, tuple[float, float, float, float]] = {}
        self.save_hyperparameters(ignore=["policy", "ref_policy", "reward_model", "tokenizer"])

    # ------------------------------------------------------------------ log-probabilities
    @staticmethod
    def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of each row's response tokens under ``model``, and the tokens counted.

        Args:
            batch: a :class:`~rlhf_lightning.data.DPOCollator` batch (``input_ids``, ``attention_mask``,
                ``response_mask``, ``response_start``).

        Returns:
            ``(logps, lengths)``, both (2B,) float32: nats, and response tokens (≥ 1 for every real row).
        """
        logprobs = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_start"])
        mask = batch["response_mask"]
        logps = logprobs.float().masked_fill(~mask, 0.0).sum(1)
        return logps, mask.sum(1).float()

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sequence_logps` under the reference, without autograd: the one place the reference runs for
        the loss; without ``ref_policy``, the LoRA policy with its adapters switched off."""
        if self.ref_policy is None:
            with adapters_disabled(self.policy):
                return self.sequence_logps(self.policy, batch)
        return self.sequence_logps(self.ref_policy, batch)

    def precompute_reference(self) -> int:
        """Fill :attr:`ref_cache` with the reference's log-probabilities of every pair of the datamodule
        (``reference_dataloader``), reading ``ref_logps_path`` first and computing only the batches with a
        pair missing from it; writes the file back (global-zero rank) when anything was computed.

        Returns:
            How many pairs were computed (0: all came from the cache).

        Raises:
            ValueError: the cache file is not one this module wrote (another format version).
        """
        path = Path(self.ref_logps_path) if self.ref_logps_path else None
        if path is not None and path.exists() and not self.ref_cache:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("version") != REF_CACHE_VERSION:
                raise ValueError(f"{path}: not a reference log-probability cache of version {REF_CACHE_VERSION}")
            self.ref_cache = dict(zip(saved["keys"], map(tuple, saved["values"].tolist()), strict=True))
        computed = 0
        for batch in self.trainer.datamodule.reference_dataloader():
            keys = batch["keys"]
            if all(k in self.ref_cache for k in keys):
                continue
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logps, lengths = self.reference_logps(batch)
            n = len(keys)
            rows = torch.stack([logps[:n], logps[n:], lengths[:n], lengths[n:]], 1).cpu().tolist()
            self.ref_cache.update(zip(keys, map(tuple, rows), strict=True))
            computed += n
        if computed and path is not None and self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            keys = list(self.ref_cache)
            torch.save({"version": REF_CACHE_VERSION, "keys": keys,
                        "values": torch.tensor([self.ref_cache[k] for k in keys], dtype=torch.float64)}, path)
        log.info("reference log-probabilities: %d pairs computed, %d from %s", computed,
                 len(self.ref_cache) - computed, path or "memory")
        return computed

    def cached_reference(self, keys: list[str]) -> torch.Tensor:
        """The cached reference values of the pairs ``keys``: (B, 4) float32 on the module's device, columns
        chosen sum, rejected sum, chosen tokens, rejected tokens.

        Raises:
            KeyError: a pair the reference pass did not see (one line naming it).
        """
        missing = [k for k in keys if k not in self.ref_cache]
        if missing:
            raise KeyError(f"no reference log-probabilities for pair {missing[0]} (was precompute_reference run?)")
        return torch.tensor([self.ref_cache[k] for k in keys], dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        """Refuse a LoRA policy under FSDP or DeepSpeed (:func:`~rlhf_lightning.modules.common.check_lora_strategy`)."""
        check_lora_strategy(self.trainer.strategy, {"policy": self.policy})

    def configure_model(self) -> None:
        """Under FSDP2 (``trainer=fsdp``), shard the policy, and the frozen networks unless
        ``trainer.strategy.frozen_networks=replicate`` (:func:`~rlhf_lightning.training.fsdp2.shard_networks`)."""
        shard_networks(self, trained=("policy",), frozen=("ref_policy", "reward_model"))

    def on_fit_start(self) -> None:
        """Log each network's size; the reference's one pass over the data (:meth:`precompute_reference`),
        before any step."""
        log_network_memory({"policy": self.policy, "reference": self.ref_policy, "reward model": self.reward_model},
                           aliases={"reference": "the LoRA policy with its adapters off"}
                           if self.ref_policy is None else None)
        self.precompute_reference()

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        keys = batch["keys"]
        n = len(keys)
        logps, lengths = self.sequence_logps(self.policy, batch)
        ref = self.cached_reference(keys)
        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        if self.dpo.average_logps:
            logps = logps / lengths.clamp(min=1)
            ref_chosen, ref_rejected = ref_chosen / ref[:, 2].clamp(min=1), ref_rejected / ref[:, 3].clamp(min=1)
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, self.dpo.beta,
                                            self.dpo.loss_type, self.dpo.label_smoothing)
        loss = losses.mean()
        prefix = "" if stage == "train" else f"{stage}/"
        values = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                  "rewards/margins": (chosen - rejected).mean(),
                  "rewards/accuracies": (chosen > rejected).float().mean(),
                  "logps/chosen": logps[:n].detach().mean(), "logps/rejected": logps[n:].detach().mean()}
        metrics = {f"{stage}/loss": loss} | {f"{prefix}{name}": value for name, value in values.items()}
        on_step = stage == "train"
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=n, sync_dist=True)  # all ranks' pairs
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimizer step's loss on a batch of B pairs (:class:`~rlhf_lightning.data.DPOCollator`)."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        """AdamW over the policy's trainable parameters with ``dpo.optim``'s warm-up and schedule, stepped once
        per optimizer step (:func:`~rlhf_lightning.modules.common.make_optimizer`)."""
        trainer = self._trainer
        total = scheduler_total_steps(trainer) if trainer is not None and self.dpo.optim.scheduler != "constant" \
            else None
        optimizer, scheduler = make_optimizer(self.policy.parameters(), self.dpo.optim, total,
                                              fused=fused_adamw_allowed(trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation and export
    def collect(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor | None = None,
                do_sample: bool = True, seed: int | None = None) -> Experience:
        """One response per prompt (``dpo.generation``), scored by the reward model, with the policy's and the
        reference's log-probabilities (no autograd): the evaluation's
        :class:`~rlhf_lightning.rollout.experience.Experience`.

        Args:
            input_ids, attention_mask: (B, P) left-padded prompts.
            prompt_index: (B,) the prompts' dataset indices: with ``seed``, each response's sampling noise is keyed
                by its prompt (:func:`~rlhf_lightning.rollout.sampler.prompt_noise`, as PPO's evaluation); ``None``:
                drawn
                from torch's generator.
            do_sample: False decodes greedily.
            seed: the noise's seed (the evaluation's ``dpo.eval_seed``).
        """
        gen, eos = self.dpo.generation, int(self.tokenizer.eos_token_id)
        noise = prompt_noise(seed, prompt_index, gen.max_new_tokens) if seed is not None else None
        rollout = generate(self.policy, input_ids, attention_mask, gen, eos, self.tokenizer.pad_token_id,
                           do_sample=do_sample, noise=noise)
        exp = make_experience(rollout, self.reward_model, policy=self.policy, ref_policy=self.ref_policy,
                              temperature=gen.temperature, missing_eos_penalty=gen.missing_eos_penalty,
                              score_eos_token_id=eos if gen.score_with_eos else None)
        if self.ref_policy is None:  # LoRA: the reference is the policy with its adapters off
            exp = replace(exp, ref_logprobs=adapter_off_logprobs(self.policy, rollout, gen.temperature))
        return exp

    def configure_callbacks(self):
        """The held-out evaluation (:class:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation`), as PPO's."""
        return [self.heldout]

    def evaluate_samples(self, phase: str) -> dict[str, float] | None:
        """PPO's held-out evaluation (:meth:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation.evaluate`) with
        ``dpo``'s ``num_sample_prompts``, ``kl_estimator``, ``eval_seed`` and ``eval_greedy``, and ``eval``'s
        judges."""
        return self.heldout.evaluate(self, phase)

    def on_train_end(self) -> None:
        """Export the trained policy (after the held-out evaluation's ``after``), gathered with every rank taking
        part under FSDP2 (:func:`~rlhf_lightning.modules.common.export_trained`)."""
        export_trained(self, self.policy, self.tokenizer, self.export_dir)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave the frozen reference and reward model out (they are reloaded from their sources), and a LoRA
        policy's frozen base weights (its adapters stay)."""
        state = checkpoint["state_dict"]
        drop_frozen_lora_weights(state, {"policy": self.policy})
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
