"""The CUDA C++ kernels (csrc/cuda/*.cu) executed on the CPU, against the CPU backend and the
references (issue 5). No GPU and no CUDA toolkit needed: only g++.

How: tests/cuda_emu/build.py copies every .cu, rewrites its ``<<<...>>>`` launches into calls of
the emulator runtime and compiles it with g++ against shim CUDA headers, together with a harness
that calls the real launchers of csrc/cuda/launch.h the way csrc/cuda/bindings.cpp does (same
workspaces, derived values, stream). The runtime (tests/cuda_emu/runtime.cpp) runs each launch
block by block, every CUDA thread a fiber; __syncthreads and the warp intrinsics wait for their
partners like the hardware, and a deadlock, a divergent barrier, a shuffle reading an absent lane,
a launch beyond the kernel's __launch_bounds__ or on another stream stops the launch with an
error naming the kernel, block and thread.

Every op runs under two fiber schedules (threads and blocks resumed in ascending order with all
warps in lockstep, then in descending order with each warp running ahead through its own warp
collectives; a few cases also under seeded shuffles) and must give the same bits under each, so a
missing __syncthreads/__syncwarp shows up as a difference. Expectations, as in
tests/test_cuda_parity.py (the GPU version of these tests):

* sign_sum, order_mean, invariant, rlr in float32: bitwise equal to the CPU backend, also where
  a sum of huge finite values overflows and is redone (issue 10, docs/nonfinite.md);
* top-k and max-pool: the same selection and bits as the CPU backend (saturated top-k state too);
* everything else: within conftest.RESOLUTION of robustagg.reference on float64 inputs; float64
  statistics of 1e200 and 1e-200 rows relatively (atol 0), as they sit far below every atol;
* non-finite row flags equal to the CPU backend's;
* the coordinate-wise ops on a row selection (`rows`): bit for bit the same emulated op on the
  gathered copy G.index_select(0, rows), flags included, on every kernel path.

Shared memory (static and dynamic) and workspaces start every block as garbage bytes, as on a
GPU, so reading what no thread wrote shows up too. Two sanitizer builds of the same kernels run
in child processes with the sanitizer runtime preloaded (skipped with the reason where g++ lacks
it): AddressSanitizer stands in for compute-sanitizer memcheck (test_asan_memcheck_of_every_op:
every op test of this module, one schedule) and ThreadSanitizer, with every CUDA thread a TSan
fiber, for racecheck (test_tsan_racecheck_of_every_op: every op once); each also has self-tests
showing that it catches what it should.

What the emulator cannot see: timing; races between blocks (they run one after another here,
although descending and shuffled block orders change any result that depends on their order);
memory-model effects such as a stale __ldg of data written in the same kernel. Grid-stride loops
are exercised where the grid cap is reachable with a few million threads (sign votes, register
order statistics, max-pool, clip_rows, direct pairwise distances), not in the shared-memory order
statistics or the pairwise Gram kernels.

tests/cuda_emu/mutate.py checks this suite against deliberately broken copies of the kernels.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustagg  # noqa: F401  (registers torch.ops.robustagg)
import robustagg.layout
from robustagg import ops, reference
from robustagg._registry import RAW_OPS
from conftest import BAD, RESOLUTION, with_bad_rows
from cuda_emu import build, library
from cuda_emu.library import ASCENDING, DESCENDING, SHUFFLED, WARP_EAGER, EmulatorError

pytestmark = pytest.mark.skipif(build.compiler() is None,
                                reason="g++ not found: the CUDA kernels cannot be emulated on this machine")

# "address" or "thread": set (with the sanitizer's runtime preloaded) by the sanitizer tests at the
# end of this module for their run of it on that build.
SANITIZER = os.environ.get("ROBUSTAGG_EMU_SANITIZER") or None

CPU = torch.ops.robustagg
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


# Kernel sources: csrc, or a broken copy of it (tests/cuda_emu/mutate.py).
CSRC = Path(os.environ.get("ROBUSTAGG_EMU_CSRC") or build.CSRC)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The emulator library, built once per session (ROBUSTAGG_EMU_CACHE: a directory to keep it in)."""
    cache = os.environ.get("ROBUSTAGG_EMU_CACHE")
    out = Path(cache) if cache else tmp_path_factory.mktemp("cuda_emu")
    out.mkdir(parents=True, exist_ok=True)
    return library.Emulator(build.build(out, sanitizer=SANITIZER, csrc=CSRC))


# ---------------------------------------------------------------- helpers

