"""What the benchmark times: every op of ``robustagg.ops`` on real model sizes, and the aggregators.

A case names a raw op (for backend availability), builds a thunk for a backend, and says how
many bytes the op must read at least and how many of a new output matrix it must write: its
memory floor (robustagg/bench/timing.py). The baseline of every case is
``robustagg.reference`` (what people write today with torch); a few cases add the baseline an
issue names (``G @ G.T`` for pairwise distances).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops, reference
from ..layout import Layout


@dataclass
class Case:
    name: str
    op: str | None                          # raw op deciding backend availability; None: aggregator
    run: Callable[[str], Callable[[], object]]  # backend ("reference" or a backend name) -> thunk
    bytes_read: int                         # the least bytes the op reads (small vector outputs included)
    fresh_bytes: int = 0                    # bytes of a newly allocated output matrix it writes
    extra_baselines: dict[str, Callable[[], object]] | None = None


def _elem(G):
    return G.element_size()


def op_cases(G: torch.Tensor, layout: Layout) -> list[Case]:
    n, d = G.shape
    g_bytes = G.numel() * _elem(G)
    vec = d * _elem(G)
    trim = 5 if n > 10 else (n - 1) // 4
    theta = n // 2
    window = (d // 3, d // 10)
    ref = G[0].clone()
    k = max(1, d // 100)
    state = {}

    def on(backend, fn_ops, fn_ref):
        return fn_ref if backend == "reference" else (lambda: fn_ops(backend))

    def topk_thunk(backend):
        error, momentum = state.setdefault(backend, (torch.zeros_like(G[0]), torch.zeros_like(G[0])))
        if backend == "reference":
            return lambda: reference.topk_ef_step(G[1], error, momentum, k, 0.9)
        return lambda: ops.topk_ef_step(G[1], error, momentum, k, 0.9, backend=backend)

    pooled = layout.pooled_width(d, 2) * n * _elem(G)
    return [
        Case("sign_sum", "sign_sum",
             lambda b: on(b, lambda be: ops.sign_sum(G, backend=be), lambda: reference.sign_sum(G)),
             g_bytes + 4 * d),
        Case(f"trimmed_mean(trim={trim})", "order_mean",
             lambda b: on(b, lambda be: ops.trimmed_mean(G, trim, backend=be), lambda: reference.trimmed_mean(G, trim)),
             g_bytes + vec),
        Case("median", "order_mean",
             lambda b: on(b, lambda be: ops.median(G, backend=be), lambda: reference.median(G)),
             g_bytes + vec),
        Case(f"closest_to_median_mean(beta={n - 2 * trim})", "closest_to_median_mean",
             lambda b: on(b, lambda be: ops.closest_to_median_mean(G, n - 2 * trim, backend=be),
                          lambda: reference.closest_to_median_mean(G, n - 2 * trim)),
             g_bytes + vec),
        Case(f"invariant(tau=0.6, trim={trim})", "invariant",
             lambda b: on(b, lambda be: ops.invariant(G, 0.6, trim, backend=be), lambda: reference.invariant(G, 0.6, trim)),
             g_bytes + vec),
        Case(f"rlr(theta={theta})", "rlr",
             lambda b: on(b, lambda be: ops.rlr(G, theta, backend=be), lambda: reference.rlr(G, theta)),
             g_bytes + vec),
        Case("client_stats(10% window, ref)", "client_stats",
             lambda b: on(b, lambda be: ops.client_stats(G, window, ref, backend=be),
                          lambda: reference.client_stats(G, window, ref)),
             g_bytes + vec),
        Case("clip_rows", "clip_rows",
             lambda b: on(b, lambda be: ops.clip_rows(G, 1.0, backend=be), lambda: reference.clip_rows(G, 1.0)),
             2 * g_bytes, fresh_bytes=g_bytes),   # the norms, then the scaled copy
        Case("topk_ef_step(k=1%)", "topk_ef_step", topk_thunk, 5 * vec),
        Case("topk_abs(k=1%)", "topk_abs",
             lambda b: on(b, lambda be: ops.topk_abs(G[2], k, backend=be), lambda: reference.topk_abs(G[2], k)),
             vec),
        Case("maxpool_amplify(kernel=2)", "maxpool_amplify",
             lambda b: on(b, lambda be: ops.maxpool_amplify(G, layout, 2, backend=be),
                          lambda: reference.maxpool_amplify(G, layout, 2)),
             g_bytes, fresh_bytes=pooled),
        Case("pairwise_sqdist", "pairwise_sqdist",
             lambda b: on(b, lambda be: ops.pairwise_sqdist(G, backend=be), lambda: reference.pairwise_sqdist(G)),
             g_bytes, extra_baselines={"G @ G.T": lambda: G @ G.T}),
        Case("pairwise_cosine", "pairwise_cosine",
             lambda b: on(b, lambda be: ops.pairwise_cosine(G, backend=be), lambda: reference.pairwise_cosine(G)),
             g_bytes),
    ]
