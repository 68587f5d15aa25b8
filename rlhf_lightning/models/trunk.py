"""A frozen trunk shared by several networks: its output computed once, the top blocks run on it.

In RLHF on a budget only the top blocks train (``model.trainable_layers``). The policy's frozen
lower blocks are then the reference's lower blocks, and a reward model or critic fine-tuned from
the same base the same way carries the same weights below its top blocks too. A PPO iteration
runs those networks over the same sequences (reference, reward model, then policy and critic
in every epoch), so the lower blocks compute the same hidden states up to six times.
:class:`SharedTrunk` finds the deepest prefix of blocks (and the embeddings) whose weights are
identical and frozen in a group of networks, runs it once per batch of sequences, and lets each
network run only its remaining blocks on that output. The result equals the full forward's
(the same operations in the same order): the blocks above the trunk run inside the backbone's
own ``forward`` with the lower blocks replaced by the trunk's output (:func:`upper_view`), so
per-layer settings (attention kinds, sliding windows, per-layer rotary embeddings), embedding
multipliers and the causal LM's logit transforms are those of the full forward. A probe at fit
start (:meth:`SharedTrunk.probe`) checks it on every network and turns sharing off, with a
warning, where it does not hold.

Only the transformers decoder layout with ``embed_tokens``, ``layers`` and ``norm`` on the
backbone (Llama, Qwen2/3, Gemma2/3, Mistral, Phi3, Granite, Olmo2, ...) is split; anything else
gets no trunk.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.algorithms.ops import position_ids_from_mask

log = logging.getLogger(__name__)

#: Largest difference between a forward on the shared trunk and the full forward that
#: :meth:`SharedTrunk.probe` accepts (max absolute difference of the last hidden states).
PROBE_TOLERANCE = 1e-5


@dataclass
class TrunkOutput:
    """Hidden states after the first ``depth`` blocks of a backbone.

    Attributes:
        hidden: (B, T, H) float, the residual stream entering block ``depth`` (no gradient).
        depth: number of blocks already applied (≥ 1).
    """

    hidden: torch.Tensor
    depth: int

    def rows(self, index: torch.Tensor) -> TrunkOutput:
        """The same trunk output for a subset of rows (``index``: (b,) long)."""
        return TrunkOutput(self.hidden[index], self.depth)

    def columns(self, width: int) -> TrunkOutput:
        """The first ``width`` columns: with causal attention, the trunk output of the sequences cut
        to that width (used when the reward model scores one column more than the others see)."""
        return self if self.hidden.shape[1] == width else TrunkOutput(self.hidden[:, :width], self.depth)


@dataclass(frozen=True)
class Trunks:
    """The shared trunk's output for each network of an RLHF step (``None``: that network runs in full).

    Attributes:
        policy, ref_policy, critic: (B, T, H) trunk outputs for the rollout's sequences.
        reward_model: (B, T or T + 1, H): the reward model reads the scoring inputs, which may carry
            one appended EOS column (:func:`rlhf_lightning.rollout.experience.scoring_inputs`).
    """

    policy: TrunkOutput | None = None
    ref_policy: TrunkOutput | None = None
    critic: TrunkOutput | None = None
    reward_model: TrunkOutput | None = None

    @classmethod
    def of(cls, outputs: dict[str, TrunkOutput], width: int) -> Trunks:
        """From :meth:`SharedTrunk.compute`'s name → output, computed on the scoring inputs: the reward
        model keeps its columns, the other networks read the first ``width`` (= T) columns."""
        return cls(**{name: out if name == "reward_model" else out.columns(width) for name, out in outputs.items()})

    def rows(self, index: torch.Tensor) -> Trunks:
        """The policy's and the critic's trunk outputs for a subset of rows (``index``: (b,) long),
        what a minibatch's training forwards read; the frozen networks' are left out."""
        pick = lambda out: out.rows(index) if out is not None else None  # noqa: E731
        return Trunks(policy=pick(self.policy), critic=pick(self.critic))


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The decoder backbone of a transformers model (``model.<base_model_prefix>``) when it has the
    ``embed_tokens``/``layers``/``norm`` layout that can be split, else ``None``."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or not all(hasattr(backbone, a) for a in ("embed_tokens", "layers", "norm")):
        return None
    return backbone


class _PassThrough(nn.Module):
    """Stands in for a block that the trunk already ran: returns its input, or ``hidden`` when set."""

    def __init__(self, hidden: torch.Tensor | None = None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


def _shallow_copy(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters, with some direct children replaced (not registered)."""
    view = copy.copy(module)
    view._modules = {**module._modules, **children}
    return view


def trunk_view(model: nn.Module, depth: int) -> nn.Module:
    """The backbone restricted to its first ``depth`` blocks, without the final norm, sharing its parameters.

    Its ``forward`` is the backbone's own (embeddings and their scaling, masks per layer type,
    rotary embeddings): blocks ``0 … depth − 1`` keep their indices, so per-layer settings read
    by loop index (``config.layer_types[i]``) are the right ones. ``last_hidden_state`` is the
    residual stream entering block ``depth``.

    Raises:
        ValueError: the model has no splittable backbone.
    """
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"{type(model).__name__}: no embed_tokens/layers/norm backbone to split")
    return _shallow_copy(backbone, layers=nn.ModuleList(list(backbone.layers)[:depth]), norm=nn.Identity())


