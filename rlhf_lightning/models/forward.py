"""Forward passes that read exactly what RLHF needs from each network.

Sequences are (B, T) token ids laid out as ``[left padding | prompt | response | right padding]``
with ``attention_mask`` 1 on prompt and response tokens. Position ids are derived from the mask,
so a left-padded row gets the same positions as in ``generate``.

``packed=True`` (:func:`pack`) runs the rows padding-free: their attended tokens concatenated into one
row of N tokens, each row's positions restarting at 0, and no attention mask, which transformers reads
as packed sequences (``find_packed_sequence_indices``): flash-attention kernels run them as variable-length
sequences; SDPA and eager attention get a block-diagonal causal mask over the N tokens (dense, N × N).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_lightning.algorithms.ops import (
    entropy_from_logits,
    last_valid_index,
    logprobs_from_logits,
    position_ids_from_mask,
)
from rlhf_lightning.models.lora import own_adapter_active
from rlhf_lightning.models.parts import score_head
from rlhf_lightning.models.sharding import is_sharded
from rlhf_lightning.models.trunk import TrunkOutput, model_above, upper_view


def packs_by_default(model: nn.Module) -> bool:
    """Whether :func:`pack` pays on ``model``: its attention implementation runs packed rows as variable-length
    sequences (a flash-attention kernel, ``config._attn_implementation`` starting with ``flash``). With SDPA or
    eager attention the packed rows get a dense block-diagonal mask, measured slower on CPU (SmolLM2, 32 rows of
    ≤ 70 tokens, 17% padding: the training forward and backward +22% packed, ``bench/profile_issue26.md``)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return implementation.startswith("flash")


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, trunk: TrunkOutput | None = None):
    """Rows packed into one: their attended tokens in row-major order.

    Args:
        input_ids, attention_mask: (B, T) long; every row with at least one attended token.
        trunk: the rows' trunk output (B, T, H), packed the same way.

    Returns:
        ``(kept, ids, positions, trunk)``: ``kept`` (B, T) bool (``attention_mask`` as bool: which cells are packed,
        in order), ``ids`` and ``positions`` (1, N) long (each row's positions from 0, as
        :func:`~rlhf_lightning.algorithms.ops.position_ids_from_mask` gives them), the packed trunk (1, N, H) or
        ``None``.
    """
    kept = attention_mask.bool()
    positions = position_ids_from_mask(attention_mask)[kept][None]
    packed_trunk = None if trunk is None else TrunkOutput(trunk.hidden[kept][None], trunk.depth)
    return kept, input_ids[kept][None], positions, packed_trunk


def _hidden_states(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                   inputs_embeds: torch.Tensor | None = None, trunk: TrunkOutput | None = None,
                   packed: bool = False) -> torch.Tensor:
    """The backbone's last hidden states (B, T, H); with ``trunk``, only the blocks above it run. A critic on the
    policy's base runs with its own adapter active (:func:`~rlhf_lightning.models.lora.own_adapter_active`).
    ``packed``: the rows run packed (:func:`pack`; ``input_ids`` given), the states returned as (1, N, H)."""
    position_ids = None
    if packed:
        _, input_ids, position_ids, trunk = pack(input_ids, attention_mask, trunk)
        attention_mask = None
    if trunk is not None:
        backbone = upper_view(model, trunk)
        if input_ids is None and inputs_embeds is None:
            inputs_embeds = trunk.hidden  # any (B, T, H) input: the trunk's output replaces it
    else:
        backbone = getattr(model, model.base_model_prefix)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    with own_adapter_active(model):
        out = backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False)
    return out.last_hidden_state  # (B, T, H); packed (1, N, H)


