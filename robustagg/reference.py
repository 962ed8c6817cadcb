r"""Pure-PyTorch reference of every op in ``robustagg.ops`` (semantics: docs/ops.md).

This is the ground truth of the test suite and the ``torch`` baseline of the benchmarks. It is
written to be read, not to be fast: each function is the formula of its op, computed in
the op's arithmetic dtype (float32, or float64 for float64 inputs). It does no argument checking
and applies no non-finite policy; ``robustagg.ops`` does both.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dtypes import acc_dtype

# Sorting a whole (n, d) matrix at once needs n*d*12 extra bytes (values + int64 indices); the
# order statistics sort column blocks of this many coordinates instead, to stay within memory.
_SORT_COLUMNS = 1 << 20


# ---------------------------------------------------------------- sign votes

def sign_sum(G: torch.Tensor) -> torch.Tensor:
    r"""$s_j = \sum_i \operatorname{sign}(G_{ij})$ with $\operatorname{sign}(\pm 0) = 0$; int32[d]."""
    return torch.sign(G).sum(dim=0, dtype=torch.int32)


def sign_agreement(G: torch.Tensor) -> torch.Tensor:
    r"""$|s_j| / n$, the AND-mask sign consistency; in G's dtype."""
    return (sign_sum(G).abs().to(acc_dtype(G.dtype)) / G.shape[0]).to(G.dtype)


# ---------------------------------------------------------------- order statistics

def kept_mean(kept: torch.Tensor) -> torch.Tensor:
    r"""Per column, the mean of the sorted kept values ``kept`` [count, d].

    The mean of finite values is finite, but their sum can overflow (two 3e38 values in float32;
    torch adds in a tree, so -Inf + Inf can even make it NaN). Where it does, the values are summed
    scaled by $2^{-m}$ with $2^m \ge 2\,\mathrm{count}$ (exact, and no partial sum can overflow),
    and the mean is clamped to the kept range, which rounding could otherwise leave by an ulp
    (docs/nonfinite.md, "Huge finite values").
    """
    count = kept.shape[0]
    total = kept.sum(dim=0)
    scale = 2.0 ** -(2 * count - 1).bit_length()
    rescued = ((kept * scale).sum(dim=0) / count / scale).clamp(kept[0], kept[-1])
    overflow = ~torch.isfinite(total) & torch.isfinite(kept).all(dim=0)
    return torch.where(overflow, rescued, total / count)


