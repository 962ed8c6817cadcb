"""Sign votes and the fused robust learning rate (docs/ops.md).

Both stream G once by column blocks: a program owns BLOCK_D coordinates and walks the n rows
BLOCK_N at a time, so every load is a contiguous stretch of one row (coalesced along d) and the
per-coordinate sums stay in registers. With a row selection (``rows``) the walk goes over the
selected rows, read where they lie in G. Non-finite rows are flagged in the same pass. rlr also
keeps, in float64, the weighted mean that replaces the plain one where that overflowed (docs/nonfinite.md);
on a GPU the second sum is cheaper than a branch and a second read of the column.
"""
import torch
import triton
import triton.language as tl

from .._raw_checks import rlr_args
from .common import flag_rows, load_row_block, nonfinite, row_selection, sign_of, to_acc, to_storage
from .settings import acc_dtype, column_settings, is_fp64


@triton.jit
def _sign_sum_kernel(G, row_ids, sums, flags, n, d, HAS_ROWS: tl.constexpr, IS_FP64: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    votes = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        x, rows, valid = load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS, IS_FP64, BLOCK_N)
        votes += tl.sum(sign_of(x), axis=0)
        flag_rows(x, rows, valid, flags, 1)
    tl.store(sums + cols, votes, mask=col_ok)


def sign_sum_forward(G: torch.Tensor, rows=None, launch=lambda k: k):
    """(int32[d] sums of signs, bool[m] non-finite rows) of the m rows ``rows`` of G (all n when None)."""
    G = G.contiguous()
    d = G.shape[1]
    row_ids, n, has_rows = row_selection(G, rows, "sign_sum")
    sums = torch.empty(d, dtype=torch.int32, device=G.device)
    flags = torch.zeros(n, dtype=torch.int32, device=G.device)
    block_n, block_d, warps = column_settings(n)
    launch(_sign_sum_kernel)[(triton.cdiv(d, block_d),)](
        G, row_ids, sums, flags, n, d, HAS_ROWS=has_rows, IS_FP64=is_fp64(G), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps)
    return sums, flags.bool()


@triton.jit
def _row_weights(weights, rows, row_ok, HAS_WEIGHTS: tl.constexpr, IS_FP64: tl.constexpr):
    """w_i in the arithmetic dtype: the given weights, or 1 per row; 0 for padding rows."""
    if HAS_WEIGHTS:
        return to_acc(tl.load(weights + rows, mask=row_ok, other=0.0), IS_FP64)
    else:
        return to_acc(row_ok.to(tl.float32), IS_FP64)


@triton.jit
def _rlr_kernel(G, row_ids, weights, server_lr, out, flags, n, d, theta, HAS_ROWS: tl.constexpr,
                HAS_WEIGHTS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    # The total weight W comes first (the same sums in the same order as the mean's divisor always
    # had), because the rescued mean below needs every share w_i / W during the pass over G.
    wsum = to_acc(tl.zeros([BLOCK_N], dtype=tl.float32), IS_FP64)
    for start in range(0, n, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        wsum += _row_weights(weights, rows, rows < n, HAS_WEIGHTS, IS_FP64)
    weight_total = tl.sum(wsum, axis=0)
    votes = tl.zeros([BLOCK_D], dtype=tl.int32)
    total = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    rescued = tl.zeros([BLOCK_D], dtype=tl.float64)
    lowest = tl.full([BLOCK_D], float("inf"), dtype=tl.float64)
    highest = tl.full([BLOCK_D], -float("inf"), dtype=tl.float64)
    column_bad = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        x, rows, valid = load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS, IS_FP64, BLOCK_N)
        w = _row_weights(weights, rows, rows < n, HAS_WEIGHTS, IS_FP64)
        total += tl.sum(w[:, None] * x, axis=0)
        # core RescuedMean: sum_i (w_i / W) x_i in float64, where no term exceeds its |x_i|.
        share = w.to(tl.float64) / weight_total.to(tl.float64)
        x64 = x.to(tl.float64)
        rescued += tl.sum(share[:, None] * x64, axis=0)
        lowest = tl.minimum(lowest, tl.min(tl.where(valid, x64, float("inf")), axis=0))
        highest = tl.maximum(highest, tl.max(tl.where(valid, x64, -float("inf")), axis=0))
        column_bad |= tl.max((nonfinite(x) & valid).to(tl.int32), axis=0)
        votes += tl.sum(sign_of(x), axis=0)
        flag_rows(x, rows, valid, flags, 1)
    lr = tl.load(server_lr)
    # Ozdayi et al. 2021, Eq. 2: the lr flips sign where fewer than theta clients agree.
    lr = tl.where(tl.abs(votes) >= theta, lr, -lr)
    avg = total / weight_total
    # The mean of finite rows is finite, but their weighted sum can overflow (two 3e38 rows in
    # float32): there the rescued mean, clamped to the column's range, replaces it (core
    # rescued_mean_value). A tree sum can turn the overflow into NaN (Inf - Inf), so every
    # non-finite mean of a finite column is replaced; elsewhere the plain mean keeps its bits.
    rescued = tl.where(rescued < lowest, lowest, tl.where(highest < rescued, highest, rescued))
    avg = tl.where(nonfinite(avg) & (column_bad == 0), to_acc(rescued, IS_FP64), avg)
    tl.store(out + cols, to_storage(lr * avg, out.dtype.element_ty), mask=col_ok)


def rlr_forward(G, weights, theta: int, server_lr: float, rows=None, launch=lambda k: k):
    """(sign-thresholded lr times the weighted mean, bool[m] non-finite rows) of the m rows ``rows``
    of G (all n when None); weights, if given, are one per selected row."""
    G = G.contiguous()
    d = G.shape[1]
    row_ids, n, has_rows = row_selection(G, rows, "rlr")
    weights = rlr_args(G, weights, theta, server_lr, n)   # the kernel reads n weights, divides by their sum
    has_weights = weights is not None
    acc = acc_dtype(G.dtype)
    out = torch.empty(d, dtype=G.dtype, device=G.device)
    flags = torch.zeros(n, dtype=torch.int32, device=G.device)
    lr = torch.full((1,), server_lr, dtype=acc, device=G.device)
    w = weights if has_weights else lr
    block_n, block_d, warps = column_settings(n)
    launch(_rlr_kernel)[(triton.cdiv(d, block_d),)](
        G, row_ids, w, lr, out, flags, n, d, theta, HAS_ROWS=has_rows, HAS_WEIGHTS=has_weights, IS_FP64=is_fp64(G),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return out, flags.bool()
