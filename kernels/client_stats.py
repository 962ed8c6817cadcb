r"""Per-client statistics and norm clipping (docs/ops.md).

``client_stats`` reads G once: a program owns one row and a CHUNK of its columns, and returns
partial sums for that chunk (in float64: sums of squares of the row and of its difference from
ref, the dot with ref; sign counts in the window as integers; a non-finite flag). The partials
land in [n, chunks, ...] buffers that torch reduces in a fixed order, so the result is
deterministic without any atomics. Every program also accumulates ref . ref over its chunk (ref
is loaded for the dot anyway); row 0's partials give ||ref|| without another pass.

Every statistic is float64 for every input dtype: n numbers whose exact values may not fit
float32. A 16/32-bit value squares in float64 without overflow or underflow, so one plain sum is
safe. A float64 value beyond ~1e154 squares to Inf and one below ~1e-162 to 0, so for float64
input every sum of squares is kept three times (plain, of v * 2^-600, of v * 2^600) and the dot
twice (plain, of both factors * 2^-600); the host picks, per row, the sum that neither overflowed
nor underflowed, by core/client_stats.h's rules (``scaled_norm``, ``dot_value``).

``clip_rows`` needs the norms before it can scale, so it is two passes: the same partial-norm
kernel, then a scaling kernel that applies core's float64 ``clip_factor`` (pre, factor).
"""
import torch
import triton
import triton.language as tl

from .._raw_checks import client_stats_ref, clip_bound
from .common import SCALE_DOWN, SCALE_UP, TINY_SQUARES, nonfinite, to_acc, to_storage
from .settings import flat_settings, is_fp64, row_settings


@triton.jit
def _add_squares(v, plain, down, up, SCALED: tl.constexpr):
    """core square_sums_add: v^2 into plain, and for float64 input (v 2^-600)^2 and (v 2^600)^2."""
    plain += v * v
    if SCALED:
        small = v * SCALE_DOWN
        large = v * SCALE_UP
        down += small * small
        up += large * large
    return plain, down, up


@triton.jit
def _store_squares(sums, slot, plain, down, up, SCALED: tl.constexpr):
    """The program's three sums of squares into slot ``slot`` of a [.., 3] partials buffer."""
    tl.store(sums + slot * 3, tl.sum(plain, axis=0))
    if SCALED:
        tl.store(sums + slot * 3 + 1, tl.sum(down, axis=0))
        tl.store(sums + slot * 3 + 2, tl.sum(up, axis=0))


