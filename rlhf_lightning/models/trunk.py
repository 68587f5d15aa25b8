"""A frozen trunk shared by several networks: its output computed once, the top blocks run on it.

In RLHF on a budget only the top blocks train (``model.trainable_layers``). The policy's frozen
lower blocks are then the reference's lower blocks, and a reward model or critic fine-tuned from
the same base the same way carries the same weights below its top blocks too. A PPO iteration
runs those networks over the same sequences (reference, reward model, then policy and critic
in every epoch), so the lower blocks compute the same hidden states up to six times.
:class:`SharedTrunk` finds the deepest prefix of blocks (and the embeddings) whose weights are
identical and frozen in a group of networks, runs it once per batch of sequences, and lets each
network run only its remaining blocks on that output. The result equals the full forward's
(the same operations in the same order).

Only the transformers decoder layout with ``embed_tokens``, ``layers`` and ``norm`` on the
backbone (Llama, Mistral, Qwen2, SmolLM2, ...) is split; anything else gets no trunk.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class TrunkOutput:
    """Hidden states after the first ``depth`` blocks of a backbone.

    Attributes:
        hidden: (B, T, H) float, the residual stream entering block ``depth`` (no gradient).
        depth: number of blocks already applied (≥ 1).
    """

    hidden: torch.Tensor
    depth: int

    def rows(self, index: torch.Tensor) -> "TrunkOutput":
        """The same trunk output for a subset of rows (``index``: (b,) long)."""
        return TrunkOutput(self.hidden[index], self.depth)

    def columns(self, width: int) -> "TrunkOutput":
        """The first ``width`` columns: with causal attention, the trunk output of the sequences cut
        to that width (used when the reward model scores one column more than the others see)."""
        return self if self.hidden.shape[1] == width else TrunkOutput(self.hidden[:, :width], self.depth)


def _backbone(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or not all(hasattr(backbone, a) for a in ("embed_tokens", "layers", "norm")):
        return None
    return backbone


def backbone_view(model: nn.Module, start: int, stop: int | None, final_norm: bool) -> nn.Module:
    """The model's backbone restricted to blocks ``start:stop``, sharing its parameters.

    A shallow copy with its own module table: the same ``forward`` (masks, rotary embeddings,
    attention implementation), run on ``inputs_embeds`` = the hidden states entering block
    ``start``. The view is not registered anywhere, so no parameter is counted twice.

    Args:
        model: a transformers model whose backbone has ``embed_tokens``, ``layers``, ``norm``.
        start, stop: block range. final_norm: apply the backbone's final norm (else identity).

    Raises:
        ValueError: the model has no such backbone.
    """
    backbone = _backbone(model)
    if backbone is None:
        raise ValueError(f"{type(model).__name__}: no embed_tokens/layers/norm backbone to split")
    view = copy.copy(backbone)
    view._modules = dict(backbone._modules)
    view._modules["layers"] = nn.ModuleList(list(backbone.layers)[start:stop])
    if not final_norm:
        view._modules["norm"] = nn.Identity()
    return view


def frozen_depth(model: nn.Module) -> int:
    """Number of leading blocks of ``model`` with no trainable parameter (0 if the embeddings train
    or the model cannot be split)."""
    backbone = _backbone(model)
    if backbone is None or any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        return 0
    depth = 0
    for block in backbone.layers:
        if any(p.requires_grad for p in block.parameters()):
            break
        depth += 1
    return depth


def _same(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                      for x, y in zip(pa, pb))


def common_depth(models: list[nn.Module]) -> int:
    """The deepest prefix of blocks, embeddings included, that is frozen and identical in all ``models``.

    Every model must be splittable with the same backbone class and hidden size; blocks are
    compared parameter by parameter (exact equality, same dtype). The last block is never
    counted (each network keeps at least its final block to run). Returns 0 when nothing is shared.
    """
    if len(models) < 2:
        return 0
    backbones = [_backbone(m) for m in models]
    if any(b is None for b in backbones) or len({type(b) for b in backbones}) > 1:
        return 0
    first = backbones[0]
    limit = min(min(frozen_depth(m) for m in models), len(first.layers) - 1)
    if limit < 1 or not all(_same(first.embed_tokens, b.embed_tokens) for b in backbones[1:]):
        return 0
    depth = 0
    while depth < limit and all(_same(first.layers[depth], b.layers[depth]) for b in backbones[1:]):
        depth += 1
    return depth


class SharedTrunk:
    """Groups of networks that share a frozen trunk, and the trunk's output for a batch.

    Args:
        models: name → network (policy, ref_policy, critic, reward_model, ...). Networks are
            grouped by :func:`common_depth`: all of them when they agree, else pairs in the order
            given (``[policy, ref_policy]``, ``[critic, reward_model]``), else none.
        groups: the candidate groups to try after "all together", as lists of names.

    Use :meth:`compute` once per batch of sequences, then pass each network's
    :class:`TrunkOutput` as ``trunk=`` to the forward functions of
    :mod:`rlhf_lightning.models.forward`.
    """

    def __init__(self, models: dict[str, nn.Module], groups: list[list[str]] = ()):
        self.models = models
        self.groups: list[tuple[list[str], int]] = []
        depth = common_depth(list(models.values()))
        if depth:
            self.groups.append((list(models), depth))
        else:
            for names in groups:
                depth = common_depth([models[n] for n in names])
                if depth:
                    self.groups.append((list(names), depth))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def describe(self) -> str:
        """One line naming the groups and their depths, for the log."""
        if not self.groups:
            return "no frozen trunk shared"
        total = lambda n: len(_backbone(self.models[n]).layers)  # noqa: E731
        return "; ".join(f"{', '.join(names)} share their first {depth} of {total(names[0])} blocks"
                         for names, depth in self.groups)

    @torch.no_grad()
    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, TrunkOutput]:
        """Run each group's trunk once on (B, T) sequences (no gradient).

        Returns:
            name → :class:`TrunkOutput` for every grouped network (networks in one group share
            the same tensor).
        """
        from rlhf_lightning.models.forward import position_ids_from_mask

        out: dict[str, TrunkOutput] = {}
        for names, depth in self.groups:
            view = backbone_view(self.models[names[0]], 0, depth, final_norm=False)
            hidden = view(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
            result = TrunkOutput(hidden, depth)
            out.update({name: result for name in names})
        return out


def shared_trunk_for(strategy: object, enabled: bool, models: dict[str, nn.Module | None],
                     groups: list[list[str]] = ()) -> SharedTrunk | None:
    """The :class:`SharedTrunk` of a LightningModule's networks, or ``None`` where it must not be used.

    Args:
        strategy: the trainer's strategy; sharded ones (FSDP, DeepSpeed) get no trunk, since their
            blocks are not plain modules that can be run one range at a time.
        enabled: the module's ``share_trunk`` setting.
        models: name → network; ``None`` entries are left out.
        groups: fallback groups (see :class:`SharedTrunk`).

    Returns:
        The trunk when at least one group shares a block (its groups are logged), else ``None``.
    """
    name = type(strategy).__name__
    if not enabled or "FSDP" in name or "DeepSpeed" in name:
        return None
    present = {k: m for k, m in models.items() if m is not None}
    trunk = SharedTrunk(present, [g for g in groups if all(n in present for n in g)])
    log.info("shared frozen trunk: %s", trunk.describe())
    return trunk or None
