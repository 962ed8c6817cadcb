"""CI checks of the CUDA sources that need nvcc but no GPU.

* every ``csrc/cuda/*.cu`` compiles with the nvcc flags of setup.py for sm_80 and sm_90;
* ptxas reports no spills, stack frame or local memory for the hot coordinate-wise kernels, in
  particular the register order-statistic kernels (n <= 64, and n <= 128 for 16/32-bit data);
* the compile-time Batcher network of ``csrc/cuda/batcher_network.cuh`` equals core's
  ``batcher_network`` step for step, and sorting plus ``kept_mean_wires`` give core's bits (run on
  the host: the functions are host+device);
* the kernel files include no torch header, so they build on any machine;
* ``csrc/cuda/bindings.cpp``, the one file that sees torch, passes ``g++ -fsyntax-only`` against
  this torch's headers and the toolkit's (it needs a CUDA build of torch to compile for real).

Skipped, with the reason, where nvcc is absent.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): "
                                                     "the CUDA sources cannot be compile-checked here")

# The flags setup.py and torch's CUDAExtension pass to nvcc.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]
SETUP_NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"]
GENCODE = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]

# Kernels that must keep everything in registers (mangled-name substrings).
HOT_KERNELS = ("order_mean_registers_kernel", "sign_sum_kernel", "rlr_kernel")
REGISTER_NETWORK_SIZES = (1, 2, 4, 8, 16, 32, 64)  # every dtype
FLOAT_ONLY_NETWORK_SIZES = (128,)                    # float16, bfloat16, float32
DTYPES = 4


def _compile(source: Path, out_dir: Path):
    cmd = [NVCC, *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS, *GENCODE, "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
           "-c", str(source), "-o", str(out_dir / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source name: (returncode, nvcc output)}, every file compiled once for both archs."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    with ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
        results = pool.map(lambda s: _compile(s, out_dir), SOURCES)
        return {s.name: r for s, r in zip(SOURCES, results)}


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas(output: str) -> dict:
    """{(kernel, arch): {"stack", "spill_stores", "spill_loads", "lmem", "registers"}} from ptxas -v."""
    kernels, current = {}, None
    for line in output.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
            kernels[current] = {"stack": 0, "spill_stores": 0, "spill_loads": 0, "lmem": 0, "registers": 0}
        elif current and (m := _FRAME.search(line)):
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := _USED.search(line)):
            lmem = _LMEM.search(m.group(2))
            kernels[current].update(registers=int(m.group(1)), lmem=int(lmem.group(1)) if lmem else 0)
    return kernels


def test_ptxas_parser_reads_spills():
    sample = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
              "ptxas info    : Function properties for _Z3fooPf\n"
              "    24 bytes stack frame, 36 bytes spill stores, 12 bytes spill loads\n"
              "ptxas info    : Used 32 registers, 8 bytes lmem, 400 bytes cmem[0]\n")
    assert parse_ptxas(sample) == {("_Z3fooPf", "sm_80"): {"stack": 24, "spill_stores": 36, "spill_loads": 12,
                                                           "lmem": 8, "registers": 32}}


def test_every_op_family_has_a_cuda_source():
    names = {s.stem for s in SOURCES}
    assert names >= {"sign_votes", "order_stats", "client_stats", "topk", "maxpool", "pairwise"}, names


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_cuda_source_compiles_for_sm80_and_sm90(compiled, source):
    returncode, output = compiled[source]
    assert returncode == 0, f"nvcc failed on {source}:\n{output}"
    assert "warning" not in output.lower(), f"nvcc warned on {source}:\n{output}"
    archs = {arch for _, arch in parse_ptxas(output)}
    assert archs == set(ARCHS), f"{source}: ptxas compiled for {archs}, expected {ARCHS}"


def test_hot_kernels_do_not_spill(compiled):
    kernels = {}
    for returncode, output in compiled.values():
        assert returncode == 0, output
        kernels.update(parse_ptxas(output))
    hot = {key: info for key, info in kernels.items() if any(h in key[0] for h in HOT_KERNELS)}
    register_kernels = [k for k in hot if "order_mean_registers_kernel" in k[0]]
    expected = len(ARCHS) * (DTYPES * len(REGISTER_NETWORK_SIZES) + (DTYPES - 1) * len(FLOAT_ONLY_NETWORK_SIZES))
    assert len(register_kernels) == expected, sorted(register_kernels)
    bad = {key: info for key, info in hot.items()
           if info["spill_stores"] or info["spill_loads"] or info["stack"] or info["lmem"]}
    assert not bad, f"hot kernels use local memory: {bad}"


def _toolkit_include_dirs() -> list[str]:
    """The CUDA toolkit's include directories as nvcc reports them (nvcc may be a wrapper script
    outside the toolkit, so its own path says nothing)."""
    probe = subprocess.run([NVCC, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True)
    text = probe.stdout + probe.stderr
    return re.findall(r'"-I([^"]+)"', text) + re.findall(r'"-isystem" "([^"]+)"', text)


def test_bindings_pass_a_syntax_check_against_the_torch_headers(tmp_path):
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: bindings.cpp cannot be syntax-checked")
    # torch's CMake build generates this header; its CPU wheels ship c10/cuda without it. It only
    # says whether c10_cuda is a shared library. A real one in torch's include path comes first.
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [ROOT / "csrc", *cpp_extension.include_paths(), tmp_path, *_toolkit_include_dirs(),
                sysconfig.get_paths()["include"]]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", *(f"-I{d}" for d in includes), str(CUDA_DIR / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"g++ -fsyntax-only failed on bindings.cpp:\n{proc.stderr[-6000:]}"
    ours = [line for line in proc.stderr.splitlines() if str(ROOT / "csrc") in line and "warning" in line]
    assert not ours, "\n".join(ours)


def test_kernel_sources_include_no_torch_header():
    plain = [p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    assert plain
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    offenders = [p.name for p in plain if pattern.search(p.read_text())]
    assert not offenders, f"these CUDA files include torch headers: {offenders}"


HOST_CHECK = r"""
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>