def upper_view(model: nn.Module, trunk: TrunkOutput) -> nn.Module:
    """The backbone with its first ``trunk.depth`` blocks replaced by the trunk's output.

    The block list keeps its full length: blocks ``0 … depth − 2`` pass their input through and
    block ``depth − 1`` returns ``trunk.hidden``, so the backbone's own ``forward`` runs unchanged
    (embeddings, masks, per-layer settings by index, the final norm) and every block above the
    trunk sees exactly the inputs it sees in a full forward. The embedding lookup still runs (its
    output is discarded). Shares the model's parameters; registered nowhere.

    Raises:
        ValueError: the model has no splittable backbone.
    """
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"{type(model).__name__}: no embed_tokens/layers/norm backbone to split")
    skipped = [_PassThrough() for _ in range(trunk.depth - 1)] + [_PassThrough(trunk.hidden)]
    return _shallow_copy(backbone, layers=nn.ModuleList(skipped + list(backbone.layers)[trunk.depth:]))


def model_above(model: nn.Module, trunk: TrunkOutput) -> nn.Module:
    """The whole model (its head and ``forward`` included) running only the blocks above ``trunk``:
    a shallow copy whose backbone is :func:`upper_view`. Calling it is calling the model's own
    ``forward``, so a causal LM's logit transforms (scaling, soft-capping) apply as in sampling."""
    backbone = backbone_of(model)
    name = next(n for n, child in model._modules.items() if child is backbone)
    return _shallow_copy(model, **{name: upper_view(model, trunk)})


def frozen_depth(model: nn.Module) -> int:
    """Number of leading blocks of ``model`` with no trainable parameter (0 if the embeddings train
    or the model cannot be split)."""
    backbone = backbone_of(model)
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
                                      for x, y in zip(pa, pb, strict=True))


def common_depth(models: list[nn.Module]) -> int:
    """The deepest prefix of blocks, embeddings included, that is frozen and identical in all ``models``.

    Every model must be splittable with the same backbone class and hidden size; blocks are
    compared parameter by parameter (exact equality, same dtype). The last block is never
    counted (each network keeps at least its final block to run). Returns 0 when nothing is shared.
    """
    if len(models) < 2:
        return 0
    backbones = [backbone_of(m) for m in models]
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
        total = lambda n: len(backbone_of(self.models[n]).layers)  # noqa: E731
        return "; ".join(f"{', '.join(names)} share their first {depth} of {total(names[0])} blocks"
                         for names, depth in self.groups)

    def depth_of(self, name: str) -> int | None:
        """The depth of the trunk that network ``name`` shares (``None``: it is in no group)."""
        return next((depth for names, depth in self.groups if name in names), None)

    @torch.no_grad()
    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                known: dict[str, TrunkOutput] | None = None) -> dict[str, TrunkOutput]:
        """Run each group's trunk once on (B, T) sequences (no gradient).

        Args:
            input_ids, attention_mask: (B, T) long.
            known: network name → its trunk's output on these sequences, already computed (the policy's, kept
                while sampling: :func:`~rlhf_lightning.rollout.sampler.sample_responses`); used for that
                network's group when its depth is the group's and its shape (B, T, ·), instead of running it.

        Returns:
            name → :class:`TrunkOutput` for every grouped network (networks in one group share
            the same tensor).
        """
        out: dict[str, TrunkOutput] = {}
        for names, depth in self.groups:
            given = next((known[n] for n in names if known and n in known), None)
            if given is not None and given.depth == depth and given.hidden.shape[:2] == input_ids.shape:
                out.update({name: given for name in names})
                continue
            view = trunk_view(self.models[names[0]], depth)
            hidden = view(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
            result = TrunkOutput(hidden, depth)
            out.update({name: result for name in names})
        return out

    @torch.no_grad()
    def probe(self, tolerance: float = PROBE_TOLERANCE) -> str | None:
        """Check on a small random batch that every grouped network's forward on the trunk equals its
        full forward (the backbone's last hidden states, max absolute difference ≤ ``tolerance``).

        The batch (2 rows of 12 tokens, the second left-padded by 5) is drawn from a private
        generator, so the global RNG is untouched. Catches a family whose backbone does something a
        split cannot reproduce.

        Returns:
            ``None`` when every network agrees, else one line naming the first network that does not
            and by how much.
        """
        for names, _depth in self.groups:
            first = self.models[names[0]]
            weight = first.get_input_embeddings().weight
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, weight.shape[0], (2, 12), generator=generator).to(weight.device)
            mask = torch.ones_like(ids)
            mask[1, :5] = 0

            positions = position_ids_from_mask(mask)
            trunk = self.compute(ids, mask)
            for name in names:
                model = self.models[name]
                kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                full = backbone_of(model)(**kwargs).last_hidden_state
                split = upper_view(model, trunk[name])(**kwargs).last_hidden_state
                diff = float((full - split)[mask.bool()].abs().max())
                if not diff <= tolerance:
                    return (f"{name}: the forward on the shared trunk differs from the full forward by {diff:.3g} "
                            f"(> {tolerance:g}) on {type(model).__name__}")
        return None


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
        The trunk when at least one group shares a block and :meth:`SharedTrunk.probe` finds its
        forwards exact (its groups are logged), else ``None`` (with a warning naming the reason when
        the probe failed).
    """
    name = type(strategy).__name__
    if not enabled:
        return None
    if "FSDP" in name or "DeepSpeed" in name:
        log.warning("shared frozen trunk off under %s: its blocks are sharded units, not modules that can run one "
                    "range at a time (share_trunk=false silences this)", name)
        return None
    present = {k: m for k, m in models.items() if m is not None}
    trunk = SharedTrunk(present, [g for g in groups if all(n in present for n in g)])
    problem = trunk.probe() if trunk else None
    if problem is not None:
        log.warning("shared frozen trunk off: %s", problem)
        return None
    log.info("shared frozen trunk: %s", trunk.describe())
    return trunk or None
