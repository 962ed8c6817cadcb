r"""Pairwise geometry (docs/ops.md): squared distances and cosines between the n client rows.

Distances come from direct differences, never from ||a||^2 + ||b||^2 - 2ab, so identical rows
give exactly 0 and nearly identical rows keep their precision. A program owns a pair of row tiles
(I <= J, BLOCK_I rows each) and one chunk of the columns; it adds (x_i - x_j)^2, x_i . x_j and the
number of differing entries in float64 (no overflow for finite rows, and a float32 pair product is
exact in float64). Partial sums go to a [chunks, n, n] buffer that torch reduces in a fixed order,
so the result is deterministic; D[i, j] and D[j, i] are the same sums in the same order, so both
matrices are exactly symmetric. Diagonal tiles also flag non-finite rows in the same pass.

Cosines are 1 where the rows are identical (no differing entry) and 0 where a row is zero. Both
matrices are float64 for every input dtype: a squared distance between finite float32 rows need
not fit float32.

Squared distances of finite rows overflow or underflow only where the exact value does, but dots
of float64 rows can do so where the cosine is an ordinary number (rows of 1e300 or 1e-300). Such
rows are "unsafe" (core ``gram_row_unsafe``: a self product that is not finite or below 2^-900),
and are rare: only when the first launch finds one, a second launch recomputes the sums with
every row scaled by core's ``row_scale`` for the products (exact, and cosines do not change; safe
rows keep the scale 1 and so their bits).
"""
import torch
import triton
import triton.language as tl

from .common import SCALE_DOWN, SCALE_UP, TINY_SQUARES, nonfinite, to_acc
from .settings import is_fp64, pairwise_settings

# Aim for a few programs per SM on a 132-SM GPU; chunks shorter than this are not worth a program.
TARGET_PROGRAMS = 1024
MIN_CHUNK = 4096


