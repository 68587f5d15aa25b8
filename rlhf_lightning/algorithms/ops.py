"""Masked reductions and log-probability utilities for RLHF.

Conventions used throughout this module
---------------------------------------
* Per-token tensors are shaped ``(B, T)``: ``B`` sequences, ``T`` response tokens.
* ``mask`` is a ``(B, T)`` tensor, either ``bool`` or a float/int tensor of 0/1
  values, that is true/1 at valid response tokens (up to and including EOS) and
  false/0 at padding.  Any non-zero entry counts as valid.
* Masked reductions only look at valid positions.  Values at masked positions
  are *selected away* (``torch.where``), never multiplied by zero, so ``inf`` or
  ``NaN`` sitting in padding cannot leak into results or gradients.
* A row with no valid token contributes nothing; a fully masked input reduces
  to ``0`` (never ``NaN``) and back-propagates zero, finite gradients.

Nothing in this module synchronises with the host (no ``.item()``, no
data-dependent Python branches on tensor values), except :func:`sampling_noise`,
which reads its keys on the host to seed one generator per row.

Data parallelism: a mean over a batch that several processes share is each
process's sum divided by the whole batch's count over the number of processes
(:class:`BatchCounts`, :func:`token_mean`), so that the processes' average is the
whole batch's mean; a mean of per-process means is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BatchCounts",
    "masked_sum",
    "masked_mean",
    "token_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "response_mask_from_eos",
    "sample_from_logits",
    "truncation_log_mass",
    "row_seed",
    "sampling_noise",
    "last_valid_index",
    "explained_variance",
    "DEFAULT_CHUNK_SIZE",
    "position_ids_from_mask",
]

#: Default number of token rows (positions) whose logits are processed at once by
#: :func:`logprobs_from_logits` / :func:`entropy_from_logits`.  With a 150k
#: vocabulary, one float32 chunk is about 1024 * 150_000 * 4 B = 0.6 GB.
DEFAULT_CHUNK_SIZE = 1024


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _as_bool_mask(mask: Tensor, like: Tensor, name: str = "x") -> Tensor:
    """Check ``mask.shape == like.shape`` and return ``mask`` as a bool tensor."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(like.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` (bool) is true, exactly 0 elsewhere (gradient 0 there too)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _count(mask: Tensor, dim: int | None, dtype: torch.dtype) -> Tensor:
    """Number of valid entries (as ``dtype``), summed over ``dim`` (all if None)."""
    return mask.sum(dtype=dtype) if dim is None else mask.sum(dim=dim, dtype=dtype)


# --------------------------------------------------------------------------- #
# Validation helpers (shared by losses.py and rewards.py)
# --------------------------------------------------------------------------- #
def check_same_shape(**tensors: Tensor) -> torch.Size:
    """The common shape of the named tensors.

    Raises:
        ValueError: an argument is not a tensor, or the shapes differ (the message names both).
    """
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(
                f"shape mismatch: {name0} is {tuple(t0.shape)} but {name} is {tuple(t.shape)}"
            )
    return t0.shape


