"""Pairwise geometry: pairwise_sqdist and pairwise_cosine, each backend next to the torch reference."""
import pytest

from .conftest import implementations
from robustagg import ops, reference


@pytest.mark.parametrize("impl", implementations("pairwise_sqdist"))
def test_pairwise_sqdist(bench_op, G, impl):
    bench_op("pairwise_sqdist", impl, lambda backend: ops.pairwise_sqdist(G, backend=backend),
             lambda: reference.pairwise_sqdist(G))


@pytest.mark.parametrize("impl", implementations("pairwise_cosine"))
def test_pairwise_cosine(bench_op, G, impl):
    bench_op("pairwise_cosine", impl, lambda backend: ops.pairwise_cosine(G, backend=backend),
             lambda: reference.pairwise_cosine(G))