@triton.jit
def _pairwise_kernel(G, pairs, scales, squares, dots, differ, bad, n, d, chunk_len, WANT_DOT: tl.constexpr,
                     SCALED: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_i = tl.load(pairs + pair * 2)
    tile_j = tl.load(pairs + pair * 2 + 1)
    rows_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rows_j = tile_j * BLOCK_I + tl.arange(0, BLOCK_I)
    sq = tl.zeros([BLOCK_I, BLOCK_I], dtype=tl.float64)
    dot = tl.zeros([BLOCK_I, BLOCK_I], dtype=tl.float64)
    ne = tl.zeros([BLOCK_I, BLOCK_I], dtype=tl.int32)
    bad_i = tl.zeros([BLOCK_I], dtype=tl.int32)
    if SCALED:
        scale_i = tl.load(scales + rows_i, mask=rows_i < n, other=1.0)[:, None, None]
        scale_j = tl.load(scales + rows_j, mask=rows_j < n, other=1.0)[None, :, None]
    start = chunk.to(tl.int64) * chunk_len
    for offset in range(0, chunk_len, BLOCK_D):
        cols = start + offset + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        ok_i = (rows_i < n)[:, None] & col_ok[None, :]
        ok_j = (rows_j < n)[:, None] & col_ok[None, :]
        xi = to_acc(tl.load(G + rows_i.to(tl.int64)[:, None] * d + cols[None, :], mask=ok_i, other=0.0), IS_FP64)
        xj = to_acc(tl.load(G + rows_j.to(tl.int64)[:, None] * d + cols[None, :], mask=ok_j, other=0.0), IS_FP64)
        a = xi.to(tl.float64)[:, None, :]
        b = xj.to(tl.float64)[None, :, :]
        diff = a - b
        sq += tl.sum(diff * diff, axis=2)
        if WANT_DOT:
            if SCALED:
                dot += tl.sum((a * scale_i) * (b * scale_j), axis=2)
            else:
                dot += tl.sum(a * b, axis=2)
            ne += tl.sum((xi[:, None, :] != xj[None, :, :]).to(tl.int32), axis=2)
        bad_i |= tl.max((nonfinite(xi) & ok_i).to(tl.int32), axis=1)
    out = chunk.to(tl.int64) * n * n + rows_i.to(tl.int64)[:, None] * n + rows_j[None, :]
    ok = (rows_i < n)[:, None] & (rows_j < n)[None, :]
    tl.store(squares + out, sq, mask=ok)
    if WANT_DOT:
        tl.store(dots + out, dot, mask=ok)
        tl.store(differ + out, ne, mask=ok)
    if tile_i == tile_j:
        tl.store(bad + chunk.to(tl.int64) * n + rows_i, bad_i.to(tl.int8), mask=rows_i < n)


def _pair_sums(G, want_dot: bool, launch, scales=None):
    """Float64 [n, n] sums of squared differences (and dots, of the rows times ``scales`` if given,
    and differing-entry counts), row flags."""
    n, d = G.shape
    block_i, block_d, warps = pairwise_settings()
    tiles = triton.cdiv(n, block_i)
    pairs = torch.tensor([(i, j) for i in range(tiles) for j in range(i, tiles)], dtype=torch.int32)
    chunks = max(1, min(triton.cdiv(TARGET_PROGRAMS, pairs.shape[0]), triton.cdiv(d, MIN_CHUNK)))
    chunk_len = triton.cdiv(triton.cdiv(d, chunks), block_d) * block_d
    chunks = triton.cdiv(d, chunk_len)
    # zeros: the lower tiles are never written and are mirrored from the upper ones below
    squares = torch.zeros(chunks, n, n, dtype=torch.float64, device=G.device)
    dots = torch.zeros(chunks, n, n, dtype=torch.float64, device=G.device) if want_dot else squares
    differ = torch.zeros(chunks, n, n, dtype=torch.int32, device=G.device) if want_dot else squares
    bad = torch.zeros(chunks, n, dtype=torch.int8, device=G.device)
    launch(_pairwise_kernel)[(pairs.shape[0], chunks)](
        G, pairs.to(G.device), squares if scales is None else scales, squares, dots, differ, bad, n, d, chunk_len,
        WANT_DOT=want_dot, SCALED=scales is not None, IS_FP64=is_fp64(G), BLOCK_I=block_i, BLOCK_D=block_d,
        num_warps=warps)
    tile_of = torch.arange(n, device=G.device) // block_i
    upper = tile_of[:, None] <= tile_of[None, :]

    def full(partial):
        total = partial.sum(dim=0)
        return torch.where(upper, total, total.T)

    flags = bad.amax(dim=0).bool()
    if not want_dot:
        return full(squares), None, None, flags
    return full(squares), full(dots), full(differ), flags


def _unsafe_row_scales(self_products):
    """core row_scale per row from its self product K_ii, or None when every row is safe: 2^-600
    where K_ii overflowed, 2^600 where it is below 2^-900 (or NaN), 1 for safe rows."""
    safe = (self_products >= TINY_SQUARES) & torch.isfinite(self_products)
    if bool(safe.all()):
        return None
    scale_up = torch.full_like(self_products, SCALE_UP.value)
    scale = torch.where(self_products >= TINY_SQUARES, SCALE_DOWN.value, scale_up)
    return torch.where(safe, 1.0, scale).contiguous()


def _cosine_from_gram(kii, kjj, kij, equal_rows):
    """core cosine_from_gram, elementwise: 0 if either row is zero (NaN propagates), exactly 1 for
    equal rows, otherwise K_ij / (|i| |j|) clamped to [-1, 1]."""
    cos = torch.where(equal_rows, 1.0, (kij / (kii.sqrt() * kjj.sqrt())).clamp(-1.0, 1.0))
    nan_seen = kii.isnan() | kjj.isnan() | kij.isnan()
    zero_row = ~(kii > 0) | ~(kjj > 0)
    return torch.where(zero_row, torch.where(nan_seen, kij, 0.0), cos)


def pairwise_sqdist_forward(G, launch=lambda k: k):
    """(float64 [n, n] squared distances, bool[n] non-finite rows)."""
    squares, _, _, flags = _pair_sums(G.contiguous(), False, launch)
    return squares, flags


def pairwise_cosine_forward(G, launch=lambda k: k):
    """(float64 [n, n] cosines, bool[n] non-finite rows)."""
    G = G.contiguous()
    _, dots, differ, flags = _pair_sums(G, True, launch)
    # 16/32-bit squares cannot leave the float64 range, so only float64 rows can be unsafe.
    scales = _unsafe_row_scales(dots.diagonal()) if is_fp64(G) else None
    if scales is not None:
        _, dots, differ, flags = _pair_sums(G, True, launch, scales)
    self_products = dots.diagonal()
    return _cosine_from_gram(self_products[:, None], self_products[None, :], dots, differ == 0), flags
