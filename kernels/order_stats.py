r"""Order statistics and the fused invariant aggregation (docs/ops.md).

``order_mean(G, lo, hi)_j`` is the mean of the sorted values at positions lo..hi-1 of column j.

* n <= MAX_SORT_N (256): one program loads a [BLOCK_D, N_PAD] tile (columns x all rows, padded
  with +inf so that padding sorts last and never lands in lo..hi-1 < n), sorts each column along
  the minor dimension with a bitonic network (the same hypercube scheme as ``tl.sort``, built from
  min/max so that the interpreter runs it fast) and adds the kept ranks only.
* larger n: a per-column radix select. Values become order-preserving unsigned keys; a bit-by-bit
  bisection over the rows finds the keys at ranks lo and hi-1, and one more pass adds the values
  strictly between them plus the right number of copies of the two boundary values. Any n works;
  it costs (key bits + 1) reads of the column.

Only the kept values are added (never "total minus trimmed"), so a +-3e38 outlier that is trimmed
cannot destroy the honest values (docs/nonfinite.md). The mean of finite values is finite, but their sum can
overflow (two kept 3e38 values in float32): both paths also add the kept values scaled by 2^-m,
2^m >= 2 (hi - lo), which cannot overflow, and take that mean (clamped to the kept range, as core
``kept_mean_rescaled``) where the plain one overflowed and the column is finite. On a GPU the
second sum costs one multiply-add per kept value, less than a branch and a second read. The
invariant variant also counts sign votes from the same tile and zeroes coordinates whose
|votes| < min_votes.

``closest_to_median_mean(G, beta)_j`` (Bulyan) is the mean of the beta values of column j nearest
its median, ties in distance to the lower row. Both paths find the median (rounded to the storage
dtype, as ``median`` returns it) and the beta-th smallest distance g; the kept values are those
nearer than g, then the rows at distance g in row order (a running count) until beta are kept.

With a row selection (``rows``, int64[m]) every kernel reads row rows[i] of G where the plain one
reads row i, and n is m: the result is that of the same op on G.index_select(0, rows) without the
copy, ties going to the lower position in the selection.
"""
import torch
import triton
import triton.language as tl

from .._raw_checks import check_count, check_invariant, check_ranks
from .common import flag_rows, load_row_block, nonfinite, row_selection, sign_of, source_rows, to_acc, to_storage
from .settings import MAX_SORT_N, is_fp64, select_settings, sort_settings


@triton.jit
def _compare_exchange(x, LOG_N: tl.constexpr, BIT: tl.constexpr, LOG_RUN: tl.constexpr):
    """One step of a bitonic sorting network along the last axis of x [B, 2**LOG_N].

    Positions i and i ^ 2**BIT are compared; the pair goes ascending where bit LOG_RUN of i is 0
    and descending where it is 1 (LOG_RUN = LOG_N: all ascending). Written with min/max over an
    axis of size 2 of the hypercube view, like tl.sort, but without its xor-sum reduction, which
    the interpreter evaluates element by element (about 100x slower).
    """
    B: tl.constexpr = x.shape[0]
    GROUPS: tl.constexpr = (1 << LOG_N) >> (BIT + 1)
    INNER: tl.constexpr = 1 << BIT
    pairs = tl.reshape(x, [B, GROUPS, 2, INNER])
    low = tl.min(pairs, axis=2, keep_dims=True)
    high = tl.max(pairs, axis=2, keep_dims=True)
    group = tl.arange(0, GROUPS)[None, :, None, None]
    side = tl.arange(0, 2)[None, None, :, None]
    descending = (group >> (LOG_RUN - BIT - 1)) & 1 if LOG_RUN < LOG_N else group * 0
    ordered = tl.where((side == 1) != (descending == 1), high, low)
    return tl.reshape(ordered, [B, 1 << LOG_N])


