"""The registered ops trace under torch.compile with no graph break (fake implementations, docs/backends.md)."""
import pytest
import torch

from robustagg import _backend
from robustagg.layout import Layout

from conftest import DEVICE

_KEY = "CUDA" if DEVICE.type == "cuda" else "CPU"


def _calls():
    G = torch.randn(7, 40, device=DEVICE)
    u = torch.randn(40, device=DEVICE)
    table = Layout.from_shapes([(4, 5), (20,)]).segment_table(40, 2, False).to(DEVICE)
    rob = torch.ops.robustagg
    return {
        "sign_sum": lambda: rob.sign_sum(G),
        "order_mean": lambda: rob.order_mean(G, 1, 6),
        "invariant": lambda: rob.invariant(G, 1, 6, 4),
        "rlr": lambda: rob.rlr(G, None, 3, 1.0),
        "client_stats": lambda: rob.client_stats(G, 3, 10, u),
        "clip_rows": lambda: rob.clip_rows(G, torch.ones(7, device=DEVICE)),
        "topk_abs": lambda: rob.topk_abs(u, 5),
        "maxpool_amplify": lambda: rob.maxpool_amplify(G, table, 2, False, 24),
        "pairwise_sqdist": lambda: rob.pairwise_sqdist(G),
        "pairwise_cosine": lambda: rob.pairwise_cosine(G),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_op_compiles_without_graph_break(op):
    if not _backend._has_native_kernel(op, _KEY):
        pytest.skip(f"no {_KEY} kernel for {op} in this build")
    call = _calls()[op]
    eager = call()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")()
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