def token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head at every position: (B, T) float32. The critic's V(s_t) at position t."""
    return score_head(model)(_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                    inputs_embeds: torch.Tensor | None = None, trunk: TrunkOutput | None = None,
                    packed: bool = False) -> torch.Tensor:
    """Reward-model score r(x, y): the scalar head at each row's last attended token. (B,) float32.

    Only the B last hidden states go through the head. ``inputs_embeds`` (B, T, H) replaces
    ``input_ids`` (pass ``None`` for it) when the embeddings are already looked up; ``trunk``
    (:class:`~rlhf_lightning.models.trunk.TrunkOutput` of the same rows) when the lower blocks
    have already run; ``packed``: the rows run padding-free (:func:`pack`; not with ``inputs_embeds``).
    """
    hidden = _hidden_states(model, input_ids, attention_mask, inputs_embeds, trunk, packed)  # (B, T, H) / (1, N, H)
    if packed:
        pooled = hidden[0, attention_mask.long().sum(1).cumsum(0) - 1]  # (B, H): each row's last packed token
    else:
        last = last_valid_index(attention_mask)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return score_head(model)(pooled).squeeze(-1).float()


#: What one forward call costs besides its tokens (Python, dispatch, the embedding lookup and head), in floating-point
#: operations of a one-thread CPU: a call of the 2-block tiny model took ~3–5 ms more than its tokens' FLOPs account
#: for (``bench/profile_issue26.md``, reward step: 3 length groups vs one padded call), ≈ 2e8 FLOPs at the ~50
#: GFLOP/s one core computes here. :func:`call_cost_tokens` turns it into tokens of a model.
CALL_OVERHEAD_FLOPS = 2e8


def call_cost_tokens(model: nn.Module) -> float:
    """:data:`CALL_OVERHEAD_FLOPS` in tokens of ``model``'s forward (2 FLOPs per weight of its blocks and head, the
    embedding table left out: a lookup): how much padding one forward call fewer is worth. SmolLM2-135M: ~1 token
    (grouping by length pays); the 2-block tiny model: ~1200 tokens (one padded call pays)."""
    embedding = model.get_input_embeddings()
    table = embedding.weight.numel() if embedding is not None else 0
    weights = sum(p.numel() for p in model.parameters()) - table
    return CALL_OVERHEAD_FLOPS / max(2 * weights, 1)


def length_groups(lengths: list[int], slack: float = 0.1, call_tokens: float = 0.0) -> list[list[int]]:
    """Partition rows into groups of similar length (longest first).

    A row joins the current group while padding the group to its longest row costs at most
    ``slack`` × the group's real tokens; otherwise it starts a new group. Then a group is merged into
    the one before it (its rows padded to that group's longest) while the padding this adds is below
    ``call_tokens``, the cost of one forward call counted in tokens (:func:`call_cost_tokens`).

    Args:
        lengths: tokens of each row (≥ 0). slack: ≥ 0, the padding allowed per group.
        call_tokens: ≥ 0; 0 merges nothing.

    Returns:
        Lists of row indices; every row appears once.
    """
    groups: list[list[int]] = []
    longest = total = 0
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        n = lengths[row]
        if groups and longest * (len(groups[-1]) + 1) <= (1 + slack) * (total + n):
            groups[-1].append(row)
            total += n
        else:
            groups.append([row])
            longest = total = n
    merged: list[list[int]] = []
    for group in groups:  # longest first: a group's widest row is its first
        if merged and len(group) * (lengths[merged[-1][0]] - lengths[group[0]]) < call_tokens:
            merged[-1].extend(group)
        else:
            merged.append(group)
    return merged


