"""The frozen lower blocks' output of each sequence, computed once and kept across epochs (reward stage).

With ``model.trainable_layers = k`` only the top k blocks of the reward model train; the blocks below them are
frozen, so their output for a sequence is the same in every epoch and every validation pass. A reward stage of
E epochs runs them E times on each training sequence (and once per validation pass on each held-out one):
with SmolLM2 (30 blocks) and k = 4 they are 26 of the 38 block-passes of a training step (forward through all
blocks, backward through 4). :class:`TrunkCache` runs them once per sequence of the dataset, keeps their output
(``length × hidden`` per sequence in the model's dtype, on the model's device), and scores every later batch from it
with
:func:`~rlhf_lightning.models.forward.sequence_scores` (``trunk=``), which runs only the blocks above: the
same operations as the full forward, so the same scores up to float rounding.

A sequence is known by its key, an integer its caller derives from the dataset index of its row (the reward stage:
``2 · index`` for a pair's chosen sequence, ``2 · index + 1`` for its rejected one, ``pair_index`` of
:class:`~rlhf_lightning.data.PreferenceCollator`), not by its tokens or by where it stood in a batch: the same on every
rank and in every epoch, whatever the sampler's order, so 2 processes keep and reuse the same outputs as 1 does.

Memory: 4 · hidden bytes per token kept in float32 (SmolLM2: 2.3 KB; 913 pairs of ≤ 128 tokens, 185k tokens:
0.43 GB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from rlhf_lightning.algorithms.ops import position_ids_from_mask
from rlhf_lightning.models.forward import length_groups, sequence_scores
from rlhf_lightning.models.trunk import TrunkOutput, backbone_of, frozen_depth, trunk_view

log = logging.getLogger(__name__)


def cacheable_depth(model: nn.Module) -> int:
    """How many lower blocks of ``model`` a :class:`TrunkCache` may keep: its frozen blocks
    (:func:`~rlhf_lightning.models.trunk.frozen_depth`, embeddings included), at most all but the last block;
    0 when the model cannot be split or has dropout (``config.attention_dropout``/``hidden_dropout`` > 0 or an
    ``nn.Dropout`` with p > 0 in its backbone: a cached output would be one draw of a random forward)."""
    backbone = backbone_of(model)
    if backbone is None:
        return 0
    config = getattr(model, "config", None)
    if any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "hidden_dropout")):
        return 0
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in backbone.modules()):
        return 0
    return min(frozen_depth(model), len(backbone.layers) - 1)


class TrunkCache:
    """Scores of right-padded sequences by a model whose lower ``depth`` blocks are frozen, each sequence's
    output of those blocks computed on its first appearance and reused afterwards, found by its key (an integer
    from the dataset index of its row, see the module).

    Args:
        model: a scalar (reward) model with a splittable backbone
            (:func:`~rlhf_lightning.models.trunk.backbone_of`).
        depth: blocks to cache (default :func:`cacheable_depth`).

    Attributes:
        depth: the cached blocks. hits, misses: sequences scored from the cache / computed. bytes: memory held.

    Raises:
        ValueError: ``depth`` < 1 or more than :func:`cacheable_depth` allows (a block that trains, or dropout).
    """

    def __init__(self, model: nn.Module, depth: int | None = None):
        allowed = cacheable_depth(model)
        depth = allowed if depth is None else depth
        if not 1 <= depth <= allowed:
            raise ValueError(f"TrunkCache: depth {depth} not in [1, {allowed}] (frozen blocks below the last, "
                             "no dropout) for this model")
        self.model, self.depth = model, depth
        self._view = trunk_view(model, depth)
        self._store: dict[int, torch.Tensor] = {}
        self.hits = self.misses = self.bytes = 0

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def _fill(self, input_ids: torch.Tensor, lengths: list[int], rows: list[int], keys: list[int]) -> None:
        """Run the trunk on ``rows`` (in groups of similar length) and keep each row's output under its key."""
        for group in length_groups([lengths[r] for r in rows], 0.1):
            index = [rows[g] for g in group]
            width = max(lengths[r] for r in index)
            ids = input_ids[index, :width]
            mask = (torch.arange(width, device=ids.device)[None, :]
                    < torch.tensor([lengths[r] for r in index], device=ids.device)[:, None]).long()
            hidden = self._view(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                use_cache=False).last_hidden_state  # (b, width, H)
            for j, r in enumerate(index):
                if keys[r] not in self._store:
                    self._store[keys[r]] = hidden[j, :lengths[r]].detach().clone()
                    self.bytes += self._store[keys[r]].numel() * self._store[keys[r]].element_size()
                    self.misses += 1

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keys: Sequence[int] | torch.Tensor,
               slack: float = 0.1) -> torch.Tensor:
        """Scores (N,) of N right-padded sequences (N, L), as
        :func:`~rlhf_lightning.models.forward.right_padded_scores` gives them (the model's dtype): the rows run in
        groups of similar length (``slack``), the blocks above ``depth`` on the kept outputs; differentiable in
        those blocks and the head.

        Args:
            keys: N integers (a list or a (N,) integer tensor), row r's sequence's key: equal keys must mean equal
                sequences (the dataset index of the row, see the module). A key not seen yet is computed and kept.

        Raises:
            ValueError: a row that is not right-padded (a 0 before a 1 in ``attention_mask``); not N keys, or two
                rows of one batch with the same key; a key kept with another length than its row's now (the key
                does not name one sequence: another dataset under the same cache).
        """
        lengths_t = attention_mask.sum(1)
        if not torch.equal(attention_mask.long().cumprod(1).sum(1), lengths_t):
            raise ValueError("TrunkCache.scores: rows must be right-padded")
        lengths = lengths_t.tolist()
        keys = [int(k) for k in (keys.tolist() if torch.is_tensor(keys) else keys)]
        if len(keys) != len(lengths) or len(set(keys)) != len(keys):
            raise ValueError(f"TrunkCache.scores: {len(lengths)} rows need as many distinct keys, got {keys}")
        missing = [r for r, k in enumerate(keys) if k not in self._store]
        for r, k in enumerate(keys):
            if k in self._store and self._store[k].shape[0] != lengths[r]:
                raise ValueError(f"TrunkCache.scores: key {k} was kept for a sequence of {self._store[k].shape[0]} "
                                 f"tokens, its row now has {lengths[r]}: a key must name one sequence")
        self.hits += len(keys) - len(missing)
        if missing:
            self._fill(input_ids, lengths, missing, keys)
        pieces, order = [], []
        for rows in length_groups(lengths, slack):
            width = max(lengths[r] for r in rows)
            first = self._store[keys[rows[0]]]
            hidden = first.new_zeros(len(rows), width, first.shape[-1])
            for j, r in enumerate(rows):
                hidden[j, :lengths[r]] = self._store[keys[r]]
            index = torch.tensor(rows, device=input_ids.device)
            pieces.append(sequence_scores(self.model, None, attention_mask[index, :width],
                                          trunk=TrunkOutput(hidden, self.depth)))
            order += rows
        return torch.cat(pieces)[torch.argsort(torch.tensor(order, device=input_ids.device))]
