"""Fake (meta) implementations of the robustagg ops, for torch.compile and opcheck."""
from __future__ import annotations

import torch


def _rows_flag(G):
    return G.new_empty(G.shape[0], dtype=torch.bool)


@torch.library.register_fake("robustagg::sign_sum")
def _sign_sum(G):
    return G.new_empty(G.shape[1], dtype=torch.int32), _rows_flag(G)


@torch.library.register_fake("robustagg::order_mean")
def _order_mean(G, lo, hi):
    return G.new_empty(G.shape[1]), _rows_flag(G)


@torch.library.register_fake("robustagg::invariant")
def _invariant(G, lo, hi, min_votes):
    return G.new_empty(G.shape[1]), G.new_empty(G.shape[1], dtype=torch.bool), _rows_flag(G)


@torch.library.register_fake("robustagg::rlr")
def _rlr(G, weights, theta, server_lr):
    return G.new_empty(G.shape[1]), _rows_flag(G)


@torch.library.register_fake("robustagg::client_stats")
def _client_stats(G, window_start, window_length, ref):
    n, f64 = G.shape[0], torch.float64
    with_ref = 0 if ref is None else 1
    return (G.new_empty(n, dtype=f64), G.new_empty(n, 3, dtype=f64), G.new_empty(n * with_ref, dtype=f64),
            G.new_empty(with_ref, dtype=f64), G.new_empty(n * with_ref, dtype=f64), _rows_flag(G))


@torch.library.register_fake("robustagg::clip_rows")
def _clip_rows(G, max_norm):
    return torch.empty_like(G), _rows_flag(G)


@torch.library.register_fake("robustagg::topk_ef_step")
def _topk_ef_step(u, error, momentum, k, rho):
    kk = min(k, u.shape[0])
    return u.new_empty(kk, dtype=torch.int64), u.new_empty(kk), u.new_empty(1, dtype=torch.bool)


@torch.library.register_fake("robustagg::topk_abs")
def _topk_abs(x, k):
    kk = min(k, x.shape[0])
    return x.new_empty(kk, dtype=torch.int64), x.new_empty(kk), x.new_empty(1, dtype=torch.bool)


@torch.library.register_fake("robustagg::maxpool_amplify")
def _maxpool_amplify(G, segments, kernel, restore, out_width):
    return G.new_empty(G.shape[0], out_width), _rows_flag(G)


@torch.library.register_fake("robustagg::pairwise_sqdist")
def _pairwise_sqdist(G):
    return G.new_empty(G.shape[0], G.shape[0], dtype=torch.float64), _rows_flag(G)


@torch.library.register_fake("robustagg::pairwise_cosine")
def _pairwise_cosine(G):
    return G.new_empty(G.shape[0], G.shape[0], dtype=torch.float64), _rows_flag(G)
