"""RewardModule: a scalar reward model r(x, y) trained on preference pairs."""

from __future__ import annotations

import json
import logging

import lightning as L
import torch
from torch import nn

from rlhf_lightning.algorithms.losses import pairwise_reward_loss
from rlhf_lightning.config.schema import OptimConfig, RewardConfig, as_config
from rlhf_lightning.evaluation.diagnostics import preference_diagnostics
from rlhf_lightning.models.forward import call_cost_tokens, right_padded_scores
from rlhf_lightning.models.lora import has_lora, log_network_memory
from rlhf_lightning.models.trunk_cache import TrunkCache, cacheable_depth
from rlhf_lightning.modules.common import (
    check_lora_strategy,
    drop_frozen_lora_weights,
    export_trained,
    fused_adamw_allowed,
    make_optimizer,
    scheduler_total_steps,
)
from rlhf_lightning.training.fsdp2 import shard_networks

log = logging.getLogger(__name__)

#: The file beside an exported reward model that records its data split (``RewardModule.on_train_end``).
SPLIT_RECORD = "split.json"


class RewardModule(L.LightningModule):
    """Bradley–Terry reward model with a centering term.

    Loss per batch of B pairs: mean −log σ(r_w − r_l − margin) + center_coef · mean((r_w + r_l)²)
    (Ouyang et al. 2022 eq. 1; Eisenstein et al. 2023 for the centering term, which keeps
    scores near 0 since the Bradley–Terry term only sees their difference).

    Batches come from :class:`~rlhf_lightning.data.PreferenceCollator`: ``input_ids`` and
    ``attention_mask`` (2B, L), rows 0..B−1 prompt+chosen, rows B..2B−1 prompt+rejected.

    Logs ``{train,val}/loss``, ``/accuracy`` (fraction with r_w > r_l), ``/margin`` (mean r_w − r_l),
    ``/reward_mean`` and ``/reward_abs_mean`` (score-inflation monitor). After each validation epoch (not the
    sanity check) the diagnostics of :func:`~rlhf_lightning.evaluation.diagnostics.preference_diagnostics` on the
    validation pairs: ``val/accuracy_ci_low``/``_high`` (bootstrap 95%), ``val/ece``,
    ``val/acc_chosen_shorter``/``longer``, ``val/length_score_corr`` (Pearson), ``val/gain_over_shorter_rule``
    (accuracy − that of the rule "the shorter response wins", on the same pairs) and ``val/score_std``, on the
    validation pairs of every rank together (``python -m rlhf_lightning.rm_eval`` gives them all). At the end of fit the
    model and tokenizer are written to ``export_dir`` with ``save_pretrained`` (reload with
    ``AutoModelForSequenceClassification.from_pretrained``; its one logit is the reward); a LoRA model
    (``model.lora``) is written merged, its adapter and head in ``<export_dir>_adapter``.

    Args:
        model: ``AutoModelForSequenceClassification`` with ``num_labels=1``
            (:func:`~rlhf_lightning.models.load_scalar_model`).
        tokenizer: saved beside the model.
        optim: :class:`~rlhf_lightning.config.schema.OptimConfig` or dict (``reward.optim``).
        center_coef, margin, cache_trunk: as :class:`~rlhf_lightning.config.schema.RewardConfig`'s
            (``reward.center_coef``, ``reward.margin``, ``reward.cache_trunk``), which checks them.
        export_dir: where to write the trained model (``None``: don't).

    Raises:
        ValueError, TypeError: a setting :class:`~rlhf_lightning.config.schema.RewardConfig` refuses (one line
            naming its key, e.g. ``reward.center_coef=-1.0 must be >= 0``).
    """

    def __init__(self, model: nn.Module, tokenizer=None, optim: OptimConfig | dict | None = None,
                 center_coef: float = RewardConfig.center_coef, margin: float | None = RewardConfig.margin,
                 export_dir: str | None = None, cache_trunk: bool = RewardConfig.cache_trunk):
        super().__init__()
        settings = ({"center_coef": center_coef, "margin": margin, "cache_trunk": cache_trunk}
                    | ({} if optim is None else {"optim": optim}))
        config = as_config(RewardConfig, settings, "reward")
        self.cache_trunk = config.cache_trunk
        self.trunk_cache = None  # a TrunkCache during fit with cache_trunk (on_fit_start)
        self.model = model
        self.strict_loading = not has_lora(model)  # a LoRA model's checkpoint holds its adapters and head only
        self.tokenizer = tokenizer
        self.optim = config.optim
        self.center_coef, self.margin, self.export_dir = config.center_coef, config.margin, export_dir
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self._val_scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rewards (2B,), response_lengths (2B,))
        self._call_tokens: float | None = None  # call_cost_tokens of the model, on the first forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pair_index: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (N,) float32 for N sequences (N, L), read at each row's last attended token.

        Right-padded rows run in groups of similar length, each cut to its longest row
        (:func:`~rlhf_lightning.models.forward.right_padded_scores`): little compute on padding; on a model so
        small that a forward call costs more than the padding it saves
        (:func:`~rlhf_lightning.models.forward.call_cost_tokens`), fewer groups. With
        ``cache_trunk`` during fit and ``pair_index`` (B,) long (N = 2B rows of a
        :class:`~rlhf_lightning.data.PreferenceCollator` batch, its ``pair_index``), the frozen blocks run once per
        sequence of the dataset (:class:`~rlhf_lightning.models.trunk_cache.TrunkCache`, keyed by the dataset index:
        ``2 · index`` chosen, ``2 · index + 1`` rejected); without ``pair_index`` every block runs.
        """
        if self.trunk_cache is not None and pair_index is not None:
            keys = torch.cat([2 * pair_index, 2 * pair_index + 1])
            return self.trunk_cache.scores(input_ids, attention_mask, keys)
        if self._call_tokens is None:
            self._call_tokens = call_cost_tokens(self.model)
        return right_padded_scores(self.model, input_ids, attention_mask, call_tokens=self._call_tokens)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        rewards = self(batch["input_ids"], batch["attention_mask"], batch.get("pair_index"))  # (2B,)
        n_pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:n_pairs], rewards[n_pairs:]
        loss, stats = pairwise_reward_loss(chosen, rejected, self.center_coef, self.margin)
        metrics = {f"{stage}/loss": loss, f"{stage}/accuracy": stats["accuracy"],
                   f"{stage}/margin": stats["margin_mean"],
                   f"{stage}/reward_mean": 0.5 * (stats["chosen_mean"] + stats["rejected_mean"]),
                   f"{stage}/reward_abs_mean": stats["reward_abs_mean"]}
        if stage == "val" and "response_lengths" in batch:
            self._val_scores.append((rewards.detach().float().cpu(), batch["response_lengths"].cpu()))
        on_step = stage == "train"
        # Every rank holds as many pairs: the mean over ranks is the mean over all pairs.
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=n_pairs, sync_dist=True,
                      prog_bar=False)
        self.log(f"{stage}/acc", stats["accuracy"], on_step=on_step, on_epoch=not on_step, batch_size=n_pairs,
                 sync_dist=True, prog_bar=True, logger=False)
        return loss

    def setup(self, stage: str) -> None:
        """Refuse a LoRA model under FSDP or DeepSpeed (:func:`~rlhf_lightning.modules.common.check_lora_strategy`)."""
        check_lora_strategy(self.trainer.strategy, {"model": self.model})

    def configure_model(self) -> None:
        """Under FSDP2 (``trainer=fsdp``), shard the model per decoder block
        (:func:`~rlhf_lightning.training.fsdp2.shard_networks`)."""
        shard_networks(self, trained=("model",))

    def on_fit_start(self) -> None:
        """Log the model's size (parameters, trainable parameters, bytes of weights); with ``cache_trunk``, start
        the :class:`~rlhf_lightning.models.trunk_cache.TrunkCache` (or say in the log why not)."""
        log_network_memory({"reward model": self.model})
        if not self.cache_trunk:
            return
        strategy = type(self.trainer.strategy).__name__
        depth = 0 if "FSDP" in strategy or "DeepSpeed" in strategy else cacheable_depth(self.model)
        if depth < 1:
            log.info("reward.cache_trunk off: no frozen lower block to cache (model.trainable_layers, LoRA on "
                     "every block, dropout) or a sharded strategy (%s)", strategy)
            return
        self.trunk_cache = TrunkCache(self.model, depth)
        log.info("reward.cache_trunk: the first %d blocks' output is kept per sequence (by dataset index)", depth)

    def on_fit_end(self) -> None:
        """Log what the trunk cache held and release it."""
        if self.trunk_cache is not None:
            c = self.trunk_cache
            log.info("trunk cache: %d sequences, %.2f GB; %d forwards from it, %d computed", len(c), c.bytes / 1e9,
                     c.hits, c.misses)
            self.trunk_cache = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA model's frozen base weights are left out (reloaded from its source)."""
        drop_frozen_lora_weights(checkpoint["state_dict"], {"model": self.model})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._val_scores = []

    def on_validation_epoch_end(self) -> None:
        """Log the validation pairs' :func:`~rlhf_lightning.evaluation.diagnostics.preference_diagnostics` (see the
        class)."""
        if self.trainer.sanity_checking or not self._val_scores:
            return
        scores = self._val_scores
        if self.trainer.world_size > 1:  # every rank's validation pairs: the diagnostics of all of them
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, scores)
            scores = [batch for part in gathered for batch in part]
        chosen, rejected, chosen_len, rejected_len = [], [], [], []
        for rewards, lengths in scores:
            n = rewards.shape[0] // 2
            chosen.append(rewards[:n]), rejected.append(rewards[n:])
            chosen_len.append(lengths[:n]), rejected_len.append(lengths[n:])
        d = preference_diagnostics(torch.cat(chosen), torch.cat(rejected), torch.cat(chosen_len),
                                   torch.cat(rejected_len))
        bias = d["length_bias"]
        metrics = {"val/accuracy_ci_low": d["accuracy_ci"][0], "val/accuracy_ci_high": d["accuracy_ci"][1],
                   "val/ece": d["calibration"]["ece"], "val/acc_chosen_shorter": bias["acc_chosen_shorter"],
                   "val/acc_chosen_longer": bias["acc_chosen_longer"], "val/length_score_corr": bias["pearson"],
                   "val/gain_over_shorter_rule": bias["gain_over_shorter_rule"],
                   "val/score_std": d["scores"]["std"]}
        # The same on every rank (all ranks' pairs): the mean over ranks changes nothing; floats: on self.device.
        self.log_dict(metrics, sync_dist=True)
        self._val_scores = []

    def configure_optimizers(self):
        """AdamW with ``optim``'s warm-up and schedule, stepped once per optimizer step
        (:func:`~rlhf_lightning.modules.common.make_optimizer`); fused unless 16-mixed clipping forbids it
        (:func:`~rlhf_lightning.modules.common.fused_adamw_allowed`)."""
        trainer = self._trainer
        total = scheduler_total_steps(trainer) if trainer is not None and self.optim.scheduler != "constant" else None
        optimizer, scheduler = make_optimizer(self.model.parameters(), self.optim, total,
                                              fused=fused_adamw_allowed(trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        """Export the model and tokenizer to ``export_dir`` (every rank takes part: the weights are gathered under
        FSDP2, :func:`~rlhf_lightning.modules.common.export_trained`), with ``split.json`` beside them, written by the
        global-zero rank: the datamodule's :meth:`~rlhf_lightning.data.PreferenceDataModule.split_record` (which
        source rows it trained on and which it held out), when it has one; what shows that a judge's training pairs
        are not the proxy's."""
        directory = export_trained(self, self.model, self.tokenizer, self.export_dir)  # None except on rank 0
        datamodule = getattr(self.trainer, "datamodule", None)
        if directory is not None and hasattr(datamodule, "split_record"):
            (directory / SPLIT_RECORD).write_text(json.dumps(datamodule.split_record(), indent=1))
