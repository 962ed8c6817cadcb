"""Order statistics: trimmed_mean, median, invariant and closest_to_median_mean, each backend next
to the torch reference, with robustagg/bench/cases.py's arguments (trim 5, tau 0.6, beta n - 10)."""
import pytest

from .conftest import implementations
from robustagg import ops, reference


def _trim(n):
    return 5 if n > 10 else (n - 1) // 4


@pytest.mark.parametrize("impl", implementations("order_mean"))
def test_trimmed_mean(bench_op, G, impl):
    trim = _trim(G.shape[0])
    bench_op("trimmed_mean", impl, lambda backend: ops.trimmed_mean(G, trim, backend=backend),
             lambda: reference.trimmed_mean(G, trim))


@pytest.mark.parametrize("impl", implementations("order_mean"))
def test_median(bench_op, G, impl):
    bench_op("median", impl, lambda backend: ops.median(G, backend=backend), lambda: reference.median(G))


@pytest.mark.parametrize("impl", implementations("invariant"))
def test_invariant(bench_op, G, impl):
    trim = _trim(G.shape[0])
    bench_op("invariant", impl, lambda backend: ops.invariant(G, 0.6, trim, backend=backend),
             lambda: reference.invariant(G, 0.6, trim))


@pytest.mark.parametrize("impl", implementations("closest_to_median_mean"))
def test_closest_to_median_mean(bench_op, G, impl):
    beta = G.shape[0] - 2 * _trim(G.shape[0])
    bench_op("closest_to_median_mean", impl, lambda backend: ops.closest_to_median_mean(G, beta, backend=backend),
             lambda: reference.closest_to_median_mean(G, beta))
