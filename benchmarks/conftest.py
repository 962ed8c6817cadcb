"""Shared pieces of the pytest-benchmark suites (docs/backends.md, "Benchmark").

Each ``test_bench_<family>.py`` times every op of one family on each robustagg backend that can
run it here, next to ``"torch-ref"``, the plain ``robustagg.reference`` function people write
today; ``benchmark.group = "<op> n=<n>"`` puts them in one table under
``--benchmark-group-by=group``. The default size is small enough for CI to run each benchmark
once (``--benchmark-disable``), and then every output is also compared with the other side: a
backend with the reference, the reference with the automatic backend. ``--bench-full`` switches
to the size of a real model.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import pytest
import torch

from robustagg import _backend
from robustagg.bench.models import EXPECTED_D, model_layout
from robustagg.layout import Layout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

REFERENCE = "torch-ref"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}

# (atol, rtol) between a backend and the reference on the same input (tests/conftest.py's table)
RESOLUTION = {
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


@dataclass(frozen=True)
class Size:
    clients: tuple[int, ...]
    d: int
    layout: Layout   # the per-parameter layout maxpool_amplify pools over
    name: str


@functools.cache
def smoke_size() -> Size:
    return Size((20,), 2 ** 16, Layout.flat(256), "smoke")


@functools.cache
def full_size() -> Size:
    return Size((20, 50), EXPECTED_D["resnet18-cifar"], model_layout("resnet18-cifar"), "resnet18-cifar")


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="benchmark at the size of ResNet-18 on CIFAR (n in 20, 50; d = 11,173,962) "
                          "instead of the smoke size (n = 20, d = 2**16)")
    parser.addoption("--bench-dtype", default="float32", choices=sorted(DTYPES),
                     help="dtype of the benchmarked updates G (default float32)")


def _size(config) -> Size:
    return full_size() if config.getoption("--bench-full") else smoke_size()


def pytest_report_header(config):
    size = _size(config)
    return (f"robustagg benchmarks: {size.name}, n in {size.clients}, d = {size.d:,}, "
            f"{config.getoption('--bench-dtype')} on {DEVICE}")


def pytest_generate_tests(metafunc):
    # session scope: the tests are ordered by n, so that one G per n is alive at a time
    if "n" in metafunc.fixturenames:
        metafunc.parametrize("n", _size(metafunc.config).clients, scope="session", ids=lambda n: f"n={n}")


def implementations(op: str) -> list[str]:
    """pytest params: each backend that can run the raw ``op`` on DEVICE, then the torch reference.

    The Triton interpreter is a testing tool, not a speed one, so triton is left out on CPU.
    """
    backends = [name for name in _backend.BACKENDS
                if not (name == "triton" and DEVICE.type == "cpu")
                and _backend._unavailable_reason(name, op, DEVICE) is None]
    return [*backends, REFERENCE]


@pytest.fixture(scope="session")
def size(pytestconfig) -> Size:
    return _size(pytestconfig)


@pytest.fixture(scope="session")
def dtype(pytestconfig) -> torch.dtype:
    return DTYPES[pytestconfig.getoption("--bench-dtype")]


@pytest.fixture(scope="session")
def G(n, size, dtype) -> torch.Tensor:
    """n client updates of length d, standard normal, built once per (n, d, dtype)."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.randn(n, size.d, generator=generator, device=DEVICE, dtype=torch.float32).to(dtype)


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()   # a kernel launch returns before the kernel has run
        return out

    return run


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _pedantic_rounds(config, fn, setup) -> int:
    """pytest-benchmark's own rule, rounds = max(min_rounds, max_time / one call), from the fastest
    of three calls (on a shared machine one call can take 100 times longer)."""
    calls = []
    for _ in range(3):
        setup()
        start = time.perf_counter()
        fn()
        calls.append(time.perf_counter() - start)
    once = max(min(calls), 1e-9)
    max_time = float(config.getoption("benchmark_max_time"))   # the option holds a string
    return max(config.getoption("benchmark_min_rounds"), min(math.ceil(max_time / once), 10_000))


def _measure(benchmark, config, fn, setup):
    """fn's output, timed by pytest-benchmark (run once under --benchmark-disable)."""
    if setup is None:
        return benchmark(fn)
    if benchmark.disabled:
        return benchmark.pedantic(fn, setup=setup)
    return benchmark.pedantic(fn, setup=setup, rounds=_pedantic_rounds(config, fn, setup))


def _assert_agree(actual, expected, dtype):
    atol, rtol = RESOLUTION[dtype]
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)


@pytest.fixture
def bench_op(benchmark, pytestconfig, G):
    """``bench_op(op, impl, call, reference_call, view=..., setup=...)`` times one implementation.

    ``call(backend)`` runs the robustagg op, ``reference_call()`` the torch reference. ``view``
    picks the tensors to compare from an output (default: the tensor, or the tuple's items).
    ``setup`` resets the state a stateful op mutates; it runs before every round, untimed.
    Under --benchmark-disable the output is compared with the other side's.
    """
    def run(op, impl, call, reference_call, *, view=_tensors, setup=None):
        n, d = G.shape
        benchmark.group = f"{op} n={n}"
        benchmark.extra_info.update(op=op, impl=impl, n=n, d=d, dtype=str(G.dtype).removeprefix("torch."))
        fn = reference_call if impl == REFERENCE else lambda: call(impl)
        out = _measure(benchmark, pytestconfig, _synchronized(fn), setup)
        if benchmark.disabled:
            if setup is not None:
                setup()
            expected = call(None) if impl == REFERENCE else reference_call()
            _assert_agree(view(out), view(expected), G.dtype)

    return run
