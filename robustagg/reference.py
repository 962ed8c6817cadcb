r"""Pure-PyTorch reference of every op in SPEC §4.

This is the ground truth of the test suite and the ``torch`` baseline of the benchmarks. It is
written to be read, not to be fast: each function is the formula of its SPEC section, computed in
the op's arithmetic dtype (float32, or float64 for float64 inputs). It does no argument checking
and applies no non-finite policy; ``robustagg.ops`` does both.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Sorting a whole (n, d) matrix at once needs n*d*12 extra bytes (values + int64 indices); the
# order statistics sort column blocks of this many coordinates instead, to stay within memory.
_SORT_COLUMNS = 1 << 20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a storage dtype (SPEC §2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- §4.1 sign votes

def sign_sum(G: torch.Tensor) -> torch.Tensor:
    r"""$s_j = \sum_i \operatorname{sign}(G_{ij})$ with $\operatorname{sign}(\pm 0) = 0$; int32[d]."""
    return torch.sign(G).sum(dim=0, dtype=torch.int32)


def sign_agreement(G: torch.Tensor) -> torch.Tensor:
    r"""$|s_j| / n$, the AND-mask sign consistency; in G's dtype."""
    return (sign_sum(G).abs().to(acc_dtype(G.dtype)) / G.shape[0]).to(G.dtype)


# ---------------------------------------------------------------- §4.2 order statistics