def check_2d(name: str, t: Tensor) -> None:
    """Raise ValueError unless ``t`` is 2-D ``(B, T)`` (the message names it)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(t.shape)}")


def check_per_row(name: str, t: object, like: Tensor) -> None:
    """Raise ValueError unless ``t`` is a tensor of shape ``(B,)``, one value per row of ``like`` ``(B, ...)``
    (the message names it and both shapes)."""
    if not isinstance(t, Tensor) or t.shape != like.shape[:1]:
        raise ValueError(f"{name} must have shape ({like.shape[0]},), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def bool_mask(mask: Tensor) -> Tensor:
    """``mask`` as a bool tensor (a 0/1 tensor is compared with 0)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_unit_interval(name: str, value: float) -> float:
    """``value`` as a float in [0, 1].

    Raises:
        ValueError: outside [0, 1] or NaN (the message names it).
    """
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def float_dtype(*tensors: Tensor) -> torch.dtype:
    """Promoted dtype of the inputs, at least float32 (bf16/fp16 are upcast)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------- #
# Masked reductions
# --------------------------------------------------------------------------- #
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over valid positions.

    Args:
        x: float tensor of any shape, typically ``(B, T)``.
        mask: bool or 0/1 tensor with exactly ``x``'s shape; true marks valid entries.
        dim: dimension to reduce.  ``None`` reduces everything to a 0-d tensor;
            e.g. ``dim=1`` on ``(B, T)`` gives a ``(B,)`` per-row sum.

    Returns:
        Tensor with ``x``'s dtype (0-d for ``dim=None``).  Masked entries are
        excluded (even if they hold ``inf``/``NaN``); an empty selection sums to 0.

    Raises:
        ValueError: if ``mask.shape != x.shape``.
    """
    m = _as_bool_mask(mask, x)
    selected = _select(x, m)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions.

    ``dim=None`` averages over *all* valid tokens of the batch (token-level mean,
    each token weighs the same); ``dim=1`` on ``(B, T)`` gives a ``(B,)`` per-row
    mean.  Rows (or a whole batch) with no valid entry give exactly ``0`` and
    receive zero gradient; the denominator is clamped to at least 1.

    Args:
        x: float tensor, typically ``(B, T)``.
        mask: bool or 0/1 tensor with ``x``'s shape.
        dim: reduction dimension or ``None`` for a scalar.

    Returns:
        Tensor with ``x``'s dtype: 0-d for ``dim=None``, otherwise ``x`` with
        ``dim`` removed.

    Raises:
        ValueError: if ``mask.shape != x.shape``.
    """
    m = _as_bool_mask(mask, x)
    total = masked_sum(x, m, dim=dim)
    return total / _count(m, dim, total.dtype).clamp(min=1)


@dataclass(frozen=True)
class BatchCounts:
    """The sizes of a batch that several processes train on together, each holding some of its rows.

    Under data parallelism (DDP, FSDP) every process backpropagates its own loss and the gradients are
    averaged over the ``world_size`` processes. A mean over the whole batch (over its valid tokens, or its
    sequences) is then the average of the processes' gradients only if each process divides its own sum by
    the batch's count over all processes divided by ``world_size`` (:meth:`per_process`), not by its own
    count: the mean of per-process means weighs a token of a process with few tokens more than one of a
    process with many. TRL divides by ``num_items_in_batch`` gathered over processes, verl by the global
    token count times the data-parallel size; so does :func:`token_mean` and
    :func:`rlhf_lightning.algorithms.losses.aggregate_loss`.

    Attributes:
        tokens: 0-d float64, valid tokens of the whole batch (every process's rows).
        sequences: 0-d float64, rows with at least one valid token.
        rows: 0-d float64, rows.
        world_size: the number of processes whose gradients are averaged (1: one process).
    """

    tokens: Tensor
    sequences: Tensor
    rows: Tensor
    world_size: int = 1

    @classmethod
    def of(cls, mask: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None, world_size: int = 1
           ) -> BatchCounts:
        """The counts of this process's ``mask`` (``(B, T)`` bool or 0/1), summed over the processes by
        ``all_reduce`` (a function returning the element-wise sum over processes of a ``(3,)`` float64 tensor,
        e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``; ``None``: this process alone, and
        ``world_size`` must be 1). Every process must call it (a collective).

        Raises:
            ValueError: ``mask`` is not 2-D; ``world_size`` < 1, or > 1 without ``all_reduce``.
        """
        check_2d("mask", mask)
        if world_size < 1 or (world_size > 1 and all_reduce is None):
            raise ValueError(f"BatchCounts.of: world_size={world_size} needs an all_reduce over the processes")
        m = bool_mask(mask)
        local = torch.stack([m.sum(dtype=torch.float64), m.any(dim=1).sum(dtype=torch.float64),
                             torch.tensor(float(m.shape[0]), dtype=torch.float64, device=m.device)])
        tokens, sequences, rows = (all_reduce(local) if all_reduce is not None else local).unbind()
        return cls(tokens, sequences, rows, world_size)

    def per_process(self, unit: str) -> Tensor:
        """What each process divides its sum over ``unit`` (``tokens``, ``sequences`` or ``rows``) by: the count
        over all processes (at least 1) divided by ``world_size``. 0-d float64.

        Raises:
            ValueError: an unknown ``unit``.
        """
        if unit not in ("tokens", "sequences", "rows"):
            raise ValueError(f"unit must be tokens, sequences or rows, got {unit!r}")
        return getattr(self, unit).clamp(min=1) / self.world_size


def token_mean(x: Tensor, mask: Tensor, counts: BatchCounts | None = None) -> Tensor:
    """Mean of ``x`` over the valid tokens of the whole batch, this process's share (:class:`BatchCounts`):
    ``masked_sum(x, mask) / counts.per_process("tokens")``. The mean over processes of the results is the
    token mean of all processes' rows together. ``counts`` ``None``: :func:`masked_mean` of this batch.

    Args:
        x: float tensor, typically ``(B, T)``.
        mask: bool or 0/1 tensor with ``x``'s shape.
        counts: the whole batch's counts, or ``None``.

    Returns:
        0-d tensor with ``x``'s dtype.

    Raises:
        ValueError: if ``mask.shape != x.shape``.
    """
    if counts is None:
        return masked_mean(x, mask)
    total = masked_sum(x, mask)
    return total / counts.per_process("tokens").to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` (all valid entries pooled together).

    Args:
        x: float tensor, typically ``(B, T)``.
        mask: bool or 0/1 tensor with ``x``'s shape.
        unbiased: divide the summed squared deviations by ``n - 1`` (Bessel's
            correction) instead of ``n``, where ``n`` is the number of valid entries.

    Returns:
        0-d tensor with ``x``'s dtype.  It is ``0`` (not ``NaN``) when ``n == 0``,
        and also when ``n == 1`` with ``unbiased=True`` (the denominator is
        clamped to at least 1 and the single deviation is 0).

    Raises:
        ValueError: if ``mask.shape != x.shape``.
    """
    m = _as_bool_mask(mask, x)
    xs = _select(x, m)  # padding -> 0 first, so inf/NaN there cannot poison gradients
    mean = masked_mean(xs, m)
    sq_dev = masked_sum((xs - mean) ** 2, m)
    n = _count(m, None, sq_dev.dtype)
    denom = (n - 1) if unbiased else n
    return sq_dev / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Standardise ``x`` with the mean and (unbiased) variance of its valid entries.

    ``out = (x - mean) / sqrt(var + eps)`` at valid positions; if ``shift_mean`` is
    False the mean is added back (``out + mean``: rescale only, keeps the sign
    convention of e.g. rewards).  This is the usual advantage normalisation of
    PPO implementations (statistics pooled over the whole batch, not per row).

    With ``all_reduce`` (distributed training: e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``),
    the statistics are those of the valid entries of every process's ``x`` together, as one process
    holding all of them would compute (OpenRLHF whitens so): each process sums its valid entries, their
    squares and their count into a ``(3,)`` float64 tensor, ``all_reduce`` returns the element-wise sum
    over processes, and ``mean = S / n``, ``var = (Q - n * mean^2) / (n - 1)`` (float64, so the
    subtraction loses little). Every process must call it (a collective). The statistics are then
    constants for autograd (computed from ``x.detach()``): use it on advantages, which carry no gradient.

    Args:
        x: float tensor, typically ``(B, T)`` advantages.
        mask: bool or 0/1 tensor with ``x``'s shape.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance before the square root (must be > 0).
        all_reduce: ``None`` (this tensor's statistics only), or a function summing a ``(3,)`` float64
            tensor over processes and returning the result (in place or not).

    Returns:
        Tensor shaped and typed like ``x``; masked positions are exactly 0.  A
        fully masked input returns all zeros.

    Raises:
        ValueError: if ``mask.shape != x.shape`` or ``eps <= 0``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    m = _as_bool_mask(mask, x)
    xs = _select(x, m)
    if all_reduce is None:
        mean = masked_mean(xs, m)
        var = masked_var(xs, m, unbiased=True)
    else:
        mean, var = _pooled_mean_var(xs.detach(), m, all_reduce)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (xs - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _select(out, m)


def _pooled_mean_var(xs: Tensor, m: Tensor, all_reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance (0-d float64) of the valid entries of ``xs`` on all processes:
    ``[sum, sum of squares, count]`` summed by ``all_reduce`` (see :func:`masked_whiten`)."""
    x64 = xs.to(torch.float64)  # masked entries are 0 already
    stats = torch.stack([x64.sum(), (x64 * x64).sum(), m.sum(dtype=torch.float64)])
    total, total_sq, n = all_reduce(stats).unbind()
    mean = total / n.clamp(min=1)
    var = (total_sq - n * mean * mean) / (n - 1).clamp(min=1)
    return mean, var.clamp(min=0)  # n <= 1: 0, as masked_var


# --------------------------------------------------------------------------- #
# Chunked log-probs / entropy from logits
# --------------------------------------------------------------------------- #
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16/fp16/fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(B: int, T: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """Yield ``(batch_slice, time_slice)`` blocks of at most ~``chunk_size`` positions.

    Blocks are rectangular in ``(B, T)`` so slicing a ``(B, T, V)`` tensor never
    copies more than one block, even if the tensor is a non-contiguous view such
    as ``logits[:, :-1]`` (a flat ``reshape(-1, V)`` would copy all of it).
    """
    if B == 0 or T == 0:
        return
    if T >= chunk_size:
        for b in range(B):
            for t0 in range(0, T, chunk_size):
                yield slice(b, b + 1), slice(t0, min(t0 + chunk_size, T))
    else:
        rows = max(1, chunk_size // T)
        for b0 in range(0, B, rows):
            yield slice(b0, min(b0 + rows, B)), slice(0, T)


def _scaled_block(logits: Tensor, bs: slice, ts: slice, temperature: float) -> Tensor:
    """Upcast one ``(b, t, V)`` block to the compute dtype and divide by temperature."""
    z = logits[bs, ts].to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    return z


class _ChunkedLogprob(torch.autograd.Function):
    """log softmax(logits / temperature)[label], one block of positions at a time.

    Saves only the original logits (no upcast copy) and the per-position
    log-normaliser; the backward recomputes the softmax block by block:
    d logp / d z_j = (1[j == label] - softmax_j) / temperature.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, chunk_size: int) -> Tensor:
        B, T, _ = logits.shape
        cdtype = _compute_dtype(logits.dtype)
        out = torch.empty(B, T, dtype=cdtype, device=logits.device)
        lse = torch.empty(B, T, dtype=cdtype, device=logits.device)
        for bs, ts in _blocks(B, T, chunk_size):
            z = _scaled_block(logits, bs, ts, temperature)
            block_lse = torch.logsumexp(z, dim=-1)
            picked = z.gather(-1, labels[bs, ts].unsqueeze(-1)).squeeze(-1)
            out[bs, ts] = picked - block_lse
            lse[bs, ts] = block_lse
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        B, T, _ = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for bs, ts in _blocks(B, T, ctx.chunk_size):
            z = _scaled_block(logits, bs, ts, ctx.temperature)
            g_out = grad_out[bs, ts].to(z.dtype).unsqueeze(-1)
            g = torch.exp(z - lse[bs, ts].unsqueeze(-1)).mul_(-g_out)
            g.scatter_add_(-1, labels[bs, ts].unsqueeze(-1), g_out)
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad[bs, ts] = g.to(logits.dtype)
        return grad, None, None, None


class _ChunkedEntropy(torch.autograd.Function):
    """H = logsumexp(z) - sum_j softmax_j z_j, one block of positions at a time.

    Backward: dH/dz_j = -p_j (z_j - E_p[z]).  Vocabulary entries with zero
    probability (e.g. ``-inf`` logits) contribute exactly 0 to value and gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int) -> Tensor:
        B, T, _ = logits.shape
        cdtype = _compute_dtype(logits.dtype)
        out = torch.empty(B, T, dtype=cdtype, device=logits.device)
        lse = torch.empty(B, T, dtype=cdtype, device=logits.device)
        for bs, ts in _blocks(B, T, chunk_size):
            z = _scaled_block(logits, bs, ts, 1.0)
            m = z.amax(-1, keepdim=True)
            e = (z - m).exp_()  # unnormalised probabilities, max 1
            log_s = e.sum(-1).log()
            # H = log s - sum(e log e) / s, with p = e / s; xlogy(0, 0) = 0 drops zero-probability entries
            out[bs, ts] = log_s - torch.xlogy(e, e).sum(-1) / log_s.exp()
            lse[bs, ts] = m.squeeze(-1) + log_s
        ctx.save_for_backward(logits, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse = ctx.saved_tensors
        B, T, _ = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        zero = None
        for bs, ts in _blocks(B, T, ctx.chunk_size):
            z = _scaled_block(logits, bs, ts, 1.0)
            if zero is None:
                zero = torch.zeros((), dtype=z.dtype, device=z.device)
            p = torch.exp(z - lse[bs, ts].unsqueeze(-1))
            pz = torch.where(p > 0, p * z, zero)
            mean_z = pz.sum(-1, keepdim=True)
            g = torch.where(p > 0, -p * (z - mean_z), zero)
            g = g * grad_out[bs, ts].to(z.dtype).unsqueeze(-1)
            grad[bs, ts] = g.to(logits.dtype)
        return grad, None


def _as_3d(logits: Tensor) -> tuple[Tensor, torch.Size]:
    """View ``(..., V)`` logits as ``(B, T, V)``; also return the leading shape."""
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise ValueError(
            f"logits must be a tensor of shape (..., V) with at least 2 dims, got "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    lead = logits.shape[:-1]
    if logits.dim() == 2:
        return logits.unsqueeze(0), lead
    if logits.dim() == 3:
        return logits, lead
    return logits.flatten(0, -3), lead


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Computes ``log p(label) = z[label] - logsumexp(z)`` with ``z = logits / temperature``
    without ever materialising a ``(B, T, V)`` log-softmax.  Positions are
    processed in blocks of about ``chunk_size`` rows; each block is upcast to
    float32 on its own, so for bf16/fp16 logits the float32 copy never covers
    the full tensor.  A custom autograd function saves only the original logits
    and a ``(B, T)`` log-normaliser, and recomputes the softmax block-wise in the
    backward pass, so training does not keep a float32 copy alive either.

    Args:
        logits: ``(B, T, V)`` (or any ``(..., V)``) float tensor of any float dtype.
            Already aligned with ``labels`` (i.e. the logits that *predict*
            ``labels[b, t]``; shift before calling).
        labels: ``(B, T)`` (matching ``logits.shape[:-1]``) integer token ids.
            Every entry, padding included, must lie in ``[0, V)``; mask padded
            positions afterwards instead of using ignore indices such as -100.
        temperature: sampling temperature (> 0) that divides the logits first;
            use the temperature the responses were sampled with.
        chunk_size: keyword-only; positions per block (>= 1).

    Returns:
        ``(B, T)`` log-probabilities in nats, float32 (float64 if ``logits`` is
        float64).  Differentiable w.r.t. ``logits`` (first-order only).

    Raises:
        ValueError: if ``logits`` has fewer than 2 dims or is not floating point,
            ``labels.shape != logits.shape[:-1]``, ``labels`` is not an integer
            tensor, ``temperature <= 0`` or ``chunk_size < 1``.
    """
    logits3, lead = _as_3d(logits)
    if not isinstance(labels, Tensor) or labels.shape != lead:
        raise ValueError(
            f"labels shape {tuple(labels.shape) if isinstance(labels, Tensor) else None} "
            f"must equal logits.shape[:-1] = {tuple(lead)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_chunk_size(chunk_size)
    labels3 = labels.reshape(logits3.shape[:-1]).long()
    out = _ChunkedLogprob.apply(logits3, labels3, temperature, chunk_size)
    return out.reshape(lead)


def entropy_from_logits(logits: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Entropy of ``softmax(logits)`` at every position, in nats.

    ``H = logsumexp(z) - sum_j softmax(z)_j * z_j`` (equal to ``-sum p log p``),
    computed block-wise in float32 exactly like :func:`logprobs_from_logits`, so
    no full ``(B, T, V)`` softmax or float32 copy is ever kept.  Entries with
    ``-inf`` logits (zero probability) contribute 0.

    Args:
        logits: ``(B, T, V)`` (or any ``(..., V)``) float tensor of any float dtype.
        chunk_size: keyword-only; positions per block (>= 1).

    Returns:
        ``(B, T)`` entropy in nats, float32 (float64 for float64 input), in
        ``[0, log V]``.  Differentiable w.r.t. ``logits`` (first-order only).

    Raises:
        ValueError: if ``logits`` has fewer than 2 dims or is not floating point,
            or ``chunk_size < 1``.
    """
    logits3, lead = _as_3d(logits)
    _check_chunk_size(chunk_size)
    return _ChunkedEntropy.apply(logits3, chunk_size).reshape(lead)


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def _truncated_weights(logits: Tensor, temperature: float, top_k: int, top_p: float
                       ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The kept tokens of :func:`sample_from_logits`: ``(weights, index, z_max)`` with ``weights`` ``(B, K)``
    float64 the unnormalised probabilities ``exp(z - z_max)`` of the candidates (0 for those top-p drops),
    ``index`` ``(B, K)`` their token ids (``None``: all V tokens in order, K = V), ``z_max`` ``(B, 1)`` the largest
    scaled logit (float32; float64 for float64 logits)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a 2-D (B, V) floating-point tensor")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    z = logits.to(_compute_dtype(logits.dtype))  # float64 stays float64
    if temperature != 1.0:
        z = z / temperature
    index = None
    if 0 < top_k < z.shape[-1]:
        z, index = z.topk(top_k, dim=-1)  # sorted, likeliest first
    elif top_p < 1.0:
        z, index = z.sort(dim=-1, descending=True)
    z_max = z.amax(-1, keepdim=True)
    weights = (z - z_max).exp_().double()  # unnormalised probabilities, max 1
    if top_p < 1.0:
        probs = weights / weights.sum(-1, keepdim=True)
        weights = weights.masked_fill_(probs.cumsum(-1) - probs >= top_p, 0.0)
    return weights, index, z_max


def truncates(top_k: int, top_p: float) -> bool:
    """Whether ``top_k``/``top_p`` restrict sampling to part of the vocabulary (``top_k`` > 0 or ``top_p`` < 1)."""
    return top_k > 0 or top_p < 1.0


def sample_from_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    uniform: Tensor | None = None,
) -> Tensor:
    """Draw one token per row from ``softmax(logits / temperature)``, optionally restricted to
    the ``top_k`` likeliest tokens and then to the nucleus of mass ``top_p`` (Holtzman et al.
    2020), in the order transformers' warpers apply them (temperature, top-k, top-p).

    Inverse-CDF sampling: one uniform number per row against the cumulative sum of the kept
    tokens' unnormalised probabilities (float64, so tokens with tiny probability keep their
    share). ``torch.multinomial``, which ``transformers``' ``generate`` uses, draws one exponential
    random number per vocabulary entry and was the largest cost of CPU generation. With
    ``top_k`` only the k largest logits are kept (``topk``, no full sort); ``top_p < 1`` without
    ``top_k`` sorts the whole row. Nucleus rule: a token is dropped when the mass of the tokens
    ranked before it is already ``>= top_p`` (the likeliest token is always kept).

    Because each row reads one number, a row's token depends on that number and the row's own
    logits only, not on the other rows: with ``uniform`` given per row (e.g. from
    :func:`rlhf_lightning.rollout.sampler.sampling_noise`), a response does not depend on the batch it is in.

    Args:
        logits: ``(B, V)`` float tensor of any float dtype (``-inf`` entries are never drawn).
        temperature: > 0.
        top_k: keep the k largest logits (0 or >= V: all).
        top_p: nucleus mass in (0, 1] (1: all).
        generator: optional ``torch.Generator`` on the logits' device (ignored with ``uniform``).
        uniform: keyword-only, ``(B,)`` numbers in [0, 1), one per row, used instead of drawing them.

    Returns:
        ``(B,)`` long token ids.

    Raises:
        ValueError: ``logits`` not 2-D floating point, ``temperature <= 0``, ``top_k < 0``,
            ``top_p`` outside (0, 1], or ``uniform`` not shaped ``(B,)``.
    """
    weights, index, _ = _truncated_weights(logits, temperature, top_k, top_p)
    cdf = weights.cumsum_(-1)
    if uniform is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    else:
        check_per_row("uniform", uniform, logits)
        u = uniform.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(1)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
    return (picked if index is None else index.gather(-1, picked)).squeeze(-1)


def truncation_log_mass(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Log of the probability mass that top-k/top-p keep of ``softmax(logits / temperature)``, per row: the
    sampled token's log-probability under the distribution it was drawn from (the kept tokens, renormalised:
    vLLM's and TRL's "processed" log-probability) is its full-distribution log-probability minus this.

    Args:
        logits: ``(B, V)`` float tensor. temperature, top_k, top_p: as :func:`sample_from_logits`.

    Returns:
        ``(B,)`` float32 (float64 for float64 logits), ``<= 0`` nats; exactly 0 when nothing is truncated
        (:func:`truncates` false).

    Raises:
        ValueError: as :func:`sample_from_logits`.
    """
    weights, _, z_max = _truncated_weights(logits, temperature, top_k, top_p)
    if not truncates(top_k, top_p):
        return torch.zeros(logits.shape[0], dtype=z_max.dtype, device=logits.device)
    z = logits.to(z_max.dtype)
    z = z / temperature if temperature != 1.0 else z
    log_total = torch.logsumexp(z - z_max, dim=-1).double()  # log of the full normaliser, shifted by z_max
    return (weights.sum(-1).log() - log_total).to(z_max.dtype)


# --------------------------------------------------------------------------- #
# Per-row random numbers
# --------------------------------------------------------------------------- #
def _mix64(x: int) -> int:
    """splitmix64's finaliser (Steele et al. 2014, "Fast splittable pseudorandom number generators"): a
    bijection of 64-bit integers whose outputs look independent for consecutive inputs."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def row_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for one row's random numbers from the run's ``seed`` and the row's ``key`` (integers, e.g.
    iteration, the prompt's dataset index, the generation index): each component is mixed in turn
    (:func:`_mix64`), so different keys give unrelated seeds. A pure function of its arguments."""
    h = _mix64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    for part in key:
        h = _mix64(h ^ (int(part) & 0xFFFFFFFFFFFFFFFF))
    return h >> 1


def sampling_noise(seed: int, keys: torch.Tensor, steps: int) -> torch.Tensor:
    """The uniform numbers each row's sampling reads, one per decoding step (inverse-CDF sampling,
    :func:`~rlhf_lightning.algorithms.ops.sample_from_logits`), as a function of the run's ``seed`` and the row's key
    only.

    A response then depends on its prompt, the weights, ``seed`` and its key, and not on the batch around
    it, the batch's order, the process it is sampled in or the number of processes: with keys (iteration,
    the prompt's dataset index, the generation index), one process with batch B and N processes with B/N
    each sample the same responses (rounding of the logits apart), and a prompt that appears twice in a batch
    with other generation indices gets independent responses.

    Args:
        seed: the run's seed (:func:`rlhf_lightning.rollout.sampler.run_seed`).
        keys: ``(B, K)`` integer tensor, one key per row.
        steps: how many numbers per row (the generation budget, ``max_new_tokens``).

    Returns:
        ``(B, steps)`` float64 in [0, 1), on ``keys``' device: row b's numbers are ``torch.rand`` of a CPU
        generator seeded :func:`row_seed` ``(seed, *keys[b])``.

    Raises:
        ValueError: ``keys`` not a 2-D integer tensor, ``steps`` < 1.
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.is_floating_point():
        raise ValueError("keys must be a 2-D (B, K) integer tensor")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    generator = torch.Generator()
    rows = []
    for key in keys.tolist():
        generator.manual_seed(row_seed(seed, *key))
        rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    if not rows:
        return torch.zeros(0, steps, dtype=torch.float64, device=keys.device)
    return torch.stack(rows).to(keys.device)


# --------------------------------------------------------------------------- #
# Response masks
# --------------------------------------------------------------------------- #
def response_mask_from_eos(
    response_ids: Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Valid-token mask of generated responses, ending at the first EOS.

    Position ``t`` of row ``b`` is valid iff no EOS occurs strictly before ``t``
    (so the first EOS itself is valid and everything after it is not).  Rows
    with no EOS (truncated at the length limit) are valid everywhere, except
    that, if ``pad_token_id`` is given, a trailing run of pad tokens at the end
    of such a row is marked invalid (right-padding of a truncated row).  When
    ``pad_token_id`` is also an EOS id, the first EOS is still kept as valid.

    Args:
        response_ids: ``(B, R)`` integer token ids of the responses only
            (prompt stripped).
        eos_token_id: one EOS id or a non-empty sequence of ids (any ends).
        pad_token_id: optional padding id, see above.

    Returns:
        ``(mask, ends_with_eos)``: ``mask`` is ``(B, R)`` bool; ``ends_with_eos``
        is ``(B,)`` bool, True for rows that contain an EOS (terminated rather
        than truncated).

    Raises:
        ValueError: if ``response_ids`` is not a 2-D integer tensor or
            ``eos_token_id`` is an empty sequence.
    """
    if not isinstance(response_ids, Tensor) or response_ids.dim() != 2:
        raise ValueError("response_ids must be a 2-D (B, R) tensor")
    if response_ids.is_floating_point() or response_ids.is_complex() or response_ids.dtype == torch.bool:
        raise ValueError(f"response_ids must be an integer tensor, got {response_ids.dtype}")
    ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
    if not ids:
        raise ValueError("eos_token_id must be an int or a non-empty sequence of ints")
    eos_ids = torch.tensor(ids, dtype=response_ids.dtype, device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_ids)
    # number of EOS tokens strictly before each position
    eos_before = torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos.int()
    mask = eos_before == 0
    ends_with_eos = is_eos.any(dim=1)
    if pad_token_id is not None:
        is_pad = response_ids == int(pad_token_id)
        # trailing[b, t] is True iff every token at positions >= t is a pad token
        trailing_pad = torch.cumprod(is_pad.flip(1).int(), dim=1).flip(1).bool()
        mask = torch.where(ends_with_eos.unsqueeze(1), mask, ~trailing_pad)
    return mask, ends_with_eos


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid position of every row.

    Args:
        mask: ``(B, T)`` bool or 0/1 tensor.

    Returns:
        ``(B,)`` long tensor; rows with no valid position give 0 (check
        ``mask.any(1)`` if that case matters to you).

    Raises:
        ValueError: if ``mask`` is not 2-D.
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a 2-D (B, T) tensor")
    B, T = mask.shape
    if T == 0:
        return torch.zeros(B, dtype=torch.long, device=mask.device)
    m = mask if mask.dtype == torch.bool else mask != 0
    pos = torch.arange(T, device=mask.device).expand(B, T)
    neg = torch.full((), -1, dtype=torch.long, device=mask.device)
    return torch.where(m, pos, neg).amax(dim=1).clamp(min=0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor,
                       all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Fraction of the return variance explained by the value predictions.

    ``EV = 1 - Var[returns - values] / Var[returns]`` over the valid tokens
    (population variances; the ``n/(n-1)`` factor would cancel anyway).  1 is a
    perfect critic, 0 is no better than predicting the mean, negative is worse.

    Choice for the degenerate case: if ``Var[returns] == 0`` (including fewer
    than two valid tokens or an all-masked batch), the ratio is undefined and
    this returns ``0.`` instead of ``NaN``/``inf``.

    Args:
        values: ``(B, T)`` value predictions.
        returns: ``(B, T)`` return targets.
        mask: ``(B, T)`` bool or 0/1 tensor.
        all_reduce: ``None`` (this batch), or a function returning the element-wise sum over processes of a
            ``(5,)`` float64 tensor: the variances are then those of every process's valid tokens together
            (count, sums and sums of squares pooled in float64, as :func:`masked_whiten`). A collective.

    Returns:
        Detached 0-d float tensor (a diagnostic statistic; no gradient).

    Raises:
        ValueError: on mismatched shapes.
    """
    if values.shape != returns.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} != returns shape {tuple(returns.shape)}"
        )
    m = _as_bool_mask(mask, values, "values")
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(values.dtype, returns.dtype), torch.float32)
        v = values.detach().to(dtype)
        r = returns.detach().to(dtype)
        if all_reduce is None:
            var_r = masked_var(r, m, unbiased=False)
            var_err = masked_var(r - v, m, unbiased=False)
        else:
            r64, e64 = _select(r, m).double(), _select(r - v, m).double()
            stats = torch.stack([m.sum(dtype=torch.float64), r64.sum(), (r64 * r64).sum(), e64.sum(),
                                 (e64 * e64).sum()])
            n, s_r, q_r, s_e, q_e = all_reduce(stats).unbind()
            n = n.clamp(min=1)
            var_r = q_r / n - (s_r / n) ** 2
            var_r = torch.where(var_r > 1e-12 * q_r / n, var_r, torch.zeros_like(var_r)).to(dtype)  # rounding: 0
            var_err = (q_e / n - (s_e / n) ** 2).clamp(min=0).to(dtype)
        safe = torch.where(var_r > 0, var_r, torch.ones_like(var_r))
        return torch.where(var_r > 0, 1.0 - var_err / safe, torch.zeros_like(var_r))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) long positions counting only attended tokens (0 at the first real token).

    Padding positions get 1 (any value works: they are masked), as ``generate`` does.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
