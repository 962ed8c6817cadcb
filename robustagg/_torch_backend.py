"""The ``torch`` backend: the reference ops behind the raw signatures of csrc/ops.cpp.

Each function returns what the compiled kernels return, including the ``nonfinite`` row flags.
"""
from __future__ import annotations

import torch

from . import reference as ref
from .layout import Segment


def _nonfinite_rows(G: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(G).all(dim=1)


def sign_sum(G):
    return ref.sign_sum(G), _nonfinite_rows(G)


def order_mean(G, lo, hi):
    return ref.order_mean(G, lo, hi), _nonfinite_rows(G)


def invariant(G, lo, hi, min_votes):
    mask = ref.sign_sum(G).abs() >= min_votes
    out = torch.where(mask, ref.order_mean(G, lo, hi), torch.zeros((), dtype=G.dtype, device=G.device))
    return out, mask, _nonfinite_rows(G)


def rlr(G, weights, theta, server_lr):
    return ref.rlr(G, theta, weights, server_lr), _nonfinite_rows(G)


def client_stats(G, window_start, window_length, ref_vec):
    stats = ref.client_stats(G, (window_start, window_length), ref_vec)
    empty = stats.norm.new_empty(0)
    dot = empty if stats.dot is None else stats.dot
    ref_norm = empty if stats.ref_norm is None else stats.ref_norm.reshape(1)
    ref_dist = empty if stats.ref_dist is None else stats.ref_dist
    return stats.norm, stats.sign_frac, dot, ref_norm, ref_dist, _nonfinite_rows(G)


def clip_rows(G, max_norm):
    return ref.clip_rows(G, max_norm), _nonfinite_rows(G)


def _vector_nonfinite(x):
    return (~torch.isfinite(x).all()).reshape(1)


def topk_ef_step(u, error, momentum, k, rho):
    bad = _vector_nonfinite(u)
    if bad.item():
        return u.new_empty(0, dtype=torch.int64), u.new_empty(0), bad
    idx, values = ref.topk_ef_step(u, error, momentum, k, rho)
    return idx, values, bad


def topk_abs(x, k):
    idx, values = ref.topk_abs(x, k)
    return idx, values, _vector_nonfinite(x)


class _TableLayout:
    """Adapts the kernels' int64 segment table to reference.maxpool_amplify's layout argument."""

    def __init__(self, table):
        self.segments = [Segment(None, int(o), int(r) * int(c), int(r), int(c), bool(p))
                         for o, r, c, p, _ in table.tolist()]

    def segments_for(self, d):
        return self.segments


def maxpool_amplify(G, segments, kernel, restore, out_width):
    return ref.maxpool_amplify(G, _TableLayout(segments), kernel, restore), _nonfinite_rows(G)


def pairwise_sqdist(G):
    return ref.pairwise_sqdist(G), _nonfinite_rows(G)


def pairwise_cosine(G):
    return ref.pairwise_cosine(G), _nonfinite_rows(G)
