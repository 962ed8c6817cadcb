"""Sign votes: sign_sum, sign_agreement and rlr, each backend next to the torch reference."""
import pytest

from .conftest import implementations
from robustagg import ops, reference


@pytest.mark.parametrize("impl", implementations("sign_sum"))
def test_sign_sum(bench_op, G, impl):
    bench_op("sign_sum", impl, lambda backend: ops.sign_sum(G, backend=backend), lambda: reference.sign_sum(G))


@pytest.mark.parametrize("impl", implementations("sign_sum"))
def test_sign_agreement(bench_op, G, impl):
    bench_op("sign_agreement", impl, lambda backend: ops.sign_agreement(G, backend=backend),
             lambda: reference.sign_agreement(G))


@pytest.mark.parametrize("impl", implementations("rlr"))
def test_rlr(bench_op, G, impl):
    theta = G.shape[0] // 2   # RobustLR's vote threshold, as in robustagg/bench/cases.py
    bench_op("rlr", impl, lambda backend: ops.rlr(G, theta, backend=backend), lambda: reference.rlr(G, theta))