def right_padded_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        slack: float = 0.1, call_tokens: float = 0.0) -> torch.Tensor:
    """:func:`sequence_scores` of right-padded rows without computing most of the padding.

    Rows are run in groups of similar length (:func:`length_groups`), each group cut to its
    longest row, and the scores put back in row order. With causal attention and right
    padding a row's real tokens never see its padding, so the scores equal the padded batch's
    (up to float rounding), for a fraction of the compute when lengths vary (preference
    batches: chosen and rejected responses of different lengths). Rows that are not
    right-padded (a zero before a one in the mask) fall back to one padded forward, and so does
    a sharded model (:func:`~rlhf_lightning.models.sharding.is_sharded`): every rank must run the
    same number of forwards (each gathers the weights with the other ranks), and the number of
    groups depends on the rank's rows.

    Args:
        input_ids, attention_mask: (N, L) right-padded sequences (long).
        slack: padding allowed per group (see :func:`length_groups`).
        call_tokens: a forward call's cost in tokens (:func:`call_cost_tokens`): groups whose padding would cost
            less are merged (:func:`length_groups`).

    Returns:
        (N,) float32 scores, differentiable like :func:`sequence_scores`.
    """
    if is_sharded(model):
        return sequence_scores(model, input_ids, attention_mask)
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.long().cumprod(1).sum(1), lengths):  # one host sync
        return sequence_scores(model, input_ids, attention_mask)
    lengths = lengths.tolist()
    groups = length_groups(lengths, slack, call_tokens)
    if len(groups) == 1:
        return sequence_scores(model, input_ids, attention_mask)
    embeds = model.get_input_embeddings()(input_ids)  # one lookup: one embedding backward, not one per group
    pieces = []
    for rows in groups:
        index = torch.tensor(rows, device=input_ids.device)
        width = max(lengths[r] for r in rows)
        pieces.append(sequence_scores(model, None, attention_mask[index, :width], embeds[index, :width]))
    order = torch.tensor([r for rows in groups for r in rows], device=input_ids.device)
    return torch.cat(pieces)[torch.argsort(order)]


def response_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_start: int, trunk: TrunkOutput | None = None, packed: bool = False) -> torch.Tensor:
    """Critic values V(s_t) for the response tokens: (B, R) float32, R = T − response_start.

    V(s_t) is read at the position just before response token t (the state that token is
    chosen from), positions ``response_start − 1 … T − 2``. ``trunk``: the output of the
    critic's frozen lower blocks for these rows, if already computed. ``packed``: the rows run
    padding-free (:func:`pack`); values at padding are then 0 (the padded path computes them on padding).
    """
    if not packed:
        hidden = _hidden_states(model, input_ids, attention_mask, trunk=trunk)[:, response_start - 1 : -1]  # (B, R, H)
        return score_head(model)(hidden).squeeze(-1).float()
    hidden = _hidden_states(model, input_ids, attention_mask, trunk=trunk, packed=True)[0]  # (N, H)
    scores = score_head(model)(hidden).squeeze(-1).float()  # (N,)
    kept = attention_mask.bool()
    return scores.new_zeros(kept.shape).masked_scatter(kept, scores)[:, response_start - 1 : -1]


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_start: int, trunk: TrunkOutput | None = None) -> torch.Tensor:
    """The causal LM's next-token logits at the positions that predict the response tokens.

    Computed by the model's own ``forward`` (``logits_to_keep``: the head runs on the R + 1 last
    positions only), so the family's logit transforms are applied as when sampling: Granite's
    ``logits_scaling``, Cohere's ``logit_scale``, Gemma2/3's ``final_logit_softcapping``. With
    ``trunk``, the same ``forward`` runs only the blocks above it (:func:`~rlhf_lightning.models.trunk.model_above`).

    Args:
        input_ids, attention_mask: (B, T) prompt + response, prompt left-padded to
            ``response_start`` columns.
        response_start: P, the column of the first response token (≥ 1).
        trunk: the output of the model's frozen lower blocks for these rows, if already computed.

    Returns:
        (B, R, V) logits in the model's dtype, R = T − P; row t predicts response token t.
    """
    lm = model if trunk is None else model_above(model, trunk)
    width = input_ids.shape[1] - response_start
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
             use_cache=False, logits_to_keep=width + 1)
    return out.logits[:, :-1]  # (B, R, V): positions P - 1 ... T - 2