@triton.jit
def _sort_rows(x, LOG_N: tl.constexpr):
    """Sort each row of x [B, 2**LOG_N] ascending (Batcher's bitonic sort)."""
    for log_run in tl.static_range(1, LOG_N + 1):
        for step in tl.static_range(log_run):
            x = _compare_exchange(x, LOG_N, log_run - 1 - step, log_run)
    return x


@triton.jit
def _kept_mean_finite(mean, rescaled_sum, lowest, highest, count, rescale_up, column_finite):
    """core kept_mean_finite: the plain mean, or where it overflowed although the column is finite,
    the rescaled sum / count * 2^m clamped to [lowest, highest] (kept_mean_rescaled).

    core adds in ascending order, where an overflow can only give +-Inf; tl.sum adds in a tree,
    where -Inf + Inf can also give NaN, so any non-finite mean of a finite column is redone.
    """
    rescued = rescaled_sum / count * rescale_up
    rescued = tl.where(rescued < lowest, lowest, tl.where(highest < rescued, highest, rescued))
    return tl.where(nonfinite(mean) & column_finite, rescued, mean)


@triton.jit
def _load_tile(G, row_ids, flags, n, d, HAS_ROWS: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
               IS_FP64: tl.constexpr):
    """This program's [BLOCK_D, N_PAD] tile of G (columns x rows, padded with +inf, which sorts last)
    in the arithmetic dtype, with its rows' non-finite flags set."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, N_PAD)
    col_ok = cols < d
    valid = col_ok[:, None] & (rows < n)[None, :]
    src = source_rows(rows, rows < n, row_ids, HAS_ROWS)
    x = to_acc(tl.load(G + src[None, :] * d + cols[:, None], mask=valid, other=float("inf")), IS_FP64)
    flag_rows(x, rows, valid, flags, 0)
    return cols, rows, col_ok, valid, x


@triton.jit
def _order_mean_kernel(G, row_ids, out, mask_out, flags, n, d, lo, hi, min_votes, rescale_down, rescale_up,
                       HAS_ROWS: tl.constexpr, N_PAD: tl.constexpr, LOG_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       IS_FP64: tl.constexpr, INVARIANT: tl.constexpr):
    cols, rows, col_ok, valid, x = _load_tile(G, row_ids, flags, n, d, HAS_ROWS, N_PAD, BLOCK_D, IS_FP64)
    # Sorting in the arithmetic dtype: exact for 16-bit inputs, and one code path for all dtypes
    # (the interpreter also compares raw bfloat16 wrongly).
    ranked = _sort_rows(x, LOG_N)
    keep = (rows >= lo) & (rows < hi)
    mean = tl.sum(tl.where(keep[None, :], ranked, 0.0), axis=1) / (hi - lo)
    rescaled_sum = tl.sum(tl.where(keep[None, :], ranked * rescale_down, 0.0), axis=1)
    lowest = tl.max(tl.where((rows == lo)[None, :], ranked, -float("inf")), axis=1)
    highest = tl.max(tl.where((rows == hi - 1)[None, :], ranked, -float("inf")), axis=1)
    column_finite = tl.max((nonfinite(x) & valid).to(tl.int32), axis=1) == 0
    mean = _kept_mean_finite(mean, rescaled_sum, lowest, highest, hi - lo, rescale_up, column_finite)
    if INVARIANT:
        votes = tl.sum(tl.where(valid, sign_of(x), 0), axis=1)
        agree = tl.abs(votes) >= min_votes
        mean = tl.where(agree, mean, 0.0)
        tl.store(mask_out + cols, agree.to(tl.int8), mask=col_ok)
    tl.store(out + cols, to_storage(mean, out.dtype.element_ty), mask=col_ok)


@triton.jit
def _sortable_key(x, IS_FP64: tl.constexpr):
    """Unsigned key with the float order: flip every bit of negatives, the sign bit of positives.

    -0.0 sorts just below +0.0 and NaNs sort beyond +-inf; both are harmless for the sums.
    """
    if IS_FP64:
        bits = x.to(tl.int64, bitcast=True)
        return (bits ^ ((bits >> 63) | -9223372036854775808)).to(tl.uint64, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _value_of_key(key, IS_FP64: tl.constexpr):
    """Inverse of _sortable_key: keys with the top bit set came from non-negative values."""
    if IS_FP64:
        bits = key.to(tl.int64, bitcast=True)
        return (bits ^ tl.where(bits < 0, -9223372036854775808, -1)).to(tl.float64, bitcast=True)
    else:
        bits = key.to(tl.int32, bitcast=True)
        return (bits ^ tl.where(bits < 0, -2147483648, -1)).to(tl.float32, bitcast=True)


@triton.jit
def _zero_keys(BLOCK_D: tl.constexpr, IS_FP64: tl.constexpr):
    if IS_FP64:
        return tl.zeros([BLOCK_D], dtype=tl.uint64)
    else:
        return tl.zeros([BLOCK_D], dtype=tl.uint32)


@triton.jit
def _count_below(G, row_ids, cols, col_ok, n, d, bound_a, bound_b, center, HAS_ROWS: tl.constexpr,
                 IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DISTANCE: tl.constexpr):
    """Per column, how many keys are < bound_a and how many are < bound_b; the keys are of the
    values, or with DISTANCE of their distances |x - center|."""
    below_a = tl.zeros([BLOCK_D], dtype=tl.int32)
    below_b = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        x, rows, valid = load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS, IS_FP64, BLOCK_N)
        if DISTANCE:
            x = tl.abs(x - center[None, :])
        key = _sortable_key(x, IS_FP64)
        below_a += tl.sum((valid & (key < bound_a[None, :])).to(tl.int32), axis=0)
        below_b += tl.sum((valid & (key < bound_b[None, :])).to(tl.int32), axis=0)
    return below_a, below_b


@triton.jit
def _keys_at_ranks(G, row_ids, cols, col_ok, n, d, rank_a, rank_b, center, HAS_ROWS: tl.constexpr,
                   KEY_BITS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DISTANCE: tl.constexpr):
    """Per column, the keys at ranks rank_a and rank_b (of the values, or of |x - center|)."""
    key_a = _zero_keys(BLOCK_D, IS_FP64)
    key_b = key_a
    # Greedy bisection from the top bit: the key at rank r is the largest K with #{key < K} <= r.
    for step in range(KEY_BITS):
        bit = (key_a * 0 + 1) << (key_a * 0 + (KEY_BITS - 1 - step))
        try_a = key_a | bit
        try_b = key_b | bit
        below_a, below_b = _count_below(G, row_ids, cols, col_ok, n, d, try_a, try_b, center, HAS_ROWS, IS_FP64,
                                        BLOCK_N, BLOCK_D, DISTANCE)
        key_a = tl.where(below_a <= rank_a, try_a, key_a)
        key_b = tl.where(below_b <= rank_b, try_b, key_b)
    return key_a, key_b


@triton.jit
def _order_mean_select_kernel(G, row_ids, out, mask_out, flags, n, d, lo, hi, min_votes, rescale_down, rescale_up,
                              HAS_ROWS: tl.constexpr, KEY_BITS: tl.constexpr, IS_FP64: tl.constexpr,
                              INVARIANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    no_center = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    key_lo, key_hi = _keys_at_ranks(G, row_ids, cols, col_ok, n, d, lo, hi - 1, no_center, HAS_ROWS, KEY_BITS,
                                    IS_FP64, BLOCK_N, BLOCK_D, False)
    # One more pass: values strictly between the two boundary keys (plain and rescaled), boundary
    # counts, votes, flags.
    inner = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    inner_rescaled = inner
    column_bad = tl.zeros([BLOCK_D], dtype=tl.int32)
    upto_lo = tl.zeros([BLOCK_D], dtype=tl.int32)
    below_hi = tl.zeros([BLOCK_D], dtype=tl.int32)
    votes = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        x, rows, valid = load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS, IS_FP64, BLOCK_N)
        flag_rows(x, rows, valid, flags, 1)
        key = _sortable_key(x, IS_FP64)
        between = valid & (key > key_lo[None, :]) & (key < key_hi[None, :])
        inner += tl.sum(tl.where(between, x, 0.0), axis=0)
        inner_rescaled += tl.sum(tl.where(between, x * rescale_down, 0.0), axis=0)
        column_bad |= tl.max((nonfinite(x) & valid).to(tl.int32), axis=0)
        upto_lo += tl.sum((valid & (key <= key_lo[None, :])).to(tl.int32), axis=0)
        below_hi += tl.sum((valid & (key < key_hi[None, :])).to(tl.int32), axis=0)
        votes += tl.sum(tl.where(valid, sign_of(x), 0), axis=0)
    value_lo = _value_of_key(key_lo, IS_FP64)
    value_hi = _value_of_key(key_hi, IS_FP64)
    # Ranks [lo, upto_lo) hold value_lo and ranks [below_hi, hi) hold value_hi.
    copies_lo = (upto_lo - lo).to(inner.dtype)
    copies_hi = (hi - below_hi).to(inner.dtype)
    split = inner + copies_lo * value_lo + copies_hi * value_hi
    same = (hi - lo) * value_lo
    mean = tl.where(key_lo == key_hi, same, split) / (hi - lo)
    split_rescaled = inner_rescaled + copies_lo * (value_lo * rescale_down) + copies_hi * (value_hi * rescale_down)
    same_rescaled = (hi - lo) * (value_lo * rescale_down)
    rescaled_sum = tl.where(key_lo == key_hi, same_rescaled, split_rescaled)
    mean = _kept_mean_finite(mean, rescaled_sum, value_lo, value_hi, hi - lo, rescale_up, column_bad == 0)
    if INVARIANT:
        agree = tl.abs(votes) >= min_votes
        mean = tl.where(agree, mean, 0.0)
        tl.store(mask_out + cols, agree.to(tl.int8), mask=col_ok)
    tl.store(out + cols, to_storage(mean, out.dtype.element_ty), mask=col_ok)


def _order_mean_launch(G, lo, hi, min_votes, rows, invariant, launch):
    G = G.contiguous()
    d = G.shape[1]
    op = "invariant" if invariant else "order_mean"
    row_ids, n, has_rows = row_selection(G, rows, op)
    if invariant:
        check_invariant(lo, hi, min_votes, n)
    else:
        check_ranks(lo, hi, n, op)
    out = torch.empty(d, dtype=G.dtype, device=G.device)
    mask = torch.empty(d if invariant else 0, dtype=torch.int8, device=G.device)
    flags = torch.zeros(n, dtype=torch.int32, device=G.device)
    # core kept_mean_rescaled's 2^m: the smallest power of two >= 2 (hi - lo)
    m = max(0, 2 * (hi - lo) - 1).bit_length()
    rescale_down, rescale_up = 2.0 ** -m, 2.0 ** m
    if n <= MAX_SORT_N:
        n_pad, block_d, warps = sort_settings(n)
        launch(_order_mean_kernel)[(triton.cdiv(d, block_d),)](
            G, row_ids, out, mask, flags, n, d, lo, hi, min_votes, rescale_down, rescale_up, HAS_ROWS=has_rows,
            N_PAD=n_pad, LOG_N=n_pad.bit_length() - 1, BLOCK_D=block_d, IS_FP64=is_fp64(G), INVARIANT=invariant,
            num_warps=warps)
    else:
        block_n, block_d, warps = select_settings()
        launch(_order_mean_select_kernel)[(triton.cdiv(d, block_d),)](
            G, row_ids, out, mask, flags, n, d, lo, hi, min_votes, rescale_down, rescale_up, HAS_ROWS=has_rows,
            KEY_BITS=64 if is_fp64(G) else 32, IS_FP64=is_fp64(G), INVARIANT=invariant, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=warps)
    return out, mask.bool(), flags.bool()


def order_mean_forward(G, lo: int, hi: int, rows=None, launch=lambda k: k):
    """(mean of sorted ranks lo..hi-1 per column, bool[m] non-finite rows) of the m rows ``rows``
    of G (all n when None)."""
    out, _, flags = _order_mean_launch(G, lo, hi, 0, rows, False, launch)
    return out, flags


def invariant_forward(G, lo: int, hi: int, min_votes: int, rows=None, launch=lambda k: k):
    """(mask * order_mean, mask = |sign_sum| >= min_votes, bool[m] non-finite rows) of the m rows
    ``rows`` of G (all n when None)."""
    return _order_mean_launch(G, lo, hi, min_votes, rows, True, launch)


@triton.jit
def _median_center(a, b, two: tl.constexpr, out_dtype: tl.constexpr):
    """core sorted_median of the middle values a <= b (one value unless ``two``), rounded to the
    storage dtype as ``median`` returns it; a mean of two that overflowed is redone scaled by 1/4
    (kept_mean_rescaled for count 2)."""
    if two:
        mean = (a + b) / 2
        rescued = (a * 0.25 + b * 0.25) / 2 * 4
        rescued = tl.where(rescued < a, a, tl.where(b < rescued, b, rescued))
        mean = tl.where(nonfinite(mean) & ~nonfinite(a) & ~nonfinite(b), rescued, mean)
    else:
        mean = a
    return to_storage(mean, out_dtype).to(a.dtype)


@triton.jit
def _closest_kernel(G, row_ids, out, flags, n, d, beta, rescale_down, rescale_up, HAS_ROWS: tl.constexpr,
                    N_PAD: tl.constexpr, LOG_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP64: tl.constexpr,
                    TWO_MIDDLE: tl.constexpr):
    cols, rows, col_ok, valid, x = _load_tile(G, row_ids, flags, n, d, HAS_ROWS, N_PAD, BLOCK_D, IS_FP64)
    ranked = _sort_rows(x, LOG_N)
    a = tl.max(tl.where((rows == (n - 1) // 2)[None, :], ranked, -float("inf")), axis=1)
    b = tl.max(tl.where((rows == n // 2)[None, :], ranked, -float("inf")), axis=1)
    center = _median_center(a, b, TWO_MIDDLE, out.dtype.element_ty)
    gap = tl.where(valid, tl.abs(x - center[:, None]), float("inf"))
    farthest = tl.max(tl.where((rows == beta - 1)[None, :], _sort_rows(gap, LOG_N), -float("inf")), axis=1)
    nearer = valid & (gap < farthest[:, None])
    tied = valid & (gap == farthest[:, None])
    ties_wanted = beta - tl.sum(nearer.to(tl.int32), axis=1)
    take = nearer | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= ties_wanted[:, None]))
    mean = tl.sum(tl.where(take, x, 0.0), axis=1) / beta
    rescaled_sum = tl.sum(tl.where(take, x * rescale_down, 0.0), axis=1)
    lowest = tl.min(tl.where(take, x, float("inf")), axis=1)
    highest = tl.max(tl.where(take, x, -float("inf")), axis=1)
    column_finite = tl.max((nonfinite(x) & valid).to(tl.int32), axis=1) == 0
    mean = _kept_mean_finite(mean, rescaled_sum, lowest, highest, beta, rescale_up, column_finite)
    tl.store(out + cols, to_storage(mean, out.dtype.element_ty), mask=col_ok)


@triton.jit
def _closest_select_kernel(G, row_ids, out, flags, n, d, beta, rescale_down, rescale_up, HAS_ROWS: tl.constexpr,
                           KEY_BITS: tl.constexpr, IS_FP64: tl.constexpr, TWO_MIDDLE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    zero = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    key_a, key_b = _keys_at_ranks(G, row_ids, cols, col_ok, n, d, (n - 1) // 2, n // 2, zero, HAS_ROWS, KEY_BITS,
                                  IS_FP64, BLOCK_N, BLOCK_D, False)
    center = _median_center(_value_of_key(key_a, IS_FP64), _value_of_key(key_b, IS_FP64), TWO_MIDDLE,
                            out.dtype.element_ty)
    key_g, _ = _keys_at_ranks(G, row_ids, cols, col_ok, n, d, beta - 1, beta - 1, center, HAS_ROWS, KEY_BITS,
                              IS_FP64, BLOCK_N, BLOCK_D, True)
    farthest = _value_of_key(key_g, IS_FP64)
    nearer_count = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        x, rows, valid = load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS, IS_FP64, BLOCK_N)
        nearer_count += tl.sum((valid & (tl.abs(x - center[None, :]) < farthest[None, :])).to(tl.int32), axis=0)
    # Keep the nearer values and, in row order, the first ties until beta are kept.
    ties_left = beta - nearer_count
    total = zero
    rescaled_sum = zero
    lowest = zero + float("inf")
    highest = zero - float("inf")
    column_bad = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        x, rows, valid = load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS, IS_FP64, BLOCK_N)
        flag_rows(x, rows, valid, flags, 1)
        gap = tl.abs(x - center[None, :])
        tied = valid & (gap == farthest[None, :])
        take = (valid & (gap < farthest[None, :])) | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= ties_left[None, :]))
        ties_left -= tl.sum((take & tied).to(tl.int32), axis=0)
        total += tl.sum(tl.where(take, x, 0.0), axis=0)
        rescaled_sum += tl.sum(tl.where(take, x * rescale_down, 0.0), axis=0)
        lowest = tl.minimum(lowest, tl.min(tl.where(take, x, float("inf")), axis=0))
        highest = tl.maximum(highest, tl.max(tl.where(take, x, -float("inf")), axis=0))
        column_bad |= tl.max((nonfinite(x) & valid).to(tl.int32), axis=0)
    mean = _kept_mean_finite(total / beta, rescaled_sum, lowest, highest, beta, rescale_up, column_bad == 0)
    tl.store(out + cols, to_storage(mean, out.dtype.element_ty), mask=col_ok)


def closest_to_median_mean_forward(G, beta: int, rows=None, launch=lambda k: k):
    """(mean of the beta values nearest the median per column, bool[m] non-finite rows) of the m
    rows ``rows`` of G (all n when None)."""
    G = G.contiguous()
    d = G.shape[1]
    row_ids, n, has_rows = row_selection(G, rows, "closest_to_median_mean")
    check_count(beta, 1, n, "closest_to_median_mean", "beta")
    out = torch.empty(d, dtype=G.dtype, device=G.device)
    flags = torch.zeros(n, dtype=torch.int32, device=G.device)
    m = max(0, 2 * beta - 1).bit_length()   # core kept_mean_rescaled's 2^m >= 2 beta
    rescale_down, rescale_up = 2.0 ** -m, 2.0 ** m
    two_middle = n % 2 == 0
    if n <= MAX_SORT_N:
        n_pad, block_d, warps = sort_settings(n)
        launch(_closest_kernel)[(triton.cdiv(d, block_d),)](
            G, row_ids, out, flags, n, d, beta, rescale_down, rescale_up, HAS_ROWS=has_rows, N_PAD=n_pad,
            LOG_N=n_pad.bit_length() - 1, BLOCK_D=block_d, IS_FP64=is_fp64(G), TWO_MIDDLE=two_middle,
            num_warps=warps)
    else:
        block_n, block_d, warps = select_settings()
        launch(_closest_select_kernel)[(triton.cdiv(d, block_d),)](
            G, row_ids, out, flags, n, d, beta, rescale_down, rescale_up, HAS_ROWS=has_rows,
            KEY_BITS=64 if is_fp64(G) else 32, IS_FP64=is_fp64(G), TWO_MIDDLE=two_middle, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=warps)
    return out, flags.bool()
