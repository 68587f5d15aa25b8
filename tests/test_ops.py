"""Tests for rlhf_lightning.algorithms.ops: hand-computed examples, naive loop references,
edge cases (empty rows / all-masked batches) and autograd behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_lightning.algorithms.ops import (
    BatchCounts,
    entropy_from_logits,
    explained_variance,
    last_valid_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask_from_eos,
    row_seed,
    sample_from_logits,
    sampling_noise,
    token_mean,
    truncation_log_mass,
)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def ragged_prefix_mask(B: int, T: int, gen: torch.Generator, allow_empty: bool = True) -> torch.Tensor:
    """Random prefix mask; row 0 is forced full, row 1 forced empty when allowed."""
    lengths = torch.randint(0 if allow_empty else 1, T + 1, (B,), generator=gen)
    lengths[0] = T
    if allow_empty and B > 1:
        lengths[1] = 0
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


def valid_list(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Python list of the valid entries, by explicit loops."""
    out = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if bool(mask[b, t]):
                out.append(float(x[b, t]))
    return out


# --------------------------------------------------------------------------- #
# masked reductions: hand-computed examples
# --------------------------------------------------------------------------- #
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_masked_sum_and_mean_by_hand():
    # valid entries: 1, 2, 4 -> sum 7, mean 7/3; per row: sums [3, 4], means [1.5, 4]
    assert masked_sum(X, M).item() == pytest.approx(7.0)
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0]))
    # float 0/1 masks behave like bool masks
    torch.testing.assert_close(masked_mean(X, M.float()), torch.tensor(7.0 / 3.0))


def test_masked_mean_empty_row_and_all_masked():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    m = torch.tensor([[True, True], [False, False]])
    # row 0: (1 + 2) / 2 = 1.5; row 1 has no valid token -> 0
    per_row = masked_mean(x, m, dim=1)
    torch.testing.assert_close(per_row, torch.tensor([1.5, 0.0]))
    per_row.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))

    x.grad = None
    none = torch.zeros_like(m)
    out = masked_mean(x, none)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    assert masked_sum(x, none).item() == 0.0


def test_masked_var_by_hand():
    # valid 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # unbiased: (14/3) / 2 = 7/3 ; biased: (14/3) / 3 = 14/9
    assert masked_var(X, M).item() == pytest.approx(7.0 / 3.0)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14.0 / 9.0)


def test_masked_var_degenerate_counts_are_zero_not_nan():
    x = torch.tensor([[5.0, 7.0]], requires_grad=True)
    one = torch.tensor([[True, False]])
    none = torch.tensor([[False, False]])
    for m in (one, none):
        for unbiased in (True, False):
            v = masked_var(x, m, unbiased=unbiased)
            assert v.item() == 0.0
            (g,) = torch.autograd.grad(v, x)
            assert torch.isfinite(g).all()


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 9.0], [3.0, -7.0]])
    m = torch.tensor([[True, False], [True, False]])
    # valid 1, 3: mean 2, unbiased var ((-1)^2 + 1^2) / 1 = 2 -> (x - 2) / sqrt(2)
    s = 1.0 / math.sqrt(2.0)
    torch.testing.assert_close(masked_whiten(x, m, eps=0.0 + 1e-12), torch.tensor([[-s, 0.0], [s, 0.0]]))
    # shift_mean=False adds the mean (2) back at valid positions only
    torch.testing.assert_close(
        masked_whiten(x, m, shift_mean=False, eps=1e-12), torch.tensor([[2 - s, 0.0], [2 + s, 0.0]])
    )