def order_mean(G: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    r"""Per coordinate, the mean of the sorted values at positions lo..hi-1 (ascending)."""
    acc = acc_dtype(G.dtype)
    out = torch.empty(G.shape[1], dtype=acc, device=G.device)
    for start in range(0, G.shape[1], _SORT_COLUMNS):
        block = G[:, start:start + _SORT_COLUMNS].to(acc)
        kept = torch.sort(block, dim=0).values[lo:hi]
        out[start:start + _SORT_COLUMNS] = kept.sum(dim=0) / (hi - lo)
    return out.to(G.dtype)


def trimmed_mean(G: torch.Tensor, trim: int) -> torch.Tensor:
    """Drop the ``trim`` smallest and ``trim`` largest values per coordinate, average the rest."""
    return order_mean(G, trim, G.shape[0] - trim)


def median(G: torch.Tensor) -> torch.Tensor:
    """numpy-style median: the mean of the two middle values for even n."""
    n = G.shape[0]
    return order_mean(G, (n - 1) // 2, n // 2 + 1)


# ---------------------------------------------------------------- §4.3 invariant aggregation

def invariant(G: torch.Tensor, tau: float, trim: int, strict: bool = True, return_mask: bool = False):
    r"""AND-mask times trimmed mean: $\mathrm{out}_j = [a_j > \tau]\,\mathrm{tm}_j$ (``>=`` if not strict).

    The agreement $a_j = |s_j|/n$ is compared in float64.
    """
    agreement = sign_sum(G).abs().double() / G.shape[0]
    mask = agreement > tau if strict else agreement >= tau
    out = torch.where(mask, trimmed_mean(G, trim), torch.zeros((), dtype=G.dtype, device=G.device))
    return (out, mask) if return_mask else out


# ---------------------------------------------------------------- §4.4 robust learning rate

def rlr(G: torch.Tensor, theta: int, weights: torch.Tensor | None = None, server_lr: float = 1.0):
    r"""$\mathrm{out}_j = \eta_j \cdot \sum_i w_i G_{ij} / \sum_i w_i$ with
    $\eta_j = +\mathrm{lr}$ if $|s_j| \ge \theta$ else $-\mathrm{lr}$."""
    acc = acc_dtype(G.dtype)
    w = torch.ones(G.shape[0], dtype=acc, device=G.device) if weights is None else weights.to(acc)
    avg = (w[:, None] * G.to(acc)).sum(dim=0) / w.sum()
    lr = torch.full_like(avg, server_lr)  # in the arithmetic dtype: a float64 G keeps a float64 lr
    lr = torch.where(sign_sum(G).abs() >= theta, lr, -lr)
    return (lr * avg).to(G.dtype)


# ---------------------------------------------------------------- §4.5 client statistics

class ClientStatsRef(NamedTuple):
    norm: torch.Tensor        # [n]
    sign_frac: torch.Tensor   # [n, 3]: fractions > 0, == 0, < 0 inside the window
    dot: torch.Tensor | None  # [n]: G_i . ref
    ref_norm: torch.Tensor | None


def client_stats(G: torch.Tensor, window: tuple[int, int] | None = None, ref: torch.Tensor | None = None):
    """Row norms, windowed sign fractions and dot products with ``ref``, in the arithmetic dtype.

    Norms and dots accumulate in float64, so a finite row never overflows.
    """
    acc = acc_dtype(G.dtype)
    start, length = (0, G.shape[1]) if window is None else window
    win = G[:, start:start + length]
    sign_frac = torch.stack([(win > 0).sum(1), (win == 0).sum(1), (win < 0).sum(1)], dim=1)
    sign_frac = (sign_frac.double() / length).to(acc)
    G64 = G.double()
    norm = G64.norm(dim=1).to(acc)
    if ref is None:
        return ClientStatsRef(norm, sign_frac, None, None)
    ref64 = ref.double()
    return ClientStatsRef(norm, sign_frac, (G64 @ ref64).to(acc), ref64.norm().to(acc))


def clip_scale(norm64: torch.Tensor, max_norm) -> torch.Tensor:
    """Per-row factor min(1, max_norm / norm) in float64; 1 for a zero row."""
    max_norm = torch.as_tensor(max_norm, dtype=torch.float64, device=norm64.device)
    return torch.where(norm64 > max_norm, max_norm / norm64, torch.ones_like(norm64))


def clip_rows(G: torch.Tensor, max_norm) -> torch.Tensor:
    """Scale each row by min(1, max_norm / ||G_i||); a zero row stays zero."""
    acc = acc_dtype(G.dtype)
    scale = clip_scale(G.double().norm(dim=1), max_norm).to(acc)
    return (G.to(acc) * scale[:, None]).to(G.dtype)


# ---------------------------------------------------------------- §4.6 top-k with error feedback

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
    """SparseFed's server step (SPEC §4.6); updates ``error`` and ``momentum`` in place."""
    acc = acc_dtype(u.dtype)
    m = u.to(acc, copy=True) if rho == 0 else rho * momentum.to(acc) + u.to(acc)  # copy: m is zeroed below
    e = error.to(acc) + m
    idx = _topk_indices(e.abs(), k)
    values = e[idx].to(u.dtype)
    e[idx] = 0
    m[idx] = 0  # momentum factor masking
    error.copy_(e)
    momentum.copy_(m)
    return idx, values


# ---------------------------------------------------------------- §4.7 max-pool amplification

def maxpool_amplify(G: torch.Tensor, layout, kernel: int, restore: bool = False) -> torch.Tensor:
    """Per-segment ``kernel x kernel`` max-pooling, stride = kernel, floor mode (SPEC §4.7)."""
    n, d = G.shape
    pieces = []
    out = torch.zeros_like(G) if restore else None
    for seg in layout.segments_for(d):
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


# ---------------------------------------------------------------- §4.8 pairwise geometry

def pairwise_sqdist(G: torch.Tensor) -> torch.Tensor:
    r"""$D_{ij} = \|G_i - G_j\|^2$ from direct differences, so identical rows give exactly 0."""
    X = G.to(acc_dtype(G.dtype))
    return torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def pairwise_cosine(G: torch.Tensor) -> torch.Tensor:
    r"""$C_{ij} = G_i \cdot G_j / (\|G_i\| \|G_j\|)$; exactly 1 for identical non-zero rows, 0 for zero rows."""
    acc = acc_dtype(G.dtype)
    X = G.double()
    norm = X.norm(dim=1)
    gram = X @ X.T
    gram = torch.triu(gram) + torch.triu(gram, 1).T  # BLAS need not return a symmetric product
    cos = gram / (norm[:, None] * norm[None, :])
    cos = cos.clamp(-1.0, 1.0)
    nonzero = norm > 0
    identical = pairwise_sqdist(X) == 0
    cos = torch.where(identical, torch.ones_like(cos), cos)
    cos = torch.where(nonzero[:, None] & nonzero[None, :], cos, torch.zeros_like(cos))
    return cos.to(acc)
