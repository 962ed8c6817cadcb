"""Shared test fixtures: the device, the backends that can run on it, and the tolerance table."""
import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU (CI). The variable
# must be set before triton.jit decorates anything, so before robustagg imports its kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import robustagg  # noqa: E402
from robustagg import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# One tolerance table for every op (FlagGems' RESOLUTION): (atol, rtol) against a float64
# reference computed from the same (rounded) inputs.
RESOLUTION = {
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


def to_reference(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float64 on the CPU, as references are computed."""
    return x.detach().to("cpu", torch.float64)


def assert_close(actual, expected, dtype, scale=1.0):
    """Compare with the tolerance of ``dtype`` (the input dtype), ``scale`` widening atol."""
    atol, rtol = RESOLUTION[dtype]
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               atol=atol * scale, rtol=rtol, equal_nan=True)


# Rows poisoned by a malicious client: (row, value) pairs for with_bad_rows.
BAD = [(1, float("nan")), (4, float("inf")), (6, float("-inf"))]


def with_bad_rows(G, rows_values=BAD):
    """A copy of G with one non-finite entry in each listed row."""
    G = G.clone()
    for row, value in rows_values:
        G[row, row % G.shape[1]] = value
    return G


def backends_for(op: str):
    """pytest params: every backend; those that cannot run ``op`` on DEVICE are skipped with the reason."""
    params = []
    for name in _backend.BACKENDS:
        reason = _backend._unavailable_reason(name, op, DEVICE)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def device():
    return DEVICE