def test_masked_whiten_pooled_over_processes_by_hand():
    """Two "ranks" of different widths: rank A's valid {1}, rank B's valid {3, 5}. Pooled: mean 3,
    unbiased variance (4 + 0 + 4) / 2 = 4, so A -> (1 - 3) / 2 = -1 and B -> 0, 1; alone, A would be 0."""
    xa, ma = torch.tensor([[1.0, 100.0]]), torch.tensor([[True, False]])
    xb, mb = torch.tensor([[3.0, 5.0, -50.0]]), torch.tensor([[True, True, False]])
    sent = {}

    def keep(stats):  # rank B's all-reduce: remember what it contributes
        sent["b"] = stats.clone()
        return stats

    masked_whiten(xb, mb, all_reduce=keep)
    assert sent["b"].dtype == torch.float64 and sent["b"].tolist() == [8.0, 34.0, 2.0]  # sum, squares, count
    pooled_a = masked_whiten(xa, ma, eps=1e-12, all_reduce=lambda stats: stats + sent["b"])
    torch.testing.assert_close(pooled_a, torch.tensor([[-1.0, 0.0]]))
    assert masked_whiten(xa, ma).tolist() == [[0.0, 0.0]]  # without the reduction: its own single token
    sent_a = {}
    masked_whiten(xa, ma, all_reduce=lambda stats: sent_a.setdefault("a", stats.clone()))
    pooled_b = masked_whiten(xb, mb, eps=1e-12, all_reduce=lambda stats: stats + sent_a["a"])
    torch.testing.assert_close(pooled_b, torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_whiten_pooled_matches_one_process_over_the_union(seed):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(3, w, generator=g) * 4 + 2, torch.rand(3, w, generator=g) > 0.4) for w in (5, 8)]
    width = 8
    union_x = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x, _ in parts])
    union_m = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts])
    expected = masked_whiten(union_x, union_m)
    stats = []
    for x, m in parts:
        masked_whiten(x, m, all_reduce=lambda t: stats.append(t.clone()) or t)
    total = stats[0] + stats[1]
    got = torch.cat([torch.nn.functional.pad(masked_whiten(x, m, all_reduce=lambda t: total.clone()),
                                             (0, width - x.shape[1])) for x, m in parts])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # One process (identity reduction): the same as the default two-pass statistics.
    x, m = parts[1]
    torch.testing.assert_close(masked_whiten(x, m, all_reduce=lambda t: t), masked_whiten(x, m), rtol=1e-5, atol=1e-6)
    # Degenerate pooled counts (0 or 1 valid token in all): zeros, as without the reduction.
    empty = torch.zeros_like(m)
    assert (masked_whiten(x, empty, all_reduce=lambda t: t) == 0).all()
    one = empty.clone()
    one[0, 0] = True
    assert (masked_whiten(x, one, all_reduce=lambda t: t) == 0).all()


def test_masked_whiten_all_masked_and_single_token():
    x = torch.randn(3, 4, requires_grad=True)
    out = masked_whiten(x, torch.zeros(3, 4, dtype=torch.bool))
    assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # a single valid token: mean = itself, var = 0 -> whitened value 0, finite
    m = torch.zeros(3, 4, dtype=torch.bool)
    m[1, 2] = True
    out = masked_whiten(x.detach(), m)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_inf_at_padding_does_not_leak_into_values_or_gradients():
    x = torch.tensor([[1.0, float("inf")], [3.0, float("-inf")]], requires_grad=True)
    m = torch.tensor([[True, False], [True, False]])
    total = masked_mean(x, m) + masked_var(x, m) + masked_whiten(x, m).pow(2).sum() + masked_sum(x, m, dim=1).sum()
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, 1] == 0).all()