def awkward(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """(n, d) with exact ties, both zeros, subnormals and +-3e38 outliers (clamped to the dtype)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g)
    pick = torch.rand(n, d, generator=g)
    G = torch.where(pick < 0.15, G.round(), G)
    G = torch.where((pick >= 0.15) & (pick < 0.2), torch.zeros(()), G)
    G = torch.where((pick >= 0.2) & (pick < 0.25), torch.full((), -0.0), G)
    G = torch.where((pick >= 0.25) & (pick < 0.27), torch.full((), 1e-40), G)
    G = torch.where((pick >= 0.27) & (pick < 0.28), torch.full((), -3e38), G)
    G = torch.where((pick >= 0.28) & (pick < 0.29), torch.full((), 3e38), G)
    if dtype == torch.float16:
        G = G.clamp(-6e4, 6e4)
    return G.to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: same bits (signed zeros included), or NaN on both sides."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype in _BITS:
        return (a.view(_BITS[a.dtype]) == b.view(_BITS[a.dtype])) | (torch.isnan(a) & torch.isnan(b))
    return a == b


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = ""):
    same = bits_equal(actual, expected)
    where = (~same).nonzero()[:8].tolist()
    assert bool(same.all()), (f"{what} differs at {where}: {actual[~same][:8].tolist()} vs "
                              f"{expected[~same][:8].tolist()}")


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = RESOLUTION[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_relative(actual, expected, rtol=RESOLUTION[torch.float64][1], what=""):
    """Relative agreement only: float64 statistics of 1e-200 rows (or 5e-324) sit far below every atol
    of RESOLUTION, which would pass anything. Infinities must match; an exact 0 must be 0."""
    torch.testing.assert_close(actual.double(), expected.double(), atol=0.0, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# The AddressSanitizer run (test_asan_memcheck_of_every_op) keeps one schedule to bound its time.
ONE_SCHEDULE = os.environ.get("ROBUSTAGG_EMU_SCHEDULES") == "ascending"


# Default: ascending lockstep, then descending with each warp running ahead (runtime.cpp).
SCHEDULES = (ASCENDING, DESCENDING | WARP_EAGER)
ALL_SCHEDULES = (ASCENDING, DESCENDING, SHUFFLED, ASCENDING | WARP_EAGER, DESCENDING | WARP_EAGER,
                 SHUFFLED | WARP_EAGER)


def emulated(emu, op: str, *args, schedules=SCHEDULES, seed=1234):
    """Runs the emulated op under each schedule on fresh copies of the tensor arguments; all runs
    must agree bit for bit (tensors updated in place included). Returns the outputs and the
    tensor arguments of the first run."""
    first = None
    for schedule in schedules[:1] if ONE_SCHEDULE else schedules:
        emu.schedule(schedule, seed=seed)
        call_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        outputs = getattr(emu, op)(*call_args)
        state = [a for a in call_args if isinstance(a, torch.Tensor)]
        if first is None:
            first = (outputs, call_args)
            first_state = state
            continue
        for i, (a, b) in enumerate(zip(outputs, first[0])):
            assert_bitwise(a, b, f"{op} output {i} under schedule {schedule} vs {schedules[0]}")
        for i, (a, b) in enumerate(zip(state, first_state)):
            assert_bitwise(a, b, f"{op} in-place argument {i} under schedule {schedule} vs {schedules[0]}")
    return first


def emulate(emu, op, *args, schedules=SCHEDULES):
    return emulated(emu, op, *args, schedules=schedules)[0]


def finite_columns(G: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(G.double()).all(dim=0)


# ---------------------------------------------------------------- the emulator itself

@pytest.mark.parametrize("config, expected", [
    (((1, 1, 1), (1025, 1, 1), 0), 9),      # more than 1024 threads
    (((1, 1, 1), (1, 1, 65), 0), 9),        # block.z > 64
    (((1, 1, 1), (32, 33, 1), 0), 9),       # 1056 threads
    (((1, 65536, 1), (32, 1, 1), 0), 9),    # grid.y > 65535
    (((1, 1, 65536), (32, 1, 1), 0), 9),    # grid.z > 65535
    (((0, 1, 1), (32, 1, 1), 0), 9),        # empty grid
    (((1, 1, 1), (32, 1, 1), 48 * 1024 + 1), 1),  # dynamic shared memory beyond 48 KiB without opt-in
    (((2, 3, 1), (32, 2, 1), 0), 0),
], ids=["block1025", "blockz65", "block32x33", "gridy65536", "gridz65536", "grid0", "smem48k+1", "valid"])
def test_emulator_checks_launch_configurations_like_the_hardware(emu, config, expected):
    (gx, gy, gz), (bx, by, bz), shared = config
    out = torch.zeros(1, dtype=torch.int32)
    code = emu.lib.emu_selftest_launch(gx, gy, gz, bx, by, bz, shared, 0, out.data_ptr())
    assert code == expected, emu.lib.emu_last_message()
    assert out.item() == (1 if expected == 0 else 0)  # a failed launch runs nothing


def test_emulator_dynamic_shared_memory_opt_in(emu):
    out = torch.zeros(1, dtype=torch.int32)
    assert emu.lib.emu_selftest_launch(1, 1, 1, 32, 1, 1, 96 * 1024, 96 * 1024, out.data_ptr()) == 0
    assert out.item() == 1
    # beyond sm_90's 227 KiB the attribute itself is refused
    assert emu.lib.emu_selftest_launch(1, 1, 1, 32, 1, 1, 0, 228 * 1024, out.data_ptr()) == 1


def test_emulator_schedules_expose_a_missing_syncthreads(emu):
    results = {}
    for barrier in (True, False):
        for schedule in (ASCENDING, DESCENDING):
            emu.schedule(schedule)
            out = torch.full((64,), -1, dtype=torch.int32)
            emu.call("emu_selftest_neighbour", 1000 * (schedule + 1) + 10 * barrier, int(barrier), out.data_ptr())
            results[barrier, schedule] = out
    right = lambda salt: salt + (torch.arange(64) + 1) % 64  # noqa: E731
    assert torch.equal(results[True, ASCENDING], right(1010).int())
    assert torch.equal(results[True, DESCENDING], right(2010).int())
    # without the barrier, ascending order reads neighbours not yet written (garbage), descending
    # fresh ones except for the wrap-around read of thread 63
    stale, fresh = results[False, ASCENDING], results[False, DESCENDING]
    assert not (stale[:63] == right(1000)[:63]).any()
    assert torch.equal(fresh[:63], right(2000)[:63].int()) and fresh[63] != 2000


def test_emulator_warp_eager_schedule_exposes_a_missing_trailing_barrier(emu):
    def run(barrier, schedule):
        emu.schedule(schedule)
        out = torch.full((128,), -1, dtype=torch.int32)
        emu.call("emu_selftest_rounds", int(barrier), out.data_ptr())
        return out

    t = torch.arange(64)
    expected = torch.cat([((t[:32] % 2 == 0).sum() + 100 * (t[32:] % 3 == 0).sum()).repeat(64),
                          ((t[:32] % 4 == 0).sum() + 100 * (t[32:] % 5 == 0).sum()).repeat(64)]).int()
    for schedule in ALL_SCHEDULES:
        assert torch.equal(run(True, schedule), expected), schedule
    # Lockstep warps cannot see this write-after-read race; a warp running ahead does.
    assert torch.equal(run(False, ASCENDING), expected)
    assert not torch.equal(run(False, ASCENDING | WARP_EAGER), expected)
    assert not torch.equal(run(False, DESCENDING | WARP_EAGER), expected)


def test_emulator_warp_intrinsics_match_the_hardware_semantics(emu):
    out = torch.zeros(64, 8, dtype=torch.int32)
    emu.call("emu_selftest_warp", out.data_ptr())
    lane = torch.arange(64) % 32
    ballot = sum(1 << i for i in range(32) if i % 3 == 0)
    assert (out[:, 0].long() & 0xffffffff).eq(ballot).all()
    assert out[:, 1].eq(sum(range(32))).all()
    assert torch.equal(out[:, 2].long(), lane * (lane + 1) // 2)
    assert torch.equal(out[:, 3].long() & 0xffffffff, (0xF << (4 * (lane // 4))) & 0xffffffff)
    assert torch.equal(out[:, 4].long(), (lane // 8) * 8 + 3)
    assert torch.equal(out[:, 5].long(), torch.where(lane % 16 < 12, lane + 4, lane))
    assert out[:, 6].eq(1).all()  # any(lane == 7), not all(lane < 31)
    assert torch.equal(out[:, 7].long(), torch.where(lane < 31, lane + 1, lane))  # double shuffle, 0.5 truncated


@pytest.mark.parametrize("kind, message", [
    (0, "which has exited"),
    (1, "divergent __syncthreads"),
    (2, "deadlock"),
    (3, "not in the mask"),
    (4, r"__launch_bounds__\(64\)"),
], ids=["syncwarp-exited-lanes", "divergent-barrier", "deadlock", "shuffle-outside-mask", "launch-bounds"])
def test_emulator_stops_on_hazards_with_a_clear_message(emu, kind, message):
    out = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(EmulatorError, match=message) as info:
        emu.call("emu_selftest_hazard", kind, out.data_ptr())
    assert info.value.code == -1 and "block (0,0,0)" in str(info.value)


def test_emulator_rejects_a_launch_on_another_stream(emu):
    out = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(EmulatorError, match="not on the stream the launcher was given"):
        emu.call("emu_selftest_wrong_stream", out.data_ptr())


def test_rewrite_of_launches_shared_memory_and_launch_bounds():
    source = """// a comment about kernel<<<grid, block>>> is left alone
template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(T* x, int n) {
  extern __shared__ unsigned char raw[];
  __shared__ float totals[kWarps][2];
  x[0] = raw[0] + totals[0][0];
}
void launch(float* x, cudaStream_t stream) {
  scale_kernel<float><<<dim3(static_cast<unsigned int>(4), 2),
                        kThreads, 64, stream>>>(x, 3);
}
"""
    out = build.rewrite(source, "example.cu")
    assert out.count("\n") == source.count("\n")  # line numbers are kept
    assert "// a comment about kernel<<<grid, block>>> is left alone" in out
    assert ('::cuda_emu::launcher("scale_kernel<float>", scale_kernel<float>, dim3(static_cast<unsigned int>(4), 2),'
            "\n                        kThreads, 64, stream)(x, 3);") in out
    assert "unsigned char* const raw = static_cast<unsigned char*>(::cuda_emu::dynamic_shared());" in out
    assert "__shared__ float totals[kWarps][2]; ::cuda_emu::fresh_shared(&totals, sizeof(totals));" in out
    assert "T* x, int n) { ::cuda_emu::check_launch_bounds(kThreads);" in out


@pytest.mark.parametrize("source, message", [
    ("void f() { if (ok) kernel<<<1, 32>>>(x); }", "must stand alone on its line"),
    ("void f() {\n  kernel<<<1, 32;\n}", "without its >>>"),
], ids=["launch-inside-expression", "unterminated-launch"])
def test_rewrite_refuses_what_it_does_not_understand(source, message):
    with pytest.raises(build.RewriteError, match=message):
        build.rewrite(source, "example.cu")


def test_half_and_bfloat16_shims_round_like_torch(emu):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 9, (20000,), generator=g),
                   torch.tensor([0.0, -0.0, 1e-40, -1e-45, 65504.0, 65520.0, 65519.99, 3.4e38, -3.4e38,
                                 float("inf"), float("-inf"), float("nan"), 1.00048828125, 1.001953125])])
    # random float bit patterns cover every exponent, including rounding-carry cases
    x = torch.cat([x, torch.randint(-2**31, 2**31 - 1, (20000,), generator=g, dtype=torch.int32).view(torch.float32)])
    for name, dtype in (("emu_float_to_half", torch.float16), ("emu_float_to_bfloat16", torch.bfloat16)):
        out = torch.empty(x.shape, dtype=torch.int16)
        getattr(emu.lib, name)(x.data_ptr(), out.data_ptr(), x.numel())
        assert_bitwise(out.view(dtype), x.to(dtype), name)
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for name, dtype in (("emu_half_to_float", torch.float16), ("emu_bfloat16_to_float", torch.bfloat16)):
        out = torch.empty(every.shape, dtype=torch.float32)
        getattr(emu.lib, name)(every.data_ptr(), out.data_ptr(), every.numel())
        assert_bitwise(out, every.view(dtype).float(), name)


# ---------------------------------------------------------------- sign votes and rlr

SIGN_SHAPES = [(1, 1), (2, 7), (5, 257), (33, 129), (64, 300), (100, 513)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SIGN_SHAPES)
def test_sign_sum_equals_cpu(emu, n, d, dtype):
    G = awkward(n, d, 1, dtype)
    sums, bad = emulate(emu, "sign_sum", G)
    cpu_sums, cpu_bad = CPU.sign_sum(G)
    assert torch.equal(sums, cpu_sums)
    assert torch.equal(sums, reference.sign_sum(G))
    assert torch.equal(bad, cpu_bad) and not bad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_sum_flags_nonfinite_rows(emu, dtype):
    G = with_bad_rows(awkward(8, 300, 2, dtype))
    sums, bad = emulate(emu, "sign_sum", G)
    cpu_sums, cpu_bad = CPU.sign_sum(G)
    assert torch.equal(bad, cpu_bad) and bad.nonzero().flatten().tolist() == [r for r, _ in BAD]
    assert torch.equal(sums, cpu_sums)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 20, 33, 64, 65, 100, 257])
def test_rlr_float32_bitwise_equals_cpu(emu, n):
    G = awkward(n, 1000, 5)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 100 + 1
    theta = n // 2
    out, bad = emulate(emu, "rlr", G, None, theta, 1.0)
    assert_bitwise(out, CPU.rlr(G, None, theta, 1.0)[0], "unweighted rlr")
    out_w, _ = emulate(emu, "rlr", G, weights, theta, 0.3)
    assert_bitwise(out_w, CPU.rlr(G, weights, theta, 0.3)[0], "weighted rlr")
    assert not bad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rlr_other_dtypes_close_to_reference(emu, dtype):
    G = torch.randn(20, 777, generator=torch.Generator().manual_seed(3)).to(dtype)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(4)) + 0.5
    for w, lr in ((None, 1.0), (weights, 0.7)):
        out, _ = emulate(emu, "rlr", G, w, 8, lr)
        expected = reference.rlr(G.double(), 8, None if w is None else w.double(), lr)
        assert_close(out, expected, dtype, f"rlr {dtype}")
        assert_bitwise(out, CPU.rlr(G, w, 8, lr)[0], "rlr vs cpu")


def test_rlr_flags_nonfinite_rows(emu):
    G = with_bad_rows(awkward(7, 100, 6))
    out, bad = emulate(emu, "rlr", G, None, 3, 1.0)
    cpu_out, cpu_bad = CPU.rlr(G, None, 3, 1.0)
    assert torch.equal(bad, cpu_bad) and bad.sum() == len(BAD)
    ok = finite_columns(G)
    assert_bitwise(out[ok], cpu_out[ok], "rlr on finite columns")


# Finite values whose sums overflow the arithmetic type (docs/nonfinite.md): powers of two, so that the sums
# of scaled values are exact and the cancelling column cancels exactly on every path.
HUGE = {torch.float32: 2.0 ** 127, torch.bfloat16: 2.0 ** 127, torch.float64: 2.0 ** 1023}
FINITE_OVERFLOWING = [0, 1, 2, 3]  # the finite columns of overflowing_columns
# Those a float64 reference sums in its own order without an Inf - Inf: torch.sum's pairwise order
# can add +Inf and -Inf partial sums of column 2, which reference.kept_mean does not redo.
WELL_CONDITIONED = [0, 1, 3]


def overflowing_columns(n: int, dtype) -> torch.Tensor:
    """(n, 6), n >= 3: finite columns whose ascending sums overflow, then two that are not finite.
    0: two huge rows, n - 2 zeros; 1: every row huge; 2: half +huge, half -huge; 3: ordinary values;
    4: column 0 with a +Inf in row 2 (a window without the top row leaves it out, and the
    overflowed mean is kept: the column is not finite); 5: column 0 with a NaN in row 2."""
    huge = HUGE[dtype]
    G = torch.zeros(n, 6, dtype=torch.float64)
    G[:2, 0] = huge
    G[:, 1] = huge
    G[: n // 2, 2], G[n // 2:, 2] = huge, -huge
    G[:, 3] = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    G[:, 4], G[:, 5] = G[:, 0], G[:, 0]
    G[2, 4], G[2, 5] = float("inf"), float("nan")
    return G.to(dtype)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rlr_overflowing_weighted_sum_of_finite_rows_is_redone(emu, dtype, weighted):
    # docs/nonfinite.md: where the weighted sum is +-Inf and the column finite, the mean is redone in float64
    # (core's RescuedMean); a column holding Inf keeps the overflowed result. Weights up to 100 make
    # w_i * x_i itself overflow.
    n = 18
    G = overflowing_columns(n, dtype)
    w = torch.linspace(1.0, 100.0, n) if weighted else None
    # Weighted, column 2's products w_i x_i overflow to +Inf and to -Inf, so its sum is NaN, which
    # the CPU kernel (like core's RescuedMean comment and the reference) redoes only when +-Inf:
    # there the bits are the CPU's, but no finiteness is claimed.
    finite = WELL_CONDITIONED if weighted else FINITE_OVERFLOWING
    for theta, lr in ((0, 1.0), (n, 0.5)):  # theta = n: the lr flips on every column
        out, bad = emulate(emu, "rlr", G, w, theta, lr)
        cpu_out, cpu_bad = CPU.rlr(G, w, theta, lr)
        assert_bitwise(out, cpu_out, f"rlr theta={theta}")
        assert torch.equal(bad, cpu_bad)
        assert torch.isfinite(out[finite]).all(), out
        expected = reference.rlr(G[:, WELL_CONDITIONED].double(), theta, None if w is None else w.double(), lr)
        assert_close(out[WELL_CONDITIONED], expected, dtype, f"rlr {dtype} theta={theta}")
    assert torch.isinf(out[4])


# ---------------------------------------------------------------- order statistics

# n <= 64: register networks (every dtype); n <= 128: registers for 16/32-bit data; up to 2048 the
# uploaded pruned network in shared memory (or global scratch when 32 slices do not fit); above, the
# selection path in global scratch.
ORDER_NS = [1, 2, 3, 5, 20, 33, 64, 65, 100, 128, 129, 257, 513]
ORDER_DS = [1, 7, 129, 300]


def windows(n):
    return sorted({(0, n), (0, 1), (n - 1, n), ((n - 1) // 2, n // 2 + 1), (n // 3, max(n // 3 + 1, 2 * n // 3))})


@pytest.mark.parametrize("d", ORDER_DS)
@pytest.mark.parametrize("n", ORDER_NS)
def test_order_mean_float32_bitwise_equals_cpu(emu, n, d):
    G = awkward(n, d, 2)
    for lo, hi in windows(n) if d == 129 else [((n - 1) // 2, n // 2 + 1), ((n - 1) // 4, n - (n - 1) // 4)]:
        out, bad = emulate(emu, "order_mean", G, lo, hi)
        cpu_out, cpu_bad = CPU.order_mean(G, lo, hi)
        assert_bitwise(out, cpu_out, f"order_mean n={n} d={d} lo={lo} hi={hi}")
        assert torch.equal(bad, cpu_bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [3, 20, 64, 100, 257])
def test_order_mean_other_dtypes(emu, n, dtype):
    G = awkward(n, 300, 9).clamp(-6e4, 6e4).to(dtype)
    for lo, hi in (((n - 1) // 2, n // 2 + 1), ((n - 1) // 4, n - (n - 1) // 4)):
        out, _ = emulate(emu, "order_mean", G, lo, hi)
        assert_bitwise(out, CPU.order_mean(G, lo, hi)[0], f"order_mean {dtype} n={n}")
        assert_close(out, reference.order_mean(G.double(), lo, hi), dtype, f"order_mean {dtype} n={n}")


@pytest.mark.parametrize("dtype, n", [(torch.float32, 2100), (torch.float64, 1100), (torch.float64, 2049)],
                         ids=["float32-select-2100", "float64-global-network-1100", "float64-select-2049"])
def test_order_mean_large_n_global_scratch(emu, dtype, n):
    # 32 slices of n values do not fit the shared-memory budget: per-thread slices in the workspace.
    G = awkward(n, 256, 12, dtype)  # a multiple of 128 threads: every slice of the scratch is used
    for lo, hi in (((n - 1) // 2, n // 2 + 1), (n // 10, n - n // 10), (0, n)):
        out, bad = emulate(emu, "order_mean", G, lo, hi)
        assert_bitwise(out, CPU.order_mean(G, lo, hi)[0], f"order_mean n={n} lo={lo} hi={hi}")
        assert not bad.any()


@pytest.mark.parametrize("n", [5, 64, 100, 600])
def test_order_mean_signed_zero_columns_bitwise(emu, n):
    # Columns of only -0 and +0: which zero lands in the kept window decides the sign of the result.
    signs = torch.rand(n, 333, generator=torch.Generator().manual_seed(n)) < 0.5
    G = torch.where(signs, torch.full((), -0.0), torch.zeros(()))
    for lo, hi in ((0, 1), ((n - 1) // 2, n // 2 + 1), (1, n - 1)):
        out, _ = emulate(emu, "order_mean", G, lo, hi)
        assert_bitwise(out, CPU.order_mean(G, lo, hi)[0], f"signed zeros n={n} lo={lo} hi={hi}")


@pytest.mark.parametrize("n", [8, 100])
def test_order_mean_huge_values_do_not_cost_precision(emu, n):
    G = torch.randn(n, 200, generator=torch.Generator().manual_seed(n))
    G[0], G[-1] = 3e38, -3e38
    out, _ = emulate(emu, "order_mean", G, 1, n - 1)
    assert_bitwise(out, CPU.order_mean(G, 1, n - 1)[0])
    assert_close(out, reference.order_mean(G.double(), 1, n - 1), torch.float32, "trimmed outliers")


def test_order_mean_of_two_3e38_rows_and_zeros_is_finite(emu):
    # Issue 10's example: the float32 sum 3e38 + 3e38 of the kept values is Inf; the mean of the
    # 18 rows is 3.33e37, and the median of two 3e38 rows is 3e38.
    X = torch.zeros(18, 3)
    X[:2] = 3e38
    out, _ = emulate(emu, "order_mean", X, 0, 18)
    assert_bitwise(out, CPU.order_mean(X, 0, 18)[0])
    assert_close(out, torch.full((3,), 2 * X[0, 0].item() / 18), torch.float32, "mean")
    M = torch.full((2, 3), 3e38)
    median, _ = emulate(emu, "order_mean", M, 0, 2)
    assert_bitwise(median, M[0], "median")


# closest_to_median_mean: the slice kernel for every n, shared memory or (large n) the global
# workspace, the network up to 2048 values per slice and heap sort beyond; the same bits as the CPU.
@pytest.mark.parametrize("dtype, n, beta", [(torch.float32, 1, 1), (torch.float32, 6, 3), (torch.float32, 30, 10),
                                            (torch.float32, 31, 11), (torch.float64, 30, 10),
                                            (torch.float16, 20, 4), (torch.bfloat16, 33, 9),
                                            (torch.float32, 700, 300), (torch.float32, 2100, 700)])
def test_closest_to_median_mean_bitwise_equals_cpu(emu, dtype, n, beta):
    G = awkward(n, 3 if n > 1000 else 130, 60 + n, dtype)
    out, bad = emulate(emu, "closest_to_median_mean", G, beta)
    cpu_out, cpu_bad = CPU.closest_to_median_mean(G, beta)
    assert_bitwise(out, cpu_out, f"closest_to_median_mean {dtype} n={n} beta={beta}")
    assert torch.equal(bad, cpu_bad)
    finite = finite_columns(G)
    assert_close(out[finite], reference.closest_to_median_mean(G, beta)[finite], dtype, "vs the reference")


def test_closest_to_median_mean_ties_and_huge_values(emu):
    # equal distances on both sides of the median go to the lower row; 3e38 means stay finite
    G = torch.tensor([[1.0, 3e38], [-1.0, 3e38], [0.0, 3e38], [2.0, 1.0], [-2.0, 3e38]])
    out, _ = emulate(emu, "closest_to_median_mean", G, 2)
    assert_bitwise(out, CPU.closest_to_median_mean(G, 2)[0])
    assert torch.equal(out, torch.stack([torch.tensor(0.5), G[0, 1]]))


@pytest.mark.parametrize("dtype, n", [(torch.float32, 18), (torch.float32, 100), (torch.float32, 130),
                                      (torch.float32, 2100), (torch.bfloat16, 18), (torch.bfloat16, 100),
                                      (torch.float64, 18), (torch.float64, 100), (torch.float64, 2049)],
                         ids=["float32-registers-18", "float32-registers-100", "float32-network-130",
                              "float32-select-2100", "bfloat16-registers-18", "bfloat16-registers-100",
                              "float64-registers-18", "float64-network-100", "float64-select-2049"])
def test_order_mean_overflowing_kept_sum_is_redone(emu, dtype, n):
    # docs/nonfinite.md: where the kept sum of finite values overflowed, every path (register kernels and their
    # redo kernel, the pruned network, selection) redoes it with core's kept_mean_rescaled, like the
    # CPU kernel, which keeps the overflowed mean where the column holds Inf (column 4).
    G = overflowing_columns(n, dtype)
    for lo, hi in ((0, n), (0, n - 1), ((n - 1) // 2, n // 2 + 1), (1, n - 1)):
        out, bad = emulate(emu, "order_mean", G, lo, hi)
        cpu_out, cpu_bad = CPU.order_mean(G, lo, hi)
        what = f"order_mean n={n} lo={lo} hi={hi}"
        assert_bitwise(out[:5], cpu_out[:5], what)
        assert torch.equal(bad, cpu_bad)
        assert torch.isfinite(out[FINITE_OVERFLOWING]).all(), what
        expected = reference.order_mean(G[:, WELL_CONDITIONED].double(), lo, hi)
        assert_close(out[WELL_CONDITIONED], expected, dtype, what)


def test_invariant_overflowing_kept_sum_is_redone(emu):
    # The fused invariant shares the register kernels and their redo; masked coordinates stay 0.
    n = 18
    G = overflowing_columns(n, torch.float32)
    for min_votes in (0, 2, n):
        out, mask, bad = emulate(emu, "invariant", G, 1, n - 1, min_votes)
        cpu_out, cpu_mask, _ = CPU.invariant(G, 1, n - 1, min_votes)
        assert torch.equal(mask, cpu_mask)
        assert_bitwise(out[:5], cpu_out[:5], f"invariant min_votes={min_votes}")
        assert torch.isfinite(out[FINITE_OVERFLOWING]).all()


@pytest.mark.parametrize("n", [8, 100, 300])
def test_order_mean_flags_nonfinite_rows(emu, n):
    G = with_bad_rows(awkward(n, 130, 13))
    out, bad = emulate(emu, "order_mean", G, 1, n - 1)
    cpu_out, cpu_bad = CPU.order_mean(G, 1, n - 1)
    assert torch.equal(bad, cpu_bad) and bad.nonzero().flatten().tolist() == [r for r, _ in BAD]
    ok = finite_columns(G)
    assert_bitwise(out[ok], cpu_out[ok], "order_mean on finite columns")


@pytest.mark.parametrize("n", [1, 5, 33, 64, 65, 128, 257])
def test_invariant_float32_bitwise_equals_cpu(emu, n):
    G = awkward(n, 300, 4)
    trim = (n - 1) // 4
    for tau, strict in ((0.0, True), (0.2, True), (0.6, False)):
        min_votes = ops._min_votes(tau, n, strict)
        out, mask, bad = emulate(emu, "invariant", G, trim, n - trim, min_votes)
        cpu_out, cpu_mask, cpu_bad = CPU.invariant(G, trim, n - trim, min_votes)
        assert torch.equal(mask, cpu_mask)
        assert_bitwise(out, cpu_out, f"invariant n={n} tau={tau}")
        assert torch.equal(bad, cpu_bad)
        ref_out, ref_mask = reference.invariant(G, tau, trim, strict, return_mask=True)
        assert torch.equal(mask, ref_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [7, 100])
def test_invariant_other_dtypes(emu, n, dtype):
    G = torch.randn(n, 300, generator=torch.Generator().manual_seed(n)).to(dtype)
    trim = n // 4
    min_votes = ops._min_votes(0.2, n, True)
    out, mask, _ = emulate(emu, "invariant", G, trim, n - trim, min_votes)
    ref_out, ref_mask = reference.invariant(G.double(), 0.2, trim, True, return_mask=True)
    assert torch.equal(mask, ref_mask)
    assert_close(out, ref_out, dtype, f"invariant {dtype}")
    assert_bitwise(out, CPU.invariant(G, trim, n - trim, min_votes)[0], "invariant vs cpu")


# ---------------------------------------------------------------- row selections
#
# The coordinate-wise ops take `rows` (csrc/ops.cpp): the op on G.index_select(0, rows), with the
# selected rows read where they lie (common.cuh's selected_row). Each case compares the op on a
# selection with the same emulated op on the gathered copy, bit for bit, outputs and flags, on the
# path the kernels take for the selected count m. The selection is shuffled, repeats a row, leaves
# out an all-NaN row and takes a row with a NaN; the two runs use different schedules.

def selection(n: int, m: int, seed: int) -> tuple[torch.Tensor, int]:
    """(rows, left_out): int64[m] row numbers of n > m rows, shuffled, with one repeat when m >= 2,
    and the row they leave out, m // 2: one that a kernel reading rows 0..m-1 instead would read."""
    left_out = m // 2
    others = torch.tensor([r for r in range(n) if r != left_out])
    rows = others[torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[:m]]
    if m >= 2:
        rows[m // 2] = rows[0]
    return rows, left_out


def poisoned(G: torch.Tensor, rows: torch.Tensor, left_out: int) -> torch.Tensor:
    """G with the row the selection leaves out all NaN, and a NaN in the last column of the last
    selected row."""
    G = G.clone()
    G[left_out] = float("nan")
    G[rows[-1], -1] = float("nan")
    return G


def assert_selection_is_the_copy(emu, op, G, rows, *args):
    """The emulated op on G's selected rows equals the emulated op on their copy; returns its outputs."""
    selected = emulate(emu, op, G, *args, rows, schedules=(DESCENDING | WARP_EAGER,))
    copied = emulate(emu, op, G.index_select(0, rows), *args, schedules=(ASCENDING,))
    for i, (a, b) in enumerate(zip(selected, copied)):
        assert_bitwise(a, b, f"{op} output {i} on rows {rows[:8].tolist()}... vs on their copy")
    return selected


def assert_selected_flags(bad: torch.Tensor, G: torch.Tensor, rows: torch.Tensor):
    """One flag per selected row, in the selection's order: exactly the rows holding NaN/Inf."""
    assert torch.equal(bad, ~torch.isfinite(G.double()).all(dim=1)[rows]), bad
    assert bad[-1] and bad.numel() == rows.numel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 9, 70])
