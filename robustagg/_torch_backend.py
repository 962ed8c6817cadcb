"""The ``torch`` backend: the reference ops behind the raw signatures of csrc/ops.cpp.

Each function returns what the compiled kernels return, including the ``nonfinite`` row flags.
Its annotations are the raw schema: robustagg._registry registers each function as
``torch.ops.robustagg_torch.<op>``, and the Triton ops with the same schema. Each checks its
arguments as the native ops do, with their messages (robustagg/_raw_checks.py), before it
computes its result.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _raw_checks as checks
from . import reference
from .layout import Segment

Tensor = torch.Tensor
Tensors2 = tuple[Tensor, Tensor]
Tensors3 = tuple[Tensor, Tensor, Tensor]


def _nonfinite_rows(G: Tensor) -> Tensor:
    return ~torch.isfinite(G).all(dim=1)


def _selected(G: Tensor, rows: Optional[Tensor], op: str) -> Tensor:
    """The rows a coordinate-wise op reads (all of G when ``rows`` is None). This backend copies
    them; the compiled kernels read them in place."""
    rows = checks.rows_arg(rows, G, op)
    return G if rows is None else G.index_select(0, rows)


def sign_sum(G: Tensor, rows: Optional[Tensor] = None) -> Tensors2:
    X = _selected(G, rows, "sign_sum")
    return reference.sign_sum(X), _nonfinite_rows(X)


def order_mean(G: Tensor, lo: int, hi: int, rows: Optional[Tensor] = None) -> Tensors2:
    X = _selected(G, rows, "order_mean")
    checks.check_ranks(lo, hi, X.shape[0], "order_mean")
    return reference.order_mean(X, lo, hi), _nonfinite_rows(X)


def closest_to_median_mean(G: Tensor, beta: int, rows: Optional[Tensor] = None) -> Tensors2:
    X = _selected(G, rows, "closest_to_median_mean")
    checks.check_count(beta, 1, X.shape[0], "closest_to_median_mean", "beta")
    return reference.closest_to_median_mean(X, beta), _nonfinite_rows(X)


def invariant(G: Tensor, lo: int, hi: int, min_votes: int, rows: Optional[Tensor] = None) -> Tensors3:
    X = _selected(G, rows, "invariant")
    checks.check_invariant(lo, hi, min_votes, X.shape[0])
    mask = reference.sign_sum(X).abs() >= min_votes
    out = torch.where(mask, reference.order_mean(X, lo, hi), torch.zeros((), dtype=X.dtype, device=X.device))
    return out, mask, _nonfinite_rows(X)


def rlr(G: Tensor, weights: Optional[Tensor], theta: int, server_lr: float, rows: Optional[Tensor] = None
        ) -> Tensors2:
    X = _selected(G, rows, "rlr")
    weights = checks.rlr_args(G, weights, theta, server_lr, X.shape[0])
    return reference.rlr(X, theta, weights, server_lr), _nonfinite_rows(X)


def client_stats(G: Tensor, window_start: int, window_length: int, ref: Optional[Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ref = checks.client_stats_ref(G, window_start, window_length, ref)
    stats = reference.client_stats(G, (window_start, window_length), ref)
    if ref is None:   # three empty tensors, not one three times: a custom op's outputs may not alias
        dot, ref_norm, ref_dist = (stats.norm.new_empty(0) for _ in range(3))
    else:
        dot, ref_norm, ref_dist = stats.dot, stats.ref_norm.reshape(1), stats.ref_dist
    return stats.norm, stats.sign_frac, dot, ref_norm, ref_dist, _nonfinite_rows(G)


def clip_rows(G: Tensor, max_norm: Tensor) -> Tensors2:
    return reference.clip_rows(G, checks.clip_bound(max_norm, G)), _nonfinite_rows(G)


def _vector_nonfinite(x: Tensor) -> Tensor:
    return (~torch.isfinite(x).all()).reshape(1)


def topk_ef_step(u: Tensor, error: Tensor, momentum: Tensor, k: int, rho: float) -> Tensors3:
    checks.check_topk_ef_step(u, error, momentum, k, rho)
    bad = _vector_nonfinite(u)
    if bad.item():
        return u.new_empty(0, dtype=torch.int64), u.new_empty(0), bad
    idx, values = reference.topk_ef_step(u, error, momentum, k, rho)
    return idx, values, bad


def topk_abs(x: Tensor, k: int) -> Tensors3:
    checks.check_k(k, "topk_abs")
    idx, values = reference.topk_abs(x, k)
    return idx, values, _vector_nonfinite(x)


def maxpool_amplify(G: Tensor, segments: list[int], kernel: int, restore: bool, out_width: int) -> Tensors2:
    table = checks.segment_table(segments, G.shape[1], kernel, restore, out_width)
    pieces = [Segment(None, offset, rows * cols, rows, cols, bool(pooled)) for offset, rows, cols, pooled, _ in table]
    return reference.maxpool_segments(G, pieces, kernel, restore), _nonfinite_rows(G)


def pairwise_sqdist(G: Tensor) -> Tensors2:
    return reference.pairwise_sqdist(G), _nonfinite_rows(G)


def pairwise_cosine(G: Tensor) -> Tensors2:
    return reference.pairwise_cosine(G), _nonfinite_rows(G)
