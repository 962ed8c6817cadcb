"""Top-k: topk_abs and SparseFed's topk_ef_step, k = 1% of d, each backend next to the torch reference."""
import pytest
import torch

from .conftest import implementations
from robustagg import ops, reference


def _k(d):
    return max(1, d // 100)


@pytest.mark.parametrize("impl", implementations("topk_abs"))
def test_topk_abs(bench_op, G, impl):
    x, k = G[2], _k(G.shape[1])
    bench_op("topk_abs", impl, lambda backend: ops.topk_abs(x, k, backend=backend), lambda: reference.topk_abs(x, k))


@pytest.mark.parametrize("impl", implementations("topk_ef_step"))
def test_topk_ef_step(bench_op, G, impl):
    u, k = G[1], _k(G.shape[1])
    error, momentum = torch.empty_like(u), torch.empty_like(u)

    def fresh_state():
        # the step updates error and momentum in place: every round starts from zero state
        error.zero_()
        momentum.zero_()

    bench_op("topk_ef_step", impl, lambda backend: ops.topk_ef_step(u, error, momentum, k, 0.9, backend=backend),
             lambda: reference.topk_ef_step(u, error, momentum, k, 0.9), setup=fresh_state)