#include "cuda/batcher_network.cuh"

using robustagg::CompareExchange;

template <int N> bool same_steps() {
  static CompareExchange net[robustagg::cuda::network_steps(128) + 1];
  const int count = robustagg::batcher_network(N, net);
  if (count != robustagg::cuda::network_steps(N)) {
    std::printf("N=%d: core has %d steps, the unrolled network %d\n", N, count, robustagg::cuda::network_steps(N));
    return false;
  }
  for (int s = 0; s < count; ++s) {
    const auto w = robustagg::cuda::Network<N>::value.steps[s];
    if (w.low != net[s].low || w.high != net[s].high) {
      std::printf("N=%d step %d: core (%d,%d), unrolled (%d,%d)\n", N, s, net[s].low, net[s].high, w.low, w.high);
      return false;
    }
  }
  return true;
}

// Values with exact ties, both zeros, subnormals and huge magnitudes, where summation order and the
// placement of -0 / +0 show.
template <typename A> A draw(std::mt19937& rng) {
  const A pool[] = {A(-2), A(-1), -A(0), A(0), A(1), A(2), A(3.5), A(0.1), A(-0.3),
                    std::numeric_limits<A>::denorm_min(), -std::numeric_limits<A>::denorm_min(),
                    A(3e38), A(-3e38), A(1e-7), A(7e5)};
  std::uniform_int_distribution<int> pick(0, sizeof(pool) / sizeof(pool[0]) - 1);
  std::uniform_real_distribution<double> real(-4.0, 4.0);
  return rng() % 2 ? pool[pick(rng)] : A(real(rng));
}

template <int N, typename A> bool same_bits(std::mt19937& rng) {
  static CompareExchange net[robustagg::cuda::network_steps(128) + 1];
  for (int trial = 0; trial < 400; ++trial) {
    const int n = N == 1 ? 1 : N / 2 + 1 + static_cast<int>(rng() % (N / 2));
    A wires[N], core[N];
    for (int i = 0; i < N; ++i) wires[i] = i < n ? draw<A>(rng) : std::numeric_limits<A>::infinity();
    std::memcpy(core, wires, sizeof(core));
    robustagg::cuda::sort_wires(wires);
    robustagg::run_network(core, net, robustagg::batcher_network(n, net));
    if (std::memcmp(wires, core, n * sizeof(A)) != 0) {
      std::printf("N=%d n=%d: sorted wires differ from core's network\n", N, n);
      return false;
    }
    const int lo = static_cast<int>(rng() % n);
    const int hi = lo + 1 + static_cast<int>(rng() % (n - lo));
    const A mine = robustagg::cuda::kept_mean_wires(wires, lo, hi);
    const A theirs = robustagg::kept_mean<A>(core, lo, hi);
    if (std::memcmp(&mine, &theirs, sizeof(A)) != 0) {
      std::printf("N=%d n=%d lo=%d hi=%d: kept_mean_wires %a, core kept_mean %a\n", N, n, lo, hi, (double)mine,
                  (double)theirs);
      return false;
    }
  }
  return true;
}

template <int N> bool check(std::mt19937& rng) {
  return same_steps<N>() && same_bits<N, float>(rng) && same_bits<N, double>(rng);
}

int main() {
  std::mt19937 rng(12345);
  const bool ok = check<1>(rng) && check<2>(rng) && check<4>(rng) && check<8>(rng) && check<16>(rng) &&
                  check<32>(rng) && check<64>(rng) && check<128>(rng);
  std::printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}
"""


def test_unrolled_network_matches_core_bit_for_bit(tmp_path):
    source = tmp_path / "network_check.cu"
    source.write_text(HOST_CHECK)
    exe = tmp_path / "network_check"
    build = subprocess.run([NVCC, "-std=c++17", "-O2", "--fmad=false", "-Xcompiler", "-ffp-contract=off",
                            f"-I{ROOT / 'csrc'}", str(source), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_network_threshold_matches_the_cpu_kernel():
    """Both backends switch from the pruned network to selection at the same n (sign of zero results)."""
    pattern = re.compile(r"constexpr int64_t kNetworkMaxRows = (\d+);")
    cpu = pattern.search((ROOT / "csrc" / "cpu" / "order_stats.cpp").read_text())
    cuda = pattern.search((CUDA_DIR / "order_stats.cu").read_text())
    assert cpu and cuda, "kNetworkMaxRows not found in csrc/cpu/order_stats.cpp or csrc/cuda/order_stats.cu"
    assert cpu.group(1) == cuda.group(1), f"CPU switches at n={cpu.group(1)}, CUDA at n={cuda.group(1)}"