def valid_response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_start: int, trunk: TrunkOutput | None = None, packed: bool = False) -> torch.Tensor:
    """:func:`response_logits` at the valid response tokens only (``attention_mask[:, P:]`` 1), as one matrix.

    The model's own ``forward`` gets ``logits_to_keep`` as a (B, T) boolean mask (transformers'
    ``slice_logits_to_keep``: the kept hidden states flattened, row by row), so the LM head is one
    contiguous (n, H) × (H, V) product over the n positions that predict a valid response token, and
    none on padding (after EOS, or a row cut short), with the family's logit transforms applied as in
    :func:`response_logits`. The numbers are those of :func:`response_logits` at the same positions:
    each logit is the same dot product (up to the rounding of another matrix-product kernel).

    Args:
        input_ids, attention_mask: (B, T) prompt + response, prompt left-padded to ``response_start``
            columns; response tokens attended up to and including EOS.
        response_start: P (≥ 1). trunk: as :func:`response_logits`.
        packed: the rows run padding-free (:func:`pack`), the head on the same positions.

    Returns:
        (n, V) logits in the model's dtype, n = ``attention_mask[:, P:].sum()``, in row-major order of the
        valid tokens (``logits[i]`` predicts the i-th True of ``attention_mask[:, P:].bool()``).

    A ``forward`` that does not take a boolean ``logits_to_keep`` (older transformers releases, e.g. the vLLM
    venv's) gets :func:`response_logits` on every response position instead, then the valid ones are kept.
    """
    valid = attention_mask[:, response_start:].bool()  # (B, R)
    keep = torch.zeros_like(attention_mask, dtype=torch.bool)
    keep[:, response_start - 1 : -1] = valid  # position t predicts token t + 1
    n = int(valid.sum())
    try:
        if packed:
            kept, ids, positions, packed_trunk = pack(input_ids, attention_mask, trunk)
            lm = model if packed_trunk is None else model_above(model, packed_trunk)
            out = lm(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep[kept][None])
        else:
            lm = model if trunk is None else model_above(model, trunk)
            out = lm(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=keep)
        logits = out.logits
    except IndexError:  # a transformers release whose forward slices by an int or 1-d logits_to_keep only
        logits = None
    if logits is None or logits.dim() != 2 or logits.shape[0] != n:
        # The head on every response position, then the valid ones: the same numbers, more head work.
        return response_logits(model, input_ids, attention_mask, response_start, trunk)[valid]
    return out.logits


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_start: int, temperature: float = 1.0, with_entropy: bool = False,
                      trunk: TrunkOutput | None = None, packed: bool = False):
    """Log-probabilities of the response tokens under a causal LM, as its sampler computes them.

    The logits are :func:`valid_response_logits` (the model's own forward and logit transforms, the
    head on the valid response tokens only, as one matrix), divided by ``temperature``;
    log-probabilities are gathered without a full log-softmax
    (:func:`~rlhf_lightning.algorithms.ops.logprobs_from_logits`), then put back in (B, R) with 0 at padding.
    Entropy, when asked, is computed on the same valid tokens only.

    Args:
        input_ids, attention_mask: (B, T) prompt + response, prompt left-padded to
            ``response_start`` columns; the response's valid tokens are ``attention_mask[:, response_start:]``.
        response_start: column of the first response token.
        temperature: the sampling temperature (logits are divided by it, as when sampling).
        with_entropy: also return the per-token entropy (nats, no gradient).
        trunk: the output of the model's frozen lower blocks for these rows
            (:class:`~rlhf_lightning.models.trunk.SharedTrunk`), if already computed.
        packed: the rows run padding-free (:func:`pack`).

    Returns:
        logprobs (B, R) float32 (float64 for a float64 model), 0 where the response is padding, and entropy
        (B, R) of the same dtype (0 at padding) when ``with_entropy``.
    """
    valid = attention_mask[:, response_start:].bool()  # (B, R)
    logits = valid_response_logits(model, input_ids, attention_mask, response_start, trunk, packed)  # (n, V)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logprobs_from_logits(logits, input_ids[:, response_start:][valid])  # (n,)
    logprobs = picked.new_zeros(valid.shape).masked_scatter(valid, picked)  # (B, R)
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach())  # (n,)
    return logprobs, entropy.new_zeros(valid.shape).masked_scatter(valid, entropy)
