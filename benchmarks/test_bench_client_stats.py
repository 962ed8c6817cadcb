"""Per-client statistics: client_stats (a 10% sign window and a reference update) and clip_rows,
each backend next to the torch reference."""
import pytest

from .conftest import implementations
from robustagg import ops, reference


def _compared(stats):
    # the fields ops.ClientStats shares with reference.ClientStatsRef
    return stats.norm, stats.sign_frac, stats.dot, stats.ref_norm, stats.ref_dist


@pytest.mark.parametrize("impl", implementations("client_stats"))
def test_client_stats(bench_op, G, impl):
    d = G.shape[1]
    window, ref = (d // 3, d // 10), G[0].clone()
    bench_op("client_stats", impl, lambda backend: ops.client_stats(G, window, ref, backend=backend),
             lambda: reference.client_stats(G, window, ref), view=_compared)


@pytest.mark.parametrize("impl", implementations("clip_rows"))
def test_clip_rows(bench_op, G, impl):
    bench_op("clip_rows", impl, lambda backend: ops.clip_rows(G, 1.0, backend=backend),
             lambda: reference.clip_rows(G, 1.0))