def test_sign_sum_and_rlr_on_a_row_selection(emu, m, dtype):
    rows, left_out = selection(m + 2, m, 70 + m)
    G = poisoned(awkward(m + 2, 300, 71 + m, dtype), rows, left_out)
    _, bad = assert_selection_is_the_copy(emu, "sign_sum", G, rows)
    assert_selected_flags(bad, G, rows)
    weights = torch.rand(m, generator=torch.Generator().manual_seed(m)) * 10 + 0.5
    for w, theta, lr in ((None, m // 2, 1.0), (weights, m // 3, 0.3)):
        _, bad = assert_selection_is_the_copy(emu, "rlr", G, rows, w, theta, lr)
        assert_selected_flags(bad, G, rows)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rlr_on_a_row_selection_redoes_an_overflowing_sum(emu, dtype, weighted):
    # The redo (rescued_rlr_mean) reads its column again: the selected rows, with the selected weights.
    m = 18
    rows, left_out = selection(m + 2, m, 72)
    columns = torch.cat([overflowing_columns(m + 2, dtype), awkward(m + 2, 3, 73, dtype)], dim=1)
    G = poisoned(columns, rows, left_out)
    w = torch.linspace(1.0, 100.0, m) if weighted else None
    out, _ = assert_selection_is_the_copy(emu, "rlr", G, rows, w, 0, 1.0)
    assert torch.isfinite(out[1]), "the column of huge values is redone"


# m: every register network (1 to 64 wires, and 128 for 16/32-bit data), the shared-memory slices
# (65 and 129 float64 values, 129 float32 ones), the global workspace with the network (800) and
# with selection (2049).
SELECTED_ORDER_COUNTS = [1, 2, 3, 7, 9, 17, 33, 65, 129, 800, 2049]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", SELECTED_ORDER_COUNTS)
def test_order_mean_and_invariant_on_a_row_selection(emu, m, dtype):
    rows, left_out = selection(m + 2, m, 80 + m)
    G = poisoned(awkward(m + 2, 3 if m > 200 else 40, 81 + m, dtype), rows, left_out)
    for lo, hi in sorted({((m - 1) // 2, m // 2 + 1), (m // 4, m - m // 4), (0, m)}):
        _, bad = assert_selection_is_the_copy(emu, "order_mean", G, rows, lo, hi)
        assert_selected_flags(bad, G, rows)
    _, _, bad = assert_selection_is_the_copy(emu, "invariant", G, rows, m // 4, m - m // 4, m // 3)
    assert_selected_flags(bad, G, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m", [18, 100])
def test_order_mean_on_a_row_selection_redoes_an_overflowing_sum(emu, m, dtype):
    # The register kernels' redo kernel copies the column again: the selected rows (float64 at 100
    # rows takes the slices, which redo in place).
    rows, left_out = selection(m + 2, m, 82)
    columns = torch.cat([overflowing_columns(m + 2, dtype), awkward(m + 2, 3, 83, dtype)], dim=1)
    G = poisoned(columns, rows, left_out)
    for lo, hi in ((0, m), (1, m - 1)):
        out, _ = assert_selection_is_the_copy(emu, "order_mean", G, rows, lo, hi)
        assert torch.isfinite(out[1]), f"the column of huge values is redone, lo={lo} hi={hi}"
    out, _, _ = assert_selection_is_the_copy(emu, "invariant", G, rows, 1, m - 1, 2)
    assert torch.isfinite(out[1])


# (m, beta): one row; the network in shared memory; in the global workspace (m + beta = 800 values
# per slice); heap sort (m + beta > 2048).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, beta", [(1, 1), (9, 3), (30, 10), (500, 300), (1700, 500)])
def test_closest_to_median_mean_on_a_row_selection(emu, m, beta, dtype):
    # Small integers in every other column tie at the window's edge: the client order, the
    # selection's, decides there (core's nearest_by_index reads the column again).
    rows, left_out = selection(m + 2, m, 90 + m)
    d = 4 if m > 200 else 60
    G = awkward(m + 2, d, 91 + m, dtype)
    ties = torch.randint(-3, 4, (m + 2, d // 2), generator=torch.Generator().manual_seed(m)).to(dtype)
    G[:, ::2] = ties
    G = poisoned(G, rows, left_out)
    _, bad = assert_selection_is_the_copy(emu, "closest_to_median_mean", G, rows, beta)
    assert_selected_flags(bad, G, rows)
    if m > 1:
        # the tie break must go to the selection's order, not to G's row numbers
        reversed_rows = rows.flip(0)
        assert_selection_is_the_copy(emu, "closest_to_median_mean", G, reversed_rows, beta)


def test_a_selection_of_every_row_in_order_is_the_op_on_g(emu):
    G = with_bad_rows(awkward(9, 50, 95))
    every = torch.arange(9)
    for op, args in (("sign_sum", ()), ("rlr", (torch.rand(9) + 1, 4, 0.5)), ("order_mean", (2, 7)),
                     ("invariant", (2, 7, 3)), ("closest_to_median_mean", (4,))):
        on_rows = emulate(emu, op, G, *args, every, schedules=(ASCENDING,))
        on_g = emulate(emu, op, G, *args, schedules=(ASCENDING,))
        for i, (a, b) in enumerate(zip(on_rows, on_g)):
            assert_bitwise(a, b, f"{op} output {i}")


# ---------------------------------------------------------------- client_stats, clip_rows

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, window", [(1, 1, None), (3, 9000, (1000, 5000)), (33, 300, (7, 100))],
                         ids=["1x1", "3x9000-chunks", "33x300"])
def test_client_stats_close_to_reference(emu, n, d, window, dtype):
    G = awkward(n, d, 21, dtype).clamp(-1e4, 1e4).to(dtype)
    G[0, : min(d, 5)] = 0
    ref = torch.randn(d, generator=torch.Generator().manual_seed(22)).to(dtype)
    start, length = window or (0, d)
    norm, frac, dot, ref_norm, ref_dist, bad = emulate(emu, "client_stats", G, start, length, ref)
    assert {t.dtype for t in (norm, frac, dot, ref_norm, ref_dist)} == {torch.float64}  # docs/ops.md: float64 for every dtype
    expected = reference.client_stats(G.double(), (start, length), ref.double())
    assert_close(norm, expected.norm, dtype, "norm")
    assert_close(frac, expected.sign_frac, dtype, "sign_frac")
    assert_close(dot, expected.dot, dtype, "dot")
    assert_close(ref_norm.reshape(()), expected.ref_norm, dtype, "ref_norm")
    assert_close(ref_dist, expected.ref_dist, dtype, "ref_dist")
    assert torch.equal(bad, CPU.client_stats(G, start, length, ref)[5]) and not bad.any()
    norm2, frac2, dot2, ref_norm2, ref_dist2, _ = emulate(emu, "client_stats", G, start, length, None)
    assert dot2.numel() == 0 and ref_norm2.numel() == 0 and ref_dist2.numel() == 0
    assert_bitwise(norm2, norm, "norm without ref")
    assert_bitwise(frac2, frac, "sign_frac without ref")


def test_client_stats_huge_finite_rows_do_not_overflow_and_flags_match(emu):
    G = torch.randn(8, 5000, generator=torch.Generator().manual_seed(5))
    G[2, 0], G[3, :2] = 3e38, 2e38  # squares overflow float32, the norms (3e38, 2.8e38) do not
    G = with_bad_rows(G)
    norm, _, _, _, _, bad = emulate(emu, "client_stats", G, 0, 5000, None)
    assert torch.equal(bad, CPU.client_stats(G, 0, 5000, None)[5]) and bad.sum() == len(BAD)
    expected = reference.client_stats(G.double()).norm
    assert torch.isfinite(norm[~bad]).all()
    assert_close(norm[~bad], expected[~bad], torch.float32, "norms")


def huge_and_tiny_rows(d: int, seed: int) -> torch.Tensor:
    """float64 rows whose squares overflow (1e200, 1e210) or underflow (1e-200, 5e-324), a zero row
    and an ordinary one. Row 5 has +-1e210 in columns 0 and 256, where huge_row_ref holds 1e100:
    those two products are +-Inf, and their plain sum NaN, though they cancel exactly. Columns 1 to
    255 of row 5 are 0, so that the pair cancels exactly in every summation order of the backends
    (the CPU's lane 0 and the CUDA kernel's thread 0 add column 0, then 256)."""
    base = torch.randn(5, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cancelling = base[4].clone()
    cancelling[0], cancelling[1:256], cancelling[256] = 1e210, 0.0, -1e210
    return torch.stack([base[0] * 1e200, base[1] * 1e-200, torch.full((d,), 5e-324, dtype=torch.float64),
                        torch.zeros(d, dtype=torch.float64), base[2], cancelling])


def huge_row_ref(d: int, seed: int) -> torch.Tensor:
    ref = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e100
    ref[0] = ref[256] = 1e100
    return ref


def test_client_stats_float64_huge_and_tiny_rows(emu):
    # docs/nonfinite.md: float64 squares of 1e200 overflow and those of 1e-200 underflow; core's scaled
    # sums still give every norm, distance and dot product that fits float64, and such rows are
    # finite rows. d = 5000: two column chunks.
    d = 5000
    G = huge_and_tiny_rows(d, 51)
    tiny_ref = torch.randn(d, generator=torch.Generator().manual_seed(53), dtype=torch.float64) * 1e-200
    for ref, pair_cancels in ((huge_row_ref(d, 52), True), (tiny_ref, False)):
        norm, _, dot, ref_norm, ref_dist, bad = emulate(emu, "client_stats", G, 0, d, ref)
        cpu = CPU.client_stats(G, 0, d, ref)
        expected = reference.client_stats(G, None, ref)
        assert not bad.any() and not cpu[5].any()
        for name, actual, cpu_value, ref_value in (("norm", norm, cpu[0], expected.norm),
                                                   ("ref_dist", ref_dist, cpu[4], expected.ref_dist),
                                                   ("ref_norm", ref_norm, cpu[3], expected.ref_norm.reshape(1))):
            assert torch.isfinite(actual).all(), name
            assert_relative(actual, ref_value, what=name)
            assert_relative(actual, cpu_value, what=f"{name} vs cpu")
        # With huge_row_ref, row 5's pair adds exactly 0 to its dot product (the kernels take the
        # scaled-down sum there, core's dot_value); the reference's scaled product loses the rest
        # of the row next to the pair, so row 5 is checked against the product without the pair.
        # reference.client_stats divides row 2's scaled product by 2^1000 before multiplying back
        # the scale of ref, through a subnormal that loses 18%; its plain product is exact enough.
        expected_dot = expected.dot.clone()
        expected_dot[2] = G[2] @ ref
        if pair_cancels:
            without_pair = G[5].clone()
            without_pair[[0, 256]] = 0
            expected_dot[5] = without_pair @ ref
        assert torch.isfinite(dot).all()
        assert_relative(dot, expected_dot, what="dot")
        assert_relative(dot, cpu[2], what="dot vs cpu")
        assert norm[2] > 0 and norm[3] == 0 and dot[3] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_rows_huge_row_factor_is_applied_in_float64(emu, dtype):
    # docs/nonfinite.md (scales in float64): the factor of a 3e38 row, about 1e-40, is below float32's normal
    # range; formed and applied in float64, the result is rounded once (a float32 factor lost 5e-5
    # relative). Equal squares make every summation order exact, so the bits must be the CPU's.
    G = torch.full((2, 32), 3e38)
    G[1, ::2] = -1e38
    G[1, 1::2] = 1e38
    G = G.to(dtype)
    max_norm = torch.tensor([0.25, 1e30])
    out, _ = emulate(emu, "clip_rows", G, max_norm)
    assert_bitwise(out, CPU.clip_rows(G, max_norm)[0], "clip_rows vs cpu")
    expected = reference.clip_rows(G.double(), max_norm.double())
    assert_relative(out, expected, rtol=1e-6 if dtype == torch.float32 else 8e-3, what="clip_rows")


def test_clip_rows_float64_huge_and_tiny_rows(emu):
    # docs/nonfinite.md: a clipped row becomes (x * 2^-+600) * factor in float64, so 1e200 and 1e-200
    # rows are clipped to max_norm; a row within max_norm (even where max_norm * 2^600 overflows) is
    # kept as it is, bit for bit.
    d = 3000
    base = torch.randn(6, d, generator=torch.Generator().manual_seed(54), dtype=torch.float64)
    G = torch.stack([base[0] * 1e200, base[1] * 1e-200, base[2] * 1e-200, base[3] * 1e200,
                     torch.zeros(d, dtype=torch.float64), base[4]])
    max_norm = torch.tensor([1.0, 1e-250, 1e300, 1e300, 0.0, 2.0], dtype=torch.float64)
    out, bad = emulate(emu, "clip_rows", G, max_norm)
    assert not bad.any()
    assert_relative(out, reference.clip_rows(G, max_norm), what="clip_rows")
    assert_relative(out, CPU.clip_rows(G, max_norm)[0], what="clip_rows vs cpu")
    for kept in (2, 3, 4):
        assert_bitwise(out[kept], G[kept], f"row {kept}")
    clipped = [0, 1, 5]
    assert_relative(reference.client_stats(out[clipped]).norm, max_norm[clipped], rtol=1e-13, what="norms")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(1, 1), (4, 5000), (33, 129)])
def test_clip_rows_close_to_reference(emu, n, d, dtype):
    G = torch.randn(n, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    G[0] = 0  # a zero row stays zero, never NaN
    max_norm = torch.linspace(0.5, 3 * d ** 0.5, n)
    out, bad = emulate(emu, "clip_rows", G, max_norm)
    assert_close(out, reference.clip_rows(G.double(), max_norm.double()), dtype, "clip_rows")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not bad.any()


def test_clip_rows_grid_stride_over_columns(emu):
    # The scaling kernel caps its grid at 1024 x 256 threads per row: columns past 262144 are
    # reached only by the grid-stride loop.
    d = 1024 * 256 + 300
    G = torch.randn(2, d, generator=torch.Generator().manual_seed(17))
    max_norm = torch.tensor([10.0, 1e9])
    out, _ = emulate(emu, "clip_rows", G, max_norm)
    assert_close(out, reference.clip_rows(G.double(), max_norm.double()), torch.float32, "clip_rows")
    assert torch.equal(out[1], G[1])


def test_clip_rows_flags_nonfinite_rows(emu):
    G = with_bad_rows(torch.randn(8, 700, generator=torch.Generator().manual_seed(8)))
    out, bad = emulate(emu, "clip_rows", G, torch.full((8,), 2.0))
    cpu_out, cpu_bad = CPU.clip_rows(G, torch.full((8,), 2.0))
    assert torch.equal(bad, cpu_bad) and bad.sum() == len(BAD)
    assert_bitwise(out[~bad], cpu_out[~bad], "finite rows")


# ---------------------------------------------------------------- top-k

TOPK_DS = [1, 7, 4097, 3 * 4096 + 5]  # 4096 = kMinBlockElements: 4097 and 12293 need several blocks


def topk_ks(d):
    return sorted({0, 1, max(1, d // 100), d // 2, d, d + 5})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", TOPK_DS)
def test_topk_abs_same_selection_as_cpu(emu, d, dtype):
    x = awkward(1, d, 6, dtype)[0]
    for k in topk_ks(d):
        idx, values, bad = emulate(emu, "topk_abs", x, k)
        cpu_idx, cpu_values, cpu_bad = CPU.topk_abs(x, k)
        assert torch.equal(idx, cpu_idx), f"k={k}"
        assert_bitwise(values, cpu_values, f"values k={k}")
        assert torch.equal(idx, reference.topk_abs(x, k)[0]), f"reference k={k}"
        assert torch.equal(bad, cpu_bad) and not bad.any()


def test_topk_abs_ties_go_to_lower_index(emu):
    x = torch.tensor([1.0, -2.0, 2.0, -2.0, 0.5, 2.0, -0.0, 0.0])
    idx, _, _ = emulate(emu, "topk_abs", x, 3)
    assert idx.tolist() == [1, 2, 3]


@pytest.mark.parametrize("k", [1, 4095, 4097, 5000, 9000, 12292])
def test_topk_abs_ties_across_block_boundaries(emu, k):
    # Every magnitude equal over 3+ blocks: the k lowest indices, in order, on every schedule.
    d = 3 * 4096 + 4
    x = torch.where(torch.arange(d) % 3 == 0, -1.5, 1.5)
    idx, values, _ = emulate(emu, "topk_abs", x, k, schedules=ALL_SCHEDULES)
    assert idx.tolist() == list(range(k))
    assert_bitwise(values, x[:k])


def test_topk_abs_ties_at_threshold_with_larger_values_in_later_blocks(emu):
    d = 4 * 4096
    x = torch.full((d,), 0.25)
    big = torch.tensor([5, 4100, 8200, 16000])
    x[big] = torch.tensor([3.0, -4.0, 5.0, -6.0])
    for k in (4, 5, 4500):
        idx, values, _ = emulate(emu, "topk_abs", x, k, schedules=ALL_SCHEDULES)
        expected = reference.topk_abs(x, k)[0]
        assert torch.equal(idx, expected), f"k={k}"
        assert torch.equal(idx, CPU.topk_abs(x, k)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_abs_keys_differing_only_in_their_lowest_bits(emu, dtype):
    # Every magnitude shares its top digits, so the selection is decided by the last digit passes
    # over the candidate buffer (six digits for float64), with ties inside blocks and across them.
    d = 3 * 4096 + 9
    g = torch.Generator().manual_seed(15)
    ulps = torch.randint(0, 40, (d,), generator=g)
    bits = torch.tensor(1.0, dtype=dtype).view(_BITS[dtype]) + ulps.to(_BITS[dtype])
    x = bits.view(dtype) * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    for k in (1, 7, 300, 6000, d - 1):
        idx, values, _ = emulate(emu, "topk_abs", x, k)
        assert torch.equal(idx, reference.topk_abs(x, k)[0]), f"k={k}"
        assert torch.equal(idx, CPU.topk_abs(x, k)[0]), f"k={k}"
        assert_bitwise(values, x[idx])


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_abs_nan_is_flagged_and_ranked_first(emu, dtype):
    x = awkward(1, 5000, 14, dtype)[0]
    x[[17, 4200]] = float("nan")
    idx, values, bad = emulate(emu, "topk_abs", x, 10)
    cpu_idx, cpu_values, cpu_bad = CPU.topk_abs(x, 10)
    assert bad.item() and cpu_bad.item()
    assert torch.equal(idx, cpu_idx) and {17, 4200} <= set(idx.tolist())
    assert_bitwise(values, cpu_values)


@pytest.mark.parametrize("rho", [0.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ef_step_same_selection_and_state_as_cpu(emu, dtype, rho):
    d = 3 * 4096 + 11
    g = torch.Generator().manual_seed(7)
    err, mom = torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    cpu_err, cpu_mom = err.clone(), mom.clone()
    for step, k in enumerate((d // 100, 1, 0, d, d + 3)):
        u = awkward(1, d, 10 + step, dtype)[0]
        (idx, values, bad), state = emulated(emu, "topk_ef_step", u, err, mom, k, rho)
        err, mom = state[1], state[2]
        cpu_idx, cpu_values, cpu_bad = CPU.topk_ef_step(u, cpu_err, cpu_mom, k, rho)
        assert torch.equal(idx, cpu_idx), f"step {step} k={k}"
        assert_bitwise(values, cpu_values, f"values step {step}")
        assert_bitwise(err, cpu_err, f"error step {step}")
        assert_bitwise(mom, cpu_mom, f"momentum step {step}")
        assert not bad.item()


def test_topk_ef_step_nonfinite_u_leaves_state_untouched(emu):
    d = 5000
    g = torch.Generator().manual_seed(9)
    u, err, mom = (torch.randn(d, generator=g) for _ in range(3))
    u[4321] = float("inf")
    (idx, values, bad), state = emulated(emu, "topk_ef_step", u, err, mom, 10, 0.9)
    assert bad.item() and idx.numel() == 0 and values.numel() == 0
    assert_bitwise(state[1], err, "error")
    assert_bitwise(state[2], mom, "momentum")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.topk_ef_step(u, err.clone(), mom.clone(), k=10, rho=0.9, backend="cpu")


@pytest.mark.parametrize("rho", [0.0, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ef_step_state_saturates_at_the_storage_limit(emu, dtype, rho):
    # docs/nonfinite.md: a client that keeps sending +-big: error (and momentum) saturate at the largest
    # finite value of the storage dtype (65504 for float16, FLT_MAX for float32), never Inf; a
    # later selection returns that value.
    limit = torch.finfo(dtype).max
    big = 6e4 if dtype == torch.float16 else limit * 0.75
    d = 3 * 4096 + 11
    u = torch.full((d,), big, dtype=dtype)
    u[::3] = -big
    err, mom = torch.zeros(d, dtype=dtype), torch.zeros(d, dtype=dtype)
    cpu_err, cpu_mom = err.clone(), mom.clone()
    for step, k in enumerate((0, 0, 5)):
        (idx, values, bad), state = emulated(emu, "topk_ef_step", u, err, mom, k, rho)
        err, mom = state[1], state[2]
        cpu_idx, cpu_values, _ = CPU.topk_ef_step(u, cpu_err, cpu_mom, k, rho)
        assert torch.equal(idx, cpu_idx) and not bad.item()
        assert_bitwise(values, cpu_values, f"values step {step}")
        assert_bitwise(err, cpu_err, f"error step {step}")
        assert_bitwise(mom, cpu_mom, f"momentum step {step}")
        assert torch.isfinite(err).all() and torch.isfinite(mom).all()
        if step == 1:
            assert torch.equal(err.abs(), torch.full_like(err, limit)), f"error after two steps of {big}"
    assert idx.tolist() == list(range(5)) and torch.equal(values.abs(), torch.full_like(values, limit))


# ---------------------------------------------------------------- max-pool

SHAPES = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,), (5, 7), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_amplify_multi_segment_equals_cpu(emu, restore, dtype):
    layout = robustagg.layout.Layout.from_shapes(SHAPES)
    G = awkward(5, layout.d, 11, dtype)
    for kernel in (1, 2, 3, 5):
        table = layout.segment_table(layout.d, kernel, restore)
        width = layout.d if restore else layout.pooled_width(layout.d, kernel)
        out, bad = emulate(emu, "maxpool_amplify", G, table, kernel, restore, width)
        cpu_out, cpu_bad = CPU.maxpool_amplify(G, table, kernel, restore, width)
        assert_bitwise(out, cpu_out, f"kernel={kernel}")
        assert_bitwise(out, reference.maxpool_amplify(G, layout, kernel, restore), f"reference kernel={kernel}")
        assert torch.equal(bad, cpu_bad) and not bad.any()


@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_amplify_flat_layout_with_tail_and_bad_rows(emu, restore):
    G = with_bad_rows(awkward(7, 2017, 12))
    layout = robustagg.layout.Layout.flat(100, skip_tail=17)
    table = layout.segment_table(2017, 2, restore)
    width = 2017 if restore else layout.pooled_width(2017, 2)
    out, bad = emulate(emu, "maxpool_amplify", G, table, 2, restore, width)
    cpu_out, cpu_bad = CPU.maxpool_amplify(G, table, 2, restore, width)
    assert torch.equal(bad, cpu_bad) and bad.nonzero().flatten().tolist() == [r for r, _ in BAD]
    assert_bitwise(out, cpu_out)


@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("d, layout", [(50, robustagg.layout.Layout.flat(100)),
                                       (30, robustagg.layout.Layout.flat(7, skip_tail=29)),
                                       (1, robustagg.layout.Layout.flat(1))],
                         ids=["shorter-than-a-row", "all-tail", "single-value"])
def test_maxpool_amplify_degenerate_layouts(emu, d, layout, restore):
    # Segments with no row (or too small for the window) leave only leftovers and the tail.
    G = torch.randn(3, d, generator=torch.Generator().manual_seed(d))
    G[1, -1] = float("nan")
    for kernel in (1, 2, 3):
        table = layout.segment_table(d, kernel, restore)
        width = d if restore else layout.pooled_width(d, kernel)
        out, bad = emulate(emu, "maxpool_amplify", G, table, kernel, restore, width)
        cpu_out, cpu_bad = CPU.maxpool_amplify(G, table, kernel, restore, width)
        assert_bitwise(out, cpu_out, f"kernel={kernel}")
        assert bad.tolist() == cpu_bad.tolist() == [False, True, False]


def test_maxpool_amplify_nonfinite_in_dropped_remainder_is_flagged(emu):
    layout = robustagg.layout.Layout.from_shapes([(5, 7)])
    G = torch.randn(3, 35, generator=torch.Generator().manual_seed(1))
    G[1, 34] = float("nan")  # row 4, column 6: dropped by floor mode with kernel 2
    table = layout.segment_table(35, 2, False)
    _, bad = emulate(emu, "maxpool_amplify", G, table, 2, False, layout.pooled_width(35, 2))
    assert bad.tolist() == [False, True, False]


# ---------------------------------------------------------------- pairwise

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(1, 1), (1, 50), (2, 7), (33, 1000), (33, 1), (65, 130)])
def test_pairwise_close_to_reference(emu, n, d, dtype):
    G = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d)).to(dtype)
    if n > 3:
        G[3] = G[1]  # identical rows: exactly 0 distance and cosine 1
        G[2] = 0     # zero row: cosine 0
    sq, bad = emulate(emu, "pairwise_sqdist", G)
    cos, _ = emulate(emu, "pairwise_cosine", G)
    assert_close(sq, reference.pairwise_sqdist(G.double()), dtype, "sqdist")
    assert_close(cos, reference.pairwise_cosine(G.double()), dtype, "cosine")
    assert_bitwise(sq, sq.T, "symmetric sqdist")
    assert_bitwise(cos, cos.T, "symmetric cosine")
    assert torch.equal(torch.diagonal(sq), torch.zeros(n, dtype=sq.dtype))
    assert torch.equal(bad, CPU.pairwise_sqdist(G)[1]) and not bad.any()
    if n > 3:
        assert sq[1, 3] == 0 and cos[1, 3] == 1 and cos[2, 5] == 0 and cos[2, 2] == 0


def test_pairwise_nearly_identical_rows_use_direct_differences(emu):
    G = torch.randn(6, 3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e3
    G[4] = G[0]
    G[4, 17] += 1e-9
    sq, _ = emulate(emu, "pairwise_sqdist", G)
    expected = reference.pairwise_sqdist(G)
    assert_close(sq, expected, torch.float64, "nearly identical rows")
    assert sq[0, 4] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_more_direct_pairs_than_direct_blocks(emu, dtype):
    # 50 nearly identical rows: all 1225 pairs cancel in the Gram formula and are recomputed from
    # direct differences by at most 1024 blocks, so some blocks take a second pair.
    g = torch.Generator().manual_seed(18)
    G = (torch.randn(1, 64, generator=g).double() + torch.randn(50, 64, generator=g).double() * 1e-6).to(dtype)
    sq, _ = emulate(emu, "pairwise_sqdist", G)
    expected = reference.pairwise_sqdist(G.double())
    assert bool((expected > 0).sum() == 50 * 49)
    torch.testing.assert_close(sq.double(), expected, rtol=1e-5, atol=0)  # docs/ops.md: 1e-5 relative
    assert_bitwise(sq, sq.T, "symmetric")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_flags_nonfinite_rows(emu, dtype):
    # float64 NaN/Inf rows are also unsafe rows (core's gram_row_unsafe): their pairs take the direct pass.
    G = with_bad_rows(torch.randn(9, 300, generator=torch.Generator().manual_seed(3)).to(dtype))
    _, bad = emulate(emu, "pairwise_cosine", G)
    assert torch.equal(bad, CPU.pairwise_cosine(G)[1]) and bad.sum() == len(BAD)


def unsafe_rows(d: int = 64) -> torch.Tensor:
    """float64 rows whose Gram diagonal overflows or is below 2^-900 (core's unsafe rows), around
    one ordinary row: 0, 1: the same 1e300 row; 2: another 1e300 row; 3: a 1e-300 row; 4, 5: two
    different tiny rows whose squared distance (2e-600) underflows to 0, cosine 0.8; 6: zeros;
    7: ordinary; 8: every value 5e-324; 9: a 1e-140 row (normal squares, K_ii < 2^-900); 10: row 3
    with column 5 negated (one differing entry, in a lane other than a warp's first)."""
    base = torch.randn(5, d, generator=torch.Generator().manual_seed(55), dtype=torch.float64)
    tiny_a, tiny_b = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    tiny_a[:2] = torch.tensor([1e-300, 2e-300], dtype=torch.float64)
    tiny_b[:2] = torch.tensor([2e-300, 1e-300], dtype=torch.float64)
    one_sign_flipped = base[2] * 1e-300
    one_sign_flipped[5] = -one_sign_flipped[5]
    return torch.stack([base[0] * 1e300, base[0] * 1e300, base[1] * 1e300, base[2] * 1e-300, tiny_a, tiny_b,
                        torch.zeros(d, dtype=torch.float64), base[3], torch.full((d,), 5e-324, dtype=torch.float64),
                        base[4] * 1e-140, one_sign_flipped])


def test_pairwise_float64_huge_tiny_and_zero_rows(emu):
    # docs/nonfinite.md: every pair with an unsafe row comes from the direct pass, products scaled by the
    # rows' powers of two, equality from the count of differing entries (not a zero distance).
    G = unsafe_rows()
    sq, bad = emulate(emu, "pairwise_sqdist", G)
    cos, _ = emulate(emu, "pairwise_cosine", G)
    assert sq.dtype == cos.dtype == torch.float64 and not bad.any()
    assert_close(cos, reference.pairwise_cosine(G), torch.float64, "cosine")
    assert_close(cos, CPU.pairwise_cosine(G)[0], torch.float64, "cosine vs cpu")
    assert_relative(sq, reference.pairwise_sqdist(G), what="sqdist")
    assert_relative(sq, CPU.pairwise_sqdist(G)[0], what="sqdist vs cpu")
    assert torch.isfinite(cos).all()
    assert_bitwise(sq, sq.T, "symmetric sqdist")
    assert_bitwise(cos, cos.T, "symmetric cosine")
    assert sq[0, 1] == 0 and cos[0, 1] == 1, "identical huge rows"
    assert sq[4, 5] == 0 and cos[4, 5] == pytest.approx(0.8, rel=1e-14), "different tiny rows"
    assert sq[3, 10] == 0 and cos[3, 10] < 1, "tiny rows differing in one entry"
    n = G.shape[0]
    assert torch.equal(cos[6], torch.zeros(n, dtype=torch.float64)), "zero row"
    expected_diagonal = torch.ones(n, dtype=torch.float64)
    expected_diagonal[6] = 0
    assert torch.equal(torch.diagonal(cos), expected_diagonal)


@pytest.mark.parametrize("value, cosine", [(1e300, 1.0), (1e-300, 1.0), (0.0, 0.0)])
def test_pairwise_single_float64_row_uses_its_scaled_self_product(emu, value, cosine):
    # n = 1: the only listed pair is the row's own one.
    G = torch.full((1, 9), value, dtype=torch.float64)
    assert emulate(emu, "pairwise_cosine", G)[0].item() == cosine
    assert emulate(emu, "pairwise_sqdist", G)[0].item() == 0.0


# ---------------------------------------------------------------- grid-stride loops
#
# The 1-D kernels cap their grids at 65535 blocks (common.cuh's grid_for) and stride over the rest;
# these shapes are the smallest that make them stride. One schedule each: the point is the
# coordinates only the second pass reaches.

def test_sign_sum_grid_stride(emu):
    d = 65535 * 256 + 1000
    G = torch.randn(1, d, generator=torch.Generator().manual_seed(41))
    G[0, -3:] = torch.tensor([0.0, -2.0, float("nan")])
    sums, bad = emulate(emu, "sign_sum", G, schedules=(ASCENDING,))
    assert torch.equal(sums, CPU.sign_sum(G)[0]) and sums[-3:].tolist() == [0, -1, 0]
    assert bad.tolist() == [True]


@pytest.mark.parametrize("op", ["order_mean", "invariant"])
def test_order_statistics_register_kernel_grid_stride(emu, op):
    d = 65535 * 128 + 1000
    G = torch.randn(3, d, generator=torch.Generator().manual_seed(42))
    args = (1, 2) if op == "order_mean" else (1, 2, 3)
    out = emulate(emu, op, G, *args, schedules=(ASCENDING,))
    for a, b in zip(out, getattr(CPU, op)(G, *args)):
        assert_bitwise(a, b, op)


@pytest.mark.parametrize("restore", [False, True])
def test_maxpool_amplify_grid_stride_over_rows(emu, restore):
    # 100 blocks of windows leave room for 81 row blocks: rows 81..99 come from the row stride.
    d, layout = 256 * 100, robustagg.layout.Layout.flat(160)
    G = torch.randn(100, d, generator=torch.Generator().manual_seed(43))
    table = layout.segment_table(d, 2, restore)
    width = d if restore else layout.pooled_width(d, 2)
    out, _ = emulate(emu, "maxpool_amplify", G, table, 2, restore, width, schedules=(ASCENDING,))
    assert_bitwise(out, CPU.maxpool_amplify(G, table, 2, restore, width)[0])


def test_maxpool_amplify_grid_stride_over_work_items(emu):
    # More pass-through values and 1 x 1 windows than 8192 blocks of 256 threads.
    d = 8192 * 256 + 5000
    layout = robustagg.layout.Layout.from_shapes([(d - 4000,), (40, 100)])
    G = torch.randn(1, d, generator=torch.Generator().manual_seed(44))
    G[0, -1] = float("inf")
    table = layout.segment_table(d, 1, False)
    out, bad = emulate(emu, "maxpool_amplify", G, table, 1, False, d, schedules=(ASCENDING,))
    assert_bitwise(out, CPU.maxpool_amplify(G, table, 1, False, d)[0])
    assert bad.tolist() == [True]


# ---------------------------------------------------------------- every schedule

def _maxpool_fuzz_args():
    layout = robustagg.layout.Layout.from_shapes(SHAPES)
    return awkward(5, layout.d, 38), layout.segment_table(layout.d, 2, True), 2, True, layout.d


_FUZZ = {
    "sign_sum": lambda: (with_bad_rows(awkward(9, 700, 31)),),
    "rlr": lambda: (awkward(9, 700, 32), torch.rand(9) + 0.5, 4, 0.5),
    "order_mean": lambda: (awkward(257, 200, 33), 64, 193),
    "invariant": lambda: (awkward(100, 300, 34), 20, 80, 30),
    "closest_to_median_mean": lambda: (with_bad_rows(awkward(30, 700, 41)), 10),
    "client_stats": lambda: (with_bad_rows(awkward(9, 9000, 35)), 100, 5000, torch.randn(9000)),
    "clip_rows": lambda: (awkward(9, 5000, 36).clamp(-1e3, 1e3), torch.full((9,), 3.0)),
    "topk_ef_step": lambda: (torch.randn(9000), torch.randn(9000), torch.randn(9000), 90, 0.9),
    "topk_abs": lambda: (awkward(1, 9000, 37)[0], 4500),
    "maxpool_amplify": _maxpool_fuzz_args,
    "pairwise_sqdist": lambda: (awkward(40, 1500, 39).clamp(-10, 10),),
    "pairwise_cosine": lambda: (awkward(40, 1500, 40).clamp(-10, 10),),
}
_BITWISE_VS_CPU = {"sign_sum", "rlr", "order_mean", "invariant", "closest_to_median_mean", "topk_abs",
                   "maxpool_amplify"}


@pytest.mark.parametrize("op", sorted(RAW_OPS))
def test_every_op_gives_the_same_bits_under_every_schedule(emu, op):
    # Six schedules (ascending, descending, shuffled; lockstep and warp-eager) with two shuffle
    # seeds: all twelve runs agree bit for bit (checked inside `emulated`).
    args = _FUZZ[op]()
    runs = [emulated(emu, op, *args, schedules=ALL_SCHEDULES, seed=seed)[0] for seed in (1, 2)]
    for i, (a, b) in enumerate(zip(*runs)):
        assert_bitwise(a, b, f"{op} output {i}, shuffle seed 1 vs 2")
    if op in _BITWISE_VS_CPU:
        assert_bitwise(runs[0][0], getattr(CPU, op)(*args)[0], f"{op} vs cpu")


# ---------------------------------------------------------------- sanitizer builds
#
# The same kernels built with -fsanitize=address stand in for compute-sanitizer memcheck: global
# memory is host memory of exact sizes (torch tensors, workspaces from posix_memalign), static
# shared arrays are instrumented globals, dynamic shared memory is its own heap block, and the
# runtime announces every fiber switch to ASan. The ASan runtime must be loaded before Python
# starts (LD_PRELOAD, with libstdc++ so that ASan intercepts C++ throws), so these run in a child
# process.

SANITIZER_SKIP = pytest.mark.skipif(SANITIZER is not None, reason=f"already the {SANITIZER} sanitizer run")


def _preload(runtime: str) -> str | None:
    paths = []
    for name in (runtime, "libstdc++.so"):
        found = subprocess.run([build.compiler(), f"-print-file-name={name}"], capture_output=True, text=True)
        path = found.stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return None
        paths.append(path)
    return " ".join(paths)


def _sanitizer_build(tmp_path_factory, sanitizer, runtime, **env):
    """(library path, environment) of the build with -fsanitize=<sanitizer>; skipped with the reason
    where g++ lacks the sanitizer's runtime."""
    preload = _preload(runtime)
    if preload is None:
        pytest.skip(f"g++ has no {runtime}: the -fsanitize={sanitizer} build is not available")
    cache = Path(os.environ.get("ROBUSTAGG_EMU_CACHE") or tmp_path_factory.mktemp(f"cuda_emu_{sanitizer}"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = build.build(cache, sanitizer=sanitizer, csrc=CSRC)
    return lib, dict(os.environ, ROBUSTAGG_EMU_SANITIZER=sanitizer, ROBUSTAGG_EMU_CACHE=str(cache),
                     LD_PRELOAD=preload, **env)


@pytest.fixture(scope="session")
def asan(tmp_path_factory):
    return _sanitizer_build(tmp_path_factory, "address", "libasan.so", ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")


@SANITIZER_SKIP
@pytest.mark.parametrize("kind, report", [(5, "global-buffer-overflow"), (6, "heap-buffer-overflow")],
                         ids=["static-shared-read", "dynamic-shared-write"])
def test_asan_catches_out_of_bounds_shared_memory(asan, kind, report):
    lib, env = asan
    script = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.emu_configure(0, 0); "
              "out = (ctypes.c_int * 128)(); lib.emu_selftest_hazard(int(sys.argv[2]), out)")
    proc = subprocess.run([sys.executable, "-c", script, str(lib), str(kind)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0, "ASan did not stop the out-of-bounds access"
    assert report in proc.stderr and "selftest_hazard_kernel" in proc.stderr, proc.stderr[-3000:]
    # thread 63 of the 64 makes the access one element past the end
    assert "made by kernel selftest_hazard_kernel block (0,0,0)" in proc.stderr, proc.stderr[-3000:]
    assert "thread (63,0,0) [warp 1 lane 31]" in proc.stderr, proc.stderr[-3000:]


@SANITIZER_SKIP
def test_asan_memcheck_of_every_op(asan):
    # Every op test of this module on the ASan build, under one schedule to bound the time (and
    # without the two largest grid-stride cases: 16.8M and 8.4M threads of plain indexing).
    _, env = asan
    env = dict(env, ROBUSTAGG_EMU_SCHEDULES="ascending")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x",
                           "-k", "not asan and not (grid_stride and (sign_sum or register_kernel))"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    output = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0 and "AddressSanitizer" not in proc.stderr.replace(
        "ASan doesn't fully support makecontext/swapcontext", ""), output
    assert " passed" in proc.stdout and "failed" not in proc.stdout, output


# ThreadSanitizer stands in for compute-sanitizer racecheck: the kernels are instrumented, the
# runtime declares each CUDA thread a TSan fiber whose switches imply no ordering, and only
# __syncthreads, __syncwarp, kernel boundaries and atomics order memory accesses, so two threads of
# a block touching the same shared (or global) bytes without a barrier between them, one of them
# writing, is reported whatever the schedule. The row flags, written racily by design (many threads
# store the same `true`), are declared a benign race. Torch and the CPU backend run on one OpenMP
# thread here: TSan cannot see libgomp's synchronization.

@pytest.fixture(scope="session")
def tsan(tmp_path_factory):
    return _sanitizer_build(tmp_path_factory, "thread", "libtsan.so", TSAN_OPTIONS="halt_on_error=1",
                            OMP_NUM_THREADS="1")


@SANITIZER_SKIP
@pytest.mark.parametrize("entry, barrier, schedule", [("emu_selftest_neighbour", 5, ASCENDING),
                                                      ("emu_selftest_rounds", 0, ASCENDING)],
                         ids=["read-before-barrier", "write-after-read-lockstep"])
def test_tsan_catches_a_missing_barrier(tsan, entry, barrier, schedule):
    # The second case is the race the lockstep schedule cannot see (see
    # test_emulator_warp_eager_schedule_exposes_a_missing_trailing_barrier); TSan sees it anyway.
    lib, env = tsan
    args = "5, 0, out" if entry == "emu_selftest_neighbour" else "0, out"
    script = (f"import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.emu_configure({schedule}, 0); "
              f"out = (ctypes.c_int * 128)(); lib.{entry}({args})")
    proc = subprocess.run([sys.executable, "-c", script, str(lib)], env=env, capture_output=True, text=True,
                          timeout=120)
    kernel = "selftest_neighbour_kernel" if entry == "emu_selftest_neighbour" else "selftest_rounds_kernel"
    assert proc.returncode != 0 and "ThreadSanitizer: data race" in proc.stderr, proc.stderr[-3000:]
    assert f"'cuda_emu {kernel} block (0,0,0) thread (" in proc.stderr, proc.stderr[-3000:]


@SANITIZER_SKIP
def test_tsan_racecheck_of_every_op(tsan):
    # Every op once (the schedule-fuzz cases, non-finite rows included), plus the multi-block
    # top-k tie split, the global-scratch order statistics, a tail-only max-pool and the overflow
    # redo of the register order statistics (flag and redo kernel).
    _, env = tsan
    env = dict(env, ROBUSTAGG_EMU_SCHEDULES="ascending")
    selection = ("every_schedule or ties_across_block_boundaries and 4097 or large_n and 1100 "
                 "or degenerate and all-tail or overflowing_kept_sum and float32-registers-18")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x",
                           "-k", selection], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    output = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0 and "ThreadSanitizer" not in proc.stderr, output
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 15 and "failed" not in proc.stdout, output