@triton.jit
def _client_stats_kernel(G, ref, norm_sums, dot_sums, dist_sums, ref_sums, counts, flags, d, win_start, win_end,
                         chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_REF: tl.constexpr,
                         IS_FP64: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    base = G + row.to(tl.int64) * d
    zeros = tl.zeros([BLOCK], dtype=tl.float64)
    norm_plain, norm_down, norm_up = zeros, zeros, zeros
    dist_plain, dist_down, dist_up = zeros, zeros, zeros
    ref_plain, ref_down, ref_up = zeros, zeros, zeros
    dot_plain, dot_down = zeros, zeros
    positive = tl.zeros([BLOCK], dtype=tl.int32)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    negative = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        cols = chunk.to(tl.int64) * CHUNK + offset + tl.arange(0, BLOCK)
        ok = cols < d
        x = to_acc(tl.load(base + cols, mask=ok, other=0.0), IS_FP64)
        x64 = x.to(tl.float64)
        norm_plain, norm_down, norm_up = _add_squares(x64, norm_plain, norm_down, norm_up, IS_FP64)
        if HAS_REF:
            r = tl.load(ref + cols, mask=ok, other=0.0).to(tl.float64)
            dot_plain += x64 * r
            if IS_FP64:
                dot_down += (x64 * SCALE_DOWN) * (r * SCALE_DOWN)
            # x - r rounds once (to Inf only where |x - r| exceeds float64) and is then scaled exactly.
            dist_plain, dist_down, dist_up = _add_squares(x64 - r, dist_plain, dist_down, dist_up, IS_FP64)
            ref_plain, ref_down, ref_up = _add_squares(r, ref_plain, ref_down, ref_up, IS_FP64)
        window = ok & (cols >= win_start) & (cols < win_end)
        positive += (window & (x > 0)).to(tl.int32)
        zero += (window & (x == 0)).to(tl.int32)
        negative += (window & (x < 0)).to(tl.int32)
        bad |= nonfinite(x).to(tl.int32)
    slot = row.to(tl.int64) * chunks + chunk
    _store_squares(norm_sums, slot, norm_plain, norm_down, norm_up, IS_FP64)
    if HAS_REF:
        tl.store(dot_sums + slot * 2, tl.sum(dot_plain, axis=0))
        if IS_FP64:
            tl.store(dot_sums + slot * 2 + 1, tl.sum(dot_down, axis=0))
        _store_squares(dist_sums, slot, dist_plain, dist_down, dist_up, IS_FP64)
        _store_squares(ref_sums, slot, ref_plain, ref_down, ref_up, IS_FP64)
    tl.store(counts + slot * 3 + 0, tl.sum(positive, axis=0))
    tl.store(counts + slot * 3 + 1, tl.sum(zero, axis=0))
    tl.store(counts + slot * 3 + 2, tl.sum(negative, axis=0))
    tl.store(flags + slot, tl.max(bad, axis=0).to(tl.int8))


def _row_partials(G, window_start, window_length, ref, launch):
    """Per-row float64 sums over all chunks: squares [n, 3] (plain, down, up), and with ref the dot
    [n, 2] (plain, down), squared distances [n, 3] and ref's squares [1, 3] (else [0, ...]); the
    scaled sums stay 0 for 16/32-bit input. Also int64 sign counts [n, 3], bool[n] non-finite rows."""
    n, d = G.shape
    chunk, block, warps = row_settings(d)
    chunks = triton.cdiv(d, chunk)
    has_ref = ref is not None
    ref_rows = n if has_ref else 0

    def partials(rows, slots):
        return torch.zeros(rows, chunks, slots, dtype=torch.float64, device=G.device)

    norm, dot, dist, ref_squares = partials(n, 3), partials(ref_rows, 2), partials(ref_rows, 3), partials(ref_rows, 3)
    counts = torch.empty(n, chunks, 3, dtype=torch.int32, device=G.device)
    flags = torch.empty(n, chunks, dtype=torch.int8, device=G.device)
    launch(_client_stats_kernel)[(chunks, n)](
        G, ref if has_ref else G, norm, dot, dist, ref_squares, counts, flags, d, window_start,
        window_start + window_length, chunks, CHUNK=chunk, BLOCK=block, HAS_REF=has_ref, IS_FP64=is_fp64(G),
        num_warps=warps)
    return (norm.sum(dim=1), dot.sum(dim=1), dist.sum(dim=1), ref_squares[:1].sum(dim=1),
            counts.sum(dim=1, dtype=torch.int64), flags.amax(dim=1).bool())


def _scaled_norm(squares, scaled: bool):
    """core scaled_norm<kScaled> per row of squares [.., 3]: (value, scale) with value = ||v * scale||
    from the plain sum, or where that overflowed (float64 input) the one scaled down, or where it
    is below 2^-900 (may have lost squares to underflow) the one scaled up."""
    plain, down, up = squares.unbind(-1)
    value, scale = plain.sqrt(), torch.ones_like(plain)
    if scaled:
        overflowed, tiny = torch.isinf(plain), plain < TINY_SQUARES
        value = torch.where(overflowed, down.sqrt(), torch.where(tiny, up.sqrt(), value))
        scale = torch.where(overflowed, SCALE_DOWN.value, torch.where(tiny, SCALE_UP.value, scale))
    return value, scale


def _norm_value(squares, scaled: bool):
    """core norm_value: value / scale, which overflows only where the norm does not fit float64."""
    value, scale = _scaled_norm(squares, scaled)
    return value / scale


def _dot_value(dots, scaled: bool):
    """core dot_value<kScaled>: the plain dot, or where it overflowed (to Inf, or NaN through
    Inf - Inf) while the scaled one is finite, the scaled one times 2^1200 in two exact steps."""
    plain, down = dots.unbind(-1)
    if not scaled:
        return plain
    return torch.where(~torch.isfinite(plain) & torch.isfinite(down), down * SCALE_UP.value * SCALE_UP.value, plain)


def client_stats_forward(G, window_start: int, window_length: int, ref, launch=lambda k: k):
    """float64 (norm[n], sign_frac[n, 3], dot[n], ref_norm[1], ref_dist[n]) and bool[n] non-finite
    rows; dot, ref_norm and ref_dist are empty when ref is None."""
    G = G.contiguous()
    ref = client_stats_ref(G, window_start, window_length, ref)
    scaled = is_fp64(G)
    squares, dots, dist, ref_squares, counts, flags = _row_partials(G, window_start, window_length, ref, launch)
    norm = _norm_value(squares, scaled)
    sign_frac = counts.double() / window_length
    if ref is None:
        empty = torch.empty(0, dtype=torch.float64, device=G.device)
        return norm, sign_frac, empty, empty.clone(), empty.clone(), flags
    dot = _dot_value(dots, scaled).contiguous()  # a column of the partial sums when not rescued
    return norm, sign_frac, dot, _norm_value(ref_squares, scaled), _norm_value(dist, scaled), flags


@triton.jit
def _clip_rows_kernel(G, pre, factor, out, d, IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1).to(tl.int64)
    ok = cols < d
    x = to_acc(tl.load(G + row * d + cols, mask=ok, other=0.0), IS_FP64).to(tl.float64)
    # core clip_value in float64; rounded to the arithmetic dtype first, as the CPU kernel's
    # conversions to 16-bit types go through float32, so that both give the same bits.
    clipped = (x * tl.load(pre + row)) * tl.load(factor + row)
    tl.store(out + row * d + cols, to_storage(to_acc(clipped, IS_FP64), out.dtype.element_ty), mask=ok)


def clip_rows_forward(G, max_norm, launch=lambda k: k):
    """(rows scaled by min(1, max_norm / ||G_i||), bool[n] non-finite rows); zero rows stay zero."""
    G = G.contiguous()
    n, d = G.shape
    bound = clip_bound(max_norm, G)
    squares, _, _, _, _, flags = _row_partials(G, 0, 0, None, launch)
    value, scale = _scaled_norm(squares, is_fp64(G))
    bound = bound.to(torch.float64)
    # core clip_factor: value > bound * scale is ||G_i|| > max_norm without forming ||G_i||, which
    # may overflow; clipped rows become (x * scale) * (max_norm / value), the others stay exact.
    clipped = value > bound * scale
    pre = torch.where(clipped, scale, 1.0).contiguous()
    factor = torch.where(clipped, bound / value, 1.0).contiguous()
    out = torch.empty_like(G)
    block, warps = flat_settings()
    launch(_clip_rows_kernel)[(triton.cdiv(d, block), n)](G, pre, factor, out, d, IS_FP64=is_fp64(G), BLOCK=block,
                                                          num_warps=warps)
    return out, flags
