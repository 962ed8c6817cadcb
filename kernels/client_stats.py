r"""Per-client statistics (SPEC §4.5) and norm clipping.

``client_stats`` reads G once: a program owns one row and a CHUNK of its columns, and returns
partial sums for that chunk (sum of squares and dot with ref in float64, so that no finite row
overflows; sign counts in the window as integers; a non-finite flag). The partials land in a
[n, chunks] buffer that torch reduces in a fixed order, so the result is deterministic without
any atomics. Every program also accumulates ref . ref over its chunk (ref is loaded for the dot
anyway); row 0's partials give ||ref|| without another pass.

``clip_rows`` needs the norms before it can scale, so it is two passes: the same partial-norm
kernel, then a scaling kernel.
"""
import torch
import triton
import triton.language as tl

from .common import nonfinite, to_acc, to_storage
from .settings import acc_dtype, flat_settings, is_fp64, row_settings


@triton.jit
def _client_stats_kernel(G, ref, sums, counts, flags, d, win_start, win_end, chunks, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_REF: tl.constexpr, IS_FP64: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    base = G + row.to(tl.int64) * d
    squares = tl.zeros([BLOCK], dtype=tl.float64)
    dots = tl.zeros([BLOCK], dtype=tl.float64)
    ref_squares = tl.zeros([BLOCK], dtype=tl.float64)
    positive = tl.zeros([BLOCK], dtype=tl.int32)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    negative = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        cols = chunk.to(tl.int64) * CHUNK + offset + tl.arange(0, BLOCK)
        ok = cols < d
        x = to_acc(tl.load(base + cols, mask=ok, other=0.0), IS_FP64)
        x64 = x.to(tl.float64)
        squares += x64 * x64
        if HAS_REF:
            r = tl.load(ref + cols, mask=ok, other=0.0).to(tl.float64)
            dots += x64 * r
            ref_squares += r * r
        window = ok & (cols >= win_start) & (cols < win_end)
        positive += (window & (x > 0)).to(tl.int32)
        zero += (window & (x == 0)).to(tl.int32)
        negative += (window & (x < 0)).to(tl.int32)
        bad |= nonfinite(x).to(tl.int32)
    slot = row.to(tl.int64) * chunks + chunk
    tl.store(sums + slot * 3 + 0, tl.sum(squares, axis=0))
    tl.store(sums + slot * 3 + 1, tl.sum(dots, axis=0))
    tl.store(sums + slot * 3 + 2, tl.sum(ref_squares, axis=0))
    tl.store(counts + slot * 3 + 0, tl.sum(positive, axis=0))
    tl.store(counts + slot * 3 + 1, tl.sum(zero, axis=0))
    tl.store(counts + slot * 3 + 2, tl.sum(negative, axis=0))
    tl.store(flags + slot, tl.max(bad, axis=0).to(tl.int8))


def _row_partials(G, window_start, window_length, ref, launch):
    """Per-row float64 (sum x^2, sum x*ref, sum ref^2), int64 sign counts, non-finite flags."""
    n, d = G.shape
    chunk, block, warps = row_settings(d)
    chunks = triton.cdiv(d, chunk)
    sums = torch.empty(n, chunks, 3, dtype=torch.float64, device=G.device)
    counts = torch.empty(n, chunks, 3, dtype=torch.int32, device=G.device)
    flags = torch.empty(n, chunks, dtype=torch.int8, device=G.device)
    has_ref = ref is not None
    launch(_client_stats_kernel)[(chunks, n)](
        G, ref if has_ref else G, sums, counts, flags, d, window_start, window_start + window_length,
        chunks, CHUNK=chunk, BLOCK=block, HAS_REF=has_ref, IS_FP64=is_fp64(G), num_warps=warps)
    return sums.sum(dim=1), counts.sum(dim=1, dtype=torch.int64), flags.amax(dim=1).bool()


def client_stats_forward(G, window_start: int, window_length: int, ref, launch=lambda k: k):
    """(norm[n], sign_frac[n, 3], dot[n] or [0], ref_norm[1] or [0], bool[n] non-finite rows)."""
    G = G.contiguous()
    ref = None if ref is None else ref.to(G.dtype).contiguous()
    acc = acc_dtype(G.dtype)
    sums, counts, flags = _row_partials(G, window_start, window_length, ref, launch)
    norm = sums[:, 0].sqrt().to(acc)
    sign_frac = (counts.double() / window_length).to(acc)
    if ref is None:
        empty = torch.empty(0, dtype=acc, device=G.device)
        return norm, sign_frac, empty, empty.clone(), flags
    ref_norm = sums[0, 2].sqrt().reshape(1).to(acc)
    return norm, sign_frac, sums[:, 1].to(acc).contiguous(), ref_norm, flags


@triton.jit
def _clip_rows_kernel(G, scale, out, d, IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1).to(tl.int64)
    ok = cols < d
    x = to_acc(tl.load(G + row * d + cols, mask=ok, other=0.0), IS_FP64)
    factor = to_acc(tl.load(scale + row), IS_FP64)
    tl.store(out + row * d + cols, to_storage(x * factor, out.dtype.element_ty), mask=ok)


def clip_rows_forward(G, max_norm, launch=lambda k: k):
    """(rows scaled by min(1, max_norm / ||G_i||), bool[n] non-finite rows); zero rows stay zero."""
    G = G.contiguous()
    n, d = G.shape
    sums, _, flags = _row_partials(G, 0, 0, None, launch)
    norm = sums[:, 0].sqrt()
    bound = max_norm.to(torch.float64)
    scale = torch.where(norm > bound, bound / norm, torch.ones_like(norm)).to(acc_dtype(G.dtype))
    out = torch.empty_like(G)
    block, warps = flat_settings()
    launch(_clip_rows_kernel)[(triton.cdiv(d, block), n)](G, scale, out, d, IS_FP64=is_fp64(G), BLOCK=block,
                                                          num_warps=warps)
    return out, flags