def order_mean(G: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    r"""Per coordinate, the mean of the sorted values at positions lo..hi-1 (ascending)."""
    acc = acc_dtype(G.dtype)
    out = torch.empty(G.shape[1], dtype=acc, device=G.device)
    for start in range(0, G.shape[1], _SORT_COLUMNS):
        block = G[:, start:start + _SORT_COLUMNS].to(acc)
        out[start:start + _SORT_COLUMNS] = kept_mean(torch.sort(block, dim=0).values[lo:hi])
    return out.to(G.dtype)


def trimmed_mean(G: torch.Tensor, trim: int) -> torch.Tensor:
    """Drop the ``trim`` smallest and ``trim`` largest values per coordinate, average the rest."""
    return order_mean(G, trim, G.shape[0] - trim)


def median(G: torch.Tensor) -> torch.Tensor:
    """numpy-style median: the mean of the two middle values for even n."""
    n = G.shape[0]
    return order_mean(G, (n - 1) // 2, n // 2 + 1)


def closest_to_median_mean(G: torch.Tensor, beta: int) -> torch.Tensor:
    r"""Bulyan's coordinate step: per coordinate, the mean of the ``beta`` values nearest the
    median (``median(G)``, in G's dtype); ties in distance go to the lower row."""
    acc = acc_dtype(G.dtype)
    center = median(G).to(acc)
    out = torch.empty(G.shape[1], dtype=acc, device=G.device)
    for start in range(0, G.shape[1], _SORT_COLUMNS):
        block = G[:, start:start + _SORT_COLUMNS].to(acc)
        gap = (block - center[start:start + _SORT_COLUMNS]).abs()
        nearest = torch.sort(gap, dim=0, stable=True).indices[:beta]
        out[start:start + _SORT_COLUMNS] = kept_mean(torch.sort(block.gather(0, nearest), dim=0).values)
    return out.to(G.dtype)


# ---------------------------------------------------------------- invariant aggregation

def invariant(G: torch.Tensor, tau: float, trim: int, strict: bool = True, return_mask: bool = False):
    r"""AND-mask times trimmed mean: $\mathrm{out}_j = [a_j > \tau]\,\mathrm{tm}_j$ (``>=`` if not strict).

    The agreement $a_j = |s_j|/n$ is compared in float64.
    """
    agreement = sign_sum(G).abs().double() / G.shape[0]
    mask = agreement > tau if strict else agreement >= tau
    out = torch.where(mask, trimmed_mean(G, trim), torch.zeros((), dtype=G.dtype, device=G.device))
    return (out, mask) if return_mask else out


# ---------------------------------------------------------------- robust learning rate

def rlr(G: torch.Tensor, theta: int, weights: torch.Tensor | None = None, server_lr: float = 1.0):
    r"""$\mathrm{out}_j = \eta_j \cdot \sum_i w_i G_{ij} / \sum_i w_i$ with
    $\eta_j = +\mathrm{lr}$ if $|s_j| \ge \theta$ else $-\mathrm{lr}$."""
    acc = acc_dtype(G.dtype)
    w = torch.ones(G.shape[0], dtype=acc, device=G.device) if weights is None else weights.to(acc)
    avg = weighted_mean(G.to(acc), w)
    lr = torch.full_like(avg, server_lr)  # in the arithmetic dtype: a float64 G keeps a float64 lr
    lr = torch.where(sign_sum(G).abs() >= theta, lr, -lr)
    return (lr * avg).to(G.dtype)


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    r"""$\sum_i w_i X_i / \sum_i w_i$ in X's dtype. Where the weighted sum overflows although every
    value is finite, the mean is taken as $\sum_i (w_i / W) X_i$ in float64 and clamped to the
    column's range, so finite rows always give a finite mean."""
    avg = (w[:, None] * X).sum(dim=0) / w.sum()
    overflow = ~torch.isfinite(avg) & torch.isfinite(X).all(dim=0)   # a tree sum can turn Inf - Inf into NaN
    if bool(overflow.any()):
        cols = overflow.nonzero().flatten()
        X64, w64 = X[:, cols].double(), w.double()
        rescued = ((w64 / w64.sum())[:, None] * X64).sum(dim=0).clamp(X64.amin(dim=0), X64.amax(dim=0))
        avg[cols] = rescued.to(X.dtype)
    return avg


# ---------------------------------------------------------------- client statistics

class ClientStatsRef(NamedTuple):
    norm: torch.Tensor            # [n]
    sign_frac: torch.Tensor       # [n, 3]: fractions > 0, == 0, < 0 inside the window
    dot: torch.Tensor | None      # [n]: G_i . ref
    ref_norm: torch.Tensor | None
    ref_dist: torch.Tensor | None  # [n]: ||G_i - ref||


# Norms within these bounds need no scaling: every square (and product of two such rows) is in
# float64's range, and any square lost to underflow is negligible beside the norm.
_SAFE_NORMS = (2.0 ** -450, 2.0 ** 450)


def power_of_two_exponents(X: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of the float64 matrix X, the integer k with max|X_i| * 2^k in [0.5, 1) (0 for a zero
    row), or, given the rows' plain ``norms``, 0 for every row whose norm needs no scaling.
    ``torch.ldexp(X, k)`` scales by it exactly, and the squares of the scaled row neither overflow
    nor underflow (LAPACK's nrm2 scales the same way)."""
    if norms is None:
        return -torch.frexp(X.abs().amax(dim=1)).exponent
    lo, hi = _SAFE_NORMS
    k = torch.zeros(X.shape[0], dtype=torch.int32, device=X.device)
    unsafe = ~((norms >= lo) & (norms < hi))
    if bool(unsafe.any()):
        k[unsafe] = power_of_two_exponents(X[unsafe])
    return k


def scale_rows(X: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """X_i * 2^(k_i), exactly (X itself when every k_i is 0)."""
    return torch.ldexp(X, k[:, None]) if bool(k.any()) else X


def row_norms(X: torch.Tensor) -> torch.Tensor:
    """L2 norms of the rows of the float64 matrix X, scaled where needed so that a norm that fits is
    returned (a 1e200 row or a row of 5e-324 has a finite, non-zero norm)."""
    k = power_of_two_exponents(X, X.norm(dim=1))
    return torch.ldexp(scale_rows(X, k).norm(dim=1), -k)


def cosine_to(X: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """cos(X_i, ref) of float64 rows, 0 where either is zero. Rows and ref are scaled by powers of
    two first, which leaves the cosines unchanged and keeps every product in range."""
    Y = scale_rows(X, power_of_two_exponents(X))
    r = scale_rows(ref[None, :], power_of_two_exponents(ref[None, :]))[0]
    denom = Y.norm(dim=1) * r.norm()
    return torch.where(denom > 0, (Y @ r) / denom, torch.zeros_like(denom)).clamp(-1.0, 1.0)


def client_stats(G: torch.Tensor, window: tuple[int, int] | None = None, ref: torch.Tensor | None = None):
    """Row norms, windowed sign fractions, dot products with ``ref`` and distances to it, in
    float64 for every input dtype: n numbers whose exact values may not fit float32.
    Where a row (or ref) is too large or small for plain float64 products, norms, distances and dot
    products are computed on power-of-two-scaled values and scaled back in one step, so every one
    that fits float64 is returned."""
    start, length = (0, G.shape[1]) if window is None else window
    win = G[:, start:start + length]
    sign_frac = torch.stack([(win > 0).sum(1), (win == 0).sum(1), (win < 0).sum(1)], dim=1).double() / length
    G64 = G.double()
    norm = row_norms(G64)
    if ref is None:
        return ClientStatsRef(norm, sign_frac, None, None, None)
    ref64 = ref.double()[None, :]
    k = power_of_two_exponents(G64, G64.norm(dim=1))
    k_ref = power_of_two_exponents(ref64, ref64.norm(dim=1))
    dot = torch.ldexp(scale_rows(G64, k) @ scale_rows(ref64, k_ref)[0], -(k + k_ref))
    # g_i - ref rounds once per entry, to Inf only where the entry's exact difference exceeds float64
    ref_dist = torch.cat([row_norms(row[None, :] - ref64) for row in G64])
    return ClientStatsRef(norm, sign_frac, dot, row_norms(ref64)[0], ref_dist)


def clip_rows(G: torch.Tensor, max_norm) -> torch.Tensor:
    """Scale each row by min(1, max_norm / ||G_i||) in float64; a zero row stays zero.

    A clipped row is scaled by a power of two first, Y_i = 2^(k_i) G_i, and becomes
    Y_i * (max_norm / ||Y_i||), so that neither the norm nor the factor of a huge or tiny float64
    row can overflow or underflow. One row at a time, so that no float64 copy of G is needed."""
    bounds = torch.as_tensor(max_norm, dtype=torch.float64, device=G.device).expand(G.shape[0])
    out = G.clone()
    for i, bound in enumerate(bounds):
        x = G[i:i + 1].double()
        if bool(row_norms(x)[0] > bound):
            y = scale_rows(x, power_of_two_exponents(x))
            out[i] = (y * (bound / y.norm()))[0].to(G.dtype)
    return out


# ---------------------------------------------------------------- top-k with error feedback

def _topk_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, ties at the k-th value to the lower index, ascending.

    ``torch.topk`` finds the k-th largest value; its own choice among equal values is not
    specified, so the selection is rebuilt: everything above it, then the lowest-index ties.
    """
    k = min(k, magnitude.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitude.device)
    kth = torch.topk(magnitude, k).values[-1]  # descending; NaN ranks above every number, as in torch.sort
    if torch.isnan(kth):
        return magnitude.isnan().nonzero().flatten()[:k]
    above = ((magnitude > kth) | magnitude.isnan()).nonzero().flatten()
    ties = (magnitude == kth).nonzero().flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def topk_abs(x: torch.Tensor, k: int):
    """(indices int64[k], values[k]) of the k largest |x|, ties to the lower index, ascending."""
    idx = _topk_indices(x.to(acc_dtype(x.dtype)).abs(), k)
    return idx, x[idx]


def topk_ef_step(u, error, momentum, k: int, rho: float):
    """SparseFed's server step (``ops.topk_ef_step``); updates ``error`` and ``momentum`` in place.

    Error feedback can legitimately grow past the dtype's range (a client that keeps sending
    3e38 in float32); momentum and error then saturate at the largest finite value of the storage
    dtype instead of becoming Inf.
    """
    acc = acc_dtype(u.dtype)
    limit = torch.finfo(u.dtype).max
    m = u.to(acc, copy=True) if rho == 0 else rho * momentum.to(acc) + u.to(acc)  # copy: m is zeroed below
    m = m.clamp(-limit, limit)
    e = (error.to(acc) + m).clamp(-limit, limit)
    idx = _topk_indices(e.abs(), k)
    values = e[idx].to(u.dtype)
    e[idx] = 0
    m[idx] = 0  # momentum factor masking
    error.copy_(e)
    momentum.copy_(m)
    return idx, values


# ---------------------------------------------------------------- max-pool amplification

def maxpool_amplify(G: torch.Tensor, layout, kernel: int, restore: bool = False) -> torch.Tensor:
    """Per-segment ``kernel x kernel`` max-pooling, stride = kernel, floor mode (``ops.maxpool_amplify``)."""
    return maxpool_segments(G, layout.segments_for(G.shape[1]), kernel, restore)


def maxpool_segments(G: torch.Tensor, segments, kernel: int, restore: bool = False) -> torch.Tensor:
    """``maxpool_amplify`` over a list of ``layout.Segment``."""
    n = G.shape[0]
    pieces = []
    out = torch.zeros_like(G) if restore else None
    for seg in segments:
        x = G[:, seg.offset:seg.offset + seg.numel]
        if not seg.pooled:
            if restore:
                out[:, seg.offset:seg.offset + seg.numel] = x
            else:
                pieces.append(x)
            continue
        grid = x.reshape(n, seg.rows, seg.cols)
        R, C = seg.rows // kernel, seg.cols // kernel
        if not restore:
            if R == 0 or C == 0:
                continue  # floor mode leaves nothing of a segment smaller than the kernel
            pieces.append(F.max_pool2d(grid.unsqueeze(1).to(acc_dtype(G.dtype)), kernel, stride=kernel)
                          .reshape(n, R * C).to(G.dtype))
            continue
        # windows as (n, R, C, kernel*kernel) in row-major order inside each window
        win = grid[:, :R * kernel, :C * kernel].reshape(n, R, kernel, C, kernel).permute(0, 1, 3, 2, 4)
        win = win.reshape(n, R, C, kernel * kernel)
        first = win.argmax(dim=-1, keepdim=True)  # torch.argmax returns the first maximal index
        kept = torch.zeros_like(win).scatter_(-1, first, win.gather(-1, first))
        kept = kept.reshape(n, R, C, kernel, kernel).permute(0, 1, 3, 2, 4).reshape(n, R * kernel, C * kernel)
        restored = torch.zeros_like(grid)
        restored[:, :R * kernel, :C * kernel] = kept
        out[:, seg.offset:seg.offset + seg.numel] = restored.reshape(n, seg.numel)
    if restore:
        return out
    return torch.cat(pieces, dim=1) if pieces else G.new_zeros(n, 0)


# ---------------------------------------------------------------- pairwise geometry
#
# [n, n] matrices are float64 for every input dtype: a squared distance between finite float32
# rows need not fit float32.

def pairwise_sqdist(G: torch.Tensor) -> torch.Tensor:
    r"""$D_{ij} = \|G_i - G_j\|^2$ from direct differences, so identical rows give exactly 0."""
    X = G.double()
    return torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def pairwise_cosine(G: torch.Tensor) -> torch.Tensor:
    r"""$C_{ij} = G_i \cdot G_j / (\|G_i\| \|G_j\|)$; exactly 1 for identical non-zero rows, 0 for zero rows.

    Each row is first scaled by a power of two (``power_of_two_exponents``), which leaves every
    cosine unchanged and keeps float64 rows of 1e300 or 1e-300 from overflowing or underflowing.
    """
    X = G.double()
    Y = scale_rows(X, power_of_two_exponents(X, X.norm(dim=1)))
    norm = Y.norm(dim=1)
    gram = Y @ Y.T
    gram = torch.triu(gram) + torch.triu(gram, 1).T  # BLAS need not return a symmetric product
    cos = (gram / (norm[:, None] * norm[None, :])).clamp(-1.0, 1.0)
    nonzero = norm > 0
    identical = torch.cdist(Y, Y, compute_mode="donot_use_mm_for_euclid_dist") == 0
    cos = torch.where(identical, torch.ones_like(cos), cos)
    return torch.where(nonzero[:, None] & nonzero[None, :], cos, torch.zeros_like(cos))