# --------------------------------------------------------------------------- #
# masked reductions: naive loop references on random ragged masks
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_reductions_match_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    B, T = 5, 7
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    m = ragged_prefix_mask(B, T, gen)
    vals = valid_list(x, m)
    n = len(vals)
    mean = sum(vals) / n
    var_u = sum((v - mean) ** 2 for v in vals) / (n - 1)
    var_b = sum((v - mean) ** 2 for v in vals) / n

    assert masked_sum(x, m).item() == pytest.approx(sum(vals))
    assert masked_mean(x, m).item() == pytest.approx(mean)
    assert masked_var(x, m).item() == pytest.approx(var_u)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(var_b)

    row_means = []
    for b in range(B):
        row = [float(x[b, t]) for t in range(T) if m[b, t]]
        row_means.append(sum(row) / len(row) if row else 0.0)
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor(row_means, dtype=torch.float64))

    w = masked_whiten(x, m, eps=1e-8)
    for b in range(B):
        for t in range(T):
            expected = (float(x[b, t]) - mean) / math.sqrt(var_u + 1e-8) if m[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(expected, abs=1e-9)


def test_masked_ops_reject_mismatched_mask():
    x = torch.randn(2, 3)
    bad = torch.ones(2, 4, dtype=torch.bool)
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        with pytest.raises(ValueError):
            fn(x, bad)
    with pytest.raises(ValueError):
        masked_whiten(x, torch.ones(2, 3, dtype=torch.bool), eps=0.0)


# --------------------------------------------------------------------------- #
# logprobs_from_logits / entropy_from_logits
# --------------------------------------------------------------------------- #
def test_logprobs_by_hand():
    # logits = log([1, 2, 3]) -> softmax = [1/6, 2/6, 3/6]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    labels = torch.tensor([[2, 0]])
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(1.0 / 6.0)]]))
    # temperature 2: logits / 2 = log([1, sqrt2, sqrt3]) -> p(0) = 1 / (1 + sqrt2 + sqrt3)
    out_t = logprobs_from_logits(logits, labels, temperature=2.0)
    assert out_t[0, 1].item() == pytest.approx(-math.log(1 + math.sqrt(2) + math.sqrt(3)), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 64, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_log_softmax_gather_fp32(chunk_size, temperature):
    gen = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 11
    # non-contiguous view, like logits[:, :-1] of a model output
    full = (3 * torch.randn(B, T + 1, V, generator=gen)).requires_grad_(True)
    logits = full[:, :-1]
    labels = torch.randint(0, V, (B, T), generator=gen)
    out = logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk_size)
    ref = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref)
    w = torch.randn(B, T, generator=gen)
    (g,) = torch.autograd.grad((out * w).sum(), full)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), full)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_low_precision_chunked(dtype):
    gen = torch.Generator().manual_seed(4)
    B, T, V = 4, 6, 13
    logits = (4 * torch.randn(B, T, V, generator=gen)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    out = logprobs_from_logits(logits, labels, chunk_size=5)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == dtype
    g_ref = torch.autograd.grad(ref.sum(), logits)[0]
    torch.testing.assert_close(logits.grad.float(), g_ref.float(), rtol=1e-2, atol=1e-2)


class _Float32Watcher(TorchDispatchMode):
    """Records the largest float32 tensor produced by any op."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.dim() == 3:
                self.max_numel = max(self.max_numel, o.numel())
        return out


@pytest.mark.parametrize("fn", ["logprobs", "entropy"])
@pytest.mark.parametrize("B,T,chunk", [(4, 8, 5), (6, 3, 7)])  # T >= chunk and T < chunk
def test_low_precision_upcast_never_covers_full_tensor(fn, B, T, chunk):
    V = 16
    logits = torch.randn(B, T, V).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (B, T))
    watcher = _Float32Watcher()
    with watcher:
        out = logprobs_from_logits(logits, labels, chunk_size=chunk) if fn == "logprobs" else entropy_from_logits(
            logits, chunk_size=chunk
        )
        out.sum().backward()
    # (B, T, V) float32 tensors are at most one block: <= chunk positions x V
    assert 0 < watcher.max_numel <= chunk * V
    # sanity: the watcher does see a full-size float32 upcast when one is made
    big = _Float32Watcher()
    with big:
        logits.detach().float()
    assert big.max_numel == B * T * V


def test_logprobs_and_entropy_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, labels, 1.3, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_size=4), (logits,))


def test_logprobs_accepts_2d_logits():
    logits = torch.randn(5, 7)
    labels = torch.randint(0, 7, (5,))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, chunk_size=2), ref)


def test_logprobs_errors():
    logits = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels.float())
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, temperature=0.0)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, chunk_size=0)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits.long(), labels)
    with pytest.raises(ValueError):
        entropy_from_logits(torch.randn(5))


def test_entropy_by_hand():
    ninf = float("-inf")
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0],  # uniform over 4 -> ln 4
          [0.0, 0.0, ninf, ninf],  # uniform over 2 -> ln 2
          [5.0, ninf, ninf, ninf]]],  # deterministic -> 0
        requires_grad=True,
    )
    h = entropy_from_logits(logits, chunk_size=2)
    torch.testing.assert_close(h, torch.tensor([[math.log(4.0), math.log(2.0), 0.0]]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # the entropy of a uniform distribution is stationary
    torch.testing.assert_close(logits.grad[0, 0], torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    logits = (2 * torch.randn(3, 5, 9, generator=gen)).to(dtype)
    h = entropy_from_logits(logits, chunk_size=4)
    assert h.dtype == torch.float32
    lp = torch.log_softmax(logits.float(), -1)
    ref = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# response_mask_from_eos / last_valid_index
# --------------------------------------------------------------------------- #
def test_response_mask_from_eos_by_hand():
    ids = torch.tensor(
        [
            [5, 7, 2, 0, 0],  # EOS at 2 -> valid 0..2
            [5, 2, 2, 0, 3],  # first EOS at 1 -> valid 0..1
            [5, 6, 7, 8, 9],  # no EOS (truncated) -> all valid
            [2, 0, 0, 0, 0],  # EOS first -> only position 0
        ]
    )
    mask, ends = response_mask_from_eos(ids, eos_token_id=2)
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool
    )
    assert mask.dtype == torch.bool and ends.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert torch.equal(ends, torch.tensor([True, True, False, True]))


def test_response_mask_eos_list_and_pad():
    ids = torch.tensor([[5, 9, 2, 1], [5, 6, 0, 0], [5, 0, 6, 0], [0, 0, 0, 0], [5, 2, 0, 0]])
    mask, ends = response_mask_from_eos(ids, eos_token_id=[2, 9], pad_token_id=0)
    expected = torch.tensor(
        [
            [1, 1, 0, 0],  # 9 is an EOS too: valid through position 1
            [1, 1, 0, 0],  # no EOS, trailing pads removed
            [1, 1, 1, 0],  # a pad in the middle of a truncated row stays valid
            [0, 0, 0, 0],  # all padding: no valid token
            [1, 1, 0, 0],  # EOS at 1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert torch.equal(ends, torch.tensor([True, False, False, False, True]))
    # pad == eos: the first EOS is kept, the rest is padding
    mask, ends = response_mask_from_eos(torch.tensor([[5, 2, 2, 2]]), eos_token_id=2, pad_token_id=2)
    assert torch.equal(mask, torch.tensor([[True, True, False, False]]))
    assert ends.tolist() == [True]


def test_response_mask_matches_loop_reference():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 6, (8, 9), generator=gen)
    eos = [3, 4]
    mask, ends = response_mask_from_eos(ids, eos_token_id=eos)
    for b in range(ids.shape[0]):
        seen = False
        for t in range(ids.shape[1]):
            assert bool(mask[b, t]) == (not seen)
            if int(ids[b, t]) in eos:
                seen = True
        assert bool(ends[b]) == seen


def test_response_mask_errors():
    with pytest.raises(ValueError):
        response_mask_from_eos(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        response_mask_from_eos(torch.zeros(2, 3, dtype=torch.long), [])
    with pytest.raises(ValueError):
        response_mask_from_eos(torch.zeros(2, 3), 2)


def test_last_valid_index():
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    expected = torch.tensor([1, 0, 2, 1])
    assert torch.equal(last_valid_index(m.bool()), expected)
    assert torch.equal(last_valid_index(m.float()), expected)
    assert last_valid_index(m.bool()).dtype == torch.long
    with pytest.raises(ValueError):
        last_valid_index(torch.ones(3, dtype=torch.bool))


def test_last_valid_index_loop_reference():
    gen = torch.Generator().manual_seed(8)
    m = torch.rand(10, 6, generator=gen) > 0.6
    idx = last_valid_index(m)
    for b in range(10):
        trues = [t for t in range(6) if m[b, t]]
        assert int(idx[b]) == (trues[-1] if trues else 0)


# --------------------------------------------------------------------------- #
# explained_variance
# --------------------------------------------------------------------------- #
def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # perfect critic -> 1
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    # constant critic -> Var[R - c] / Var[R] = 1 -> 0
    assert explained_variance(torch.full_like(returns, 7.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # values [1, 2, 4]: errors [0, 0, -1], Var = 2/9; Var[R] = 2/3 -> 1 - 1/3 = 2/3
    values = torch.tensor([[1.0, 2.0, 4.0, -50.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_explained_variance_degenerate_is_zero_and_detached():
    values = torch.randn(2, 3, requires_grad=True)
    constant = torch.full((2, 3), 4.0)
    ev = explained_variance(values, constant, torch.ones(2, 3, dtype=torch.bool))
    assert ev.item() == 0.0 and not ev.requires_grad
    ev = explained_variance(values, torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert ev.item() == 0.0
    with pytest.raises(ValueError):
        explained_variance(values, torch.randn(2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_explained_variance_loop_reference():
    gen = torch.Generator().manual_seed(9)
    returns = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    values = returns + 0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    m = ragged_prefix_mask(4, 6, gen)
    r, v = valid_list(returns, m), valid_list(values, m)
    e = [a - b for a, b in zip(r, v, strict=True)]

    def pvar(xs):
        mu = sum(xs) / len(xs)
        return sum((x - mu) ** 2 for x in xs) / len(xs)

    assert explained_variance(values, returns, m).item() == pytest.approx(1 - pvar(e) / pvar(r))


# --------------------------------------------------------------------------- #
# Batches shared by processes: BatchCounts, token_mean, pooled explained variance
# --------------------------------------------------------------------------- #
def test_batch_counts_by_hand_and_summed_over_processes():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    local = BatchCounts.of(mask)
    assert (local.tokens.item(), local.sequences.item(), local.rows.item(), local.world_size) == (3, 2, 3, 1)
    assert local.tokens.dtype == torch.float64
    other = torch.tensor([5.0, 1.0, 2.0], dtype=torch.float64)  # what the other process holds
    both = BatchCounts.of(mask, all_reduce=lambda t: t + other, world_size=2)
    assert (both.tokens.item(), both.sequences.item(), both.rows.item()) == (8, 3, 5)
    assert both.per_process("tokens").item() == 4.0 and both.per_process("rows").item() == 2.5
    assert BatchCounts.of(torch.zeros(0, 3, dtype=torch.bool)).per_process("tokens").item() == 1.0  # at least 1
    with pytest.raises(ValueError, match="all_reduce"):
        BatchCounts.of(mask, world_size=2)
    with pytest.raises(ValueError, match="unit"):
        local.per_process("pairs")


def test_token_mean_shares_average_to_the_whole_batch_mean():
    """Two processes with 1 and 3 valid tokens: their shares average to the mean of the 4 tokens."""
    xa, ma = torch.tensor([[4.0, 99.0]]), torch.tensor([[True, False]])
    xb, mb = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, True]])
    total = BatchCounts.of(ma).tokens + BatchCounts.of(mb).tokens
    shares = [token_mean(x, m, BatchCounts(total, total, total, 2)) for x, m in ((xa, ma), (xb, mb))]
    assert float(sum(shares) / 2) == pytest.approx((4 + 1 + 2 + 3) / 4)
    assert token_mean(xb, mb).item() == pytest.approx(2.0)  # no counts: this batch's mean


@pytest.mark.parametrize("seed", [0, 1])
def test_explained_variance_pooled_over_processes_matches_the_union(seed):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(3, w, generator=g), torch.randn(3, w, generator=g) * 2, torch.rand(3, w, generator=g) > 0.3)
             for w in (4, 7)]
    width = 7
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    union = [torch.cat([pad(part[i]) for part in parts]) for i in range(3)]
    expected = explained_variance(*union)
    stats = []
    for values, returns, mask in parts:
        explained_variance(values, returns, mask, all_reduce=lambda t: stats.append(t.clone()) or t)
    total = stats[0] + stats[1]
    for values, returns, mask in parts:  # every process gets the union's value
        got = explained_variance(values, returns, mask, all_reduce=lambda t: total.clone())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(explained_variance(*parts[0]), expected, atol=1e-3)  # one process's alone differs
    constant = torch.ones(2, 3)
    assert explained_variance(constant * 0, constant, constant.bool(), all_reduce=lambda t: t).item() == 0.0


# --------------------------------------------------------------------------- #
# Per-row random numbers and sampling with them
# --------------------------------------------------------------------------- #
def test_row_seed_is_a_pure_function_of_its_arguments():
    assert row_seed(0, 1, 2, 3) == row_seed(0, 1, 2, 3)
    seeds = {row_seed(0, 1, 2, 3), row_seed(1, 1, 2, 3), row_seed(0, 2, 1, 3), row_seed(0, 1, 2, 4), row_seed(0, 1, 2)}
    assert len(seeds) == 5  # order and every component matter
    assert all(0 <= s < 2**63 for s in seeds)
    assert row_seed(0, -1, 5) != row_seed(0, 1, 5)  # negative keys are fine


def test_sampling_noise_depends_on_the_row_key_only():
    keys = torch.tensor([[3, 10, 0], [3, 10, 1], [3, 11, 0]])
    noise = sampling_noise(7, keys, 5)
    assert noise.shape == (3, 5) and noise.dtype == torch.float64 and ((noise >= 0) & (noise < 1)).all()
    alone = sampling_noise(7, keys[2:], 5)  # the row in another batch, at another position
    torch.testing.assert_close(alone[0], noise[2], rtol=0, atol=0)
    reordered = sampling_noise(7, keys.flip(0), 5)
    torch.testing.assert_close(reordered.flip(0), noise, rtol=0, atol=0)
    assert not torch.equal(noise[0], noise[1])  # another generation index: other numbers
    assert not torch.equal(sampling_noise(8, keys, 5), noise)  # another seed: other numbers
    torch.testing.assert_close(sampling_noise(7, keys, 3), noise[:, :3], rtol=0, atol=0)  # a prefix of the stream
    with pytest.raises(ValueError, match="keys"):
        sampling_noise(7, keys.float(), 5)


def test_sample_from_logits_with_given_uniforms_is_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(4, 4)
    uniform = torch.tensor([0.05, 0.15, 0.55, 0.95], dtype=torch.float64)
    # CDF 0.1, 0.3, 0.6, 1.0
    assert sample_from_logits(logits, uniform=uniform).tolist() == [0, 1, 2, 3]
    # top-k 2 keeps tokens 3 and 2 (0.4 / 0.7 first): u 0.5 -> token 3, u 0.6 -> token 2
    assert sample_from_logits(logits[:2], top_k=2, uniform=torch.tensor([0.5, 0.6])).tolist() == [3, 2]
    with pytest.raises(ValueError, match="uniform"):
        sample_from_logits(logits, uniform=torch.zeros(3))


def test_truncation_log_mass_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    assert truncation_log_mass(logits).tolist() == [0.0, 0.0]  # nothing truncated
    torch.testing.assert_close(truncation_log_mass(logits, top_k=2), torch.log(torch.tensor([0.7, 0.8])))
    # top_p 0.5: row 0 keeps 0.4 and 0.3 (0.4 < 0.5 before 0.3); row 1 keeps 0.7 alone
    torch.testing.assert_close(truncation_log_mass(logits, top_p=0.5), torch.log(torch.tensor([0.7, 0.7])))
    # temperature 2 on row 1 (probabilities ∝ sqrt(p)): top-1 keeps sqrt(0.7) / (sqrt(0.7) + 3 sqrt(0.1))
    p = torch.sqrt(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(truncation_log_mass(logits[1:], temperature=2.0, top_k=1),
                               torch.log(p[:1] / p.sum()))
