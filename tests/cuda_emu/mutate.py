"""Mutation check of tests/test_cuda_emulated.py: does the suite catch broken kernels?

Each mutation below breaks a copy of csrc in one place, the way a CUDA kernel typically goes
wrong (a missing barrier, a wrong warp-shuffle offset, an off-by-one workspace, a logic slip), and
runs the part of the suite that should notice, on the plain, the AddressSanitizer or the
ThreadSanitizer build. A mutation the suite does not catch is a hole in the tests.

    python tests/cuda_emu/mutate.py [NAME_PREFIX ...]

Prints one line per mutation: caught (and how) or MISSED. Takes a few minutes; not part of the
pytest run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# name: (file under csrc, text, replacement, sanitizer or None, pytest -k selection)
MUTATIONS = {
    "client_stats: no barrier before the warp totals are merged": (
        "cuda/client_stats.cu", "  if (lane == 0) warp_totals[warp] = s;\n  __syncthreads();\n",
        "  if (lane == 0) warp_totals[warp] = s;\n", None, "client_stats or clip_rows"),
    "client_stats: warp sum skips the offset-16 step": (
        "cuda/client_stats.cu", "warp_sum(double x) {\n  for (int offset = 16;",
        "warp_sum(double x) {\n  for (int offset = 8;", None, "client_stats or clip_rows"),
    "topk: no barrier after block_rank reads the warp counts": (
        "cuda/topk.cu", "  __syncthreads();\n  return before + __popc", "  return before + __popc", None, "topk"),
    "topk: inclusive scan adds lanes below the offset": (
        "cuda/topk.cu", "    if (lane >= offset) x += y;", "    x += y;", None, "topk"),
    "topk: keys leaving the running above the prefix are counted only in the last digit pass": (
        "cuda/topk.cu", "above_prefix[blockIdx.x] += sum;", "above_prefix[blockIdx.x] = sum;", None, "topk"),
    "topk: a buffer pass keeps every candidate instead of those matching the prefix": (
        "cuda/topk.cu", "if (match) keys[begin + slot + rank] = key;",
        "if (i < length) keys[begin + slot + rank] = key;", None, "topk"),
    "pairwise: no barrier before the next tile overwrites shared memory": (
        "cuda/pairwise.cu", "    __syncthreads();\n  }\n  double* out", "  }\n  double* out", None, "pairwise"),
    "rlr: no barrier after thread 0 stores the weight total": (
        "cuda/sign_votes.cu", "    weight_total = total;\n  }\n  __syncthreads();\n",
        "    weight_total = total;\n  }\n", None, "rlr"),
    "maxpool: the first value of a window does not start the max": (
        "cuda/maxpool.cu", "if ((a == 0 && b == 0) || window_takes(x, best))", "if (window_takes(x, best))", None,
        "maxpool"),
    "order_stats: register kernel reads one row too many": (
        "cuda/order_stats.cu", "      if (i < n) {\n        const A x = load_acc(selected_row(G, rows, i, d) + j);",
        "      if (i <= n && i < N) {\n        const A x = load_acc(selected_row(G, rows, i, d) + j);", None,
        "order_mean"),
    "order_stats: global scratch one value short (ASan)": (
        "cuda/order_stats.cu",
        "plan.workspace_bytes += static_cast<size_t>(plan.blocks) * plan.threads * n * acc_size;",
        "plan.workspace_bytes += static_cast<size_t>(plan.blocks) * plan.threads * n * acc_size - acc_size;",
        "address", "large_n"),
    "topk: no barrier after block_rank reads the warp counts (TSan)": (
        "cuda/topk.cu", "  __syncthreads();\n  return before + __popc", "  return before + __popc", "thread",
        "every_schedule and topk_abs"),
    "client_stats: no barrier before the warp totals are merged (TSan)": (
        "cuda/client_stats.cu", "  if (lane == 0) warp_totals[warp] = s;\n  __syncthreads();\n",
        "  if (lane == 0) warp_totals[warp] = s;\n", "thread", "every_schedule and client_stats"),
    # ---- issue 10: no finite input gives Inf/NaN where the exact result is finite (docs/nonfinite.md)
    "client_stats: float64 rows add only the plain squares": (
        "cuda/client_stats.cu", "  constexpr bool kScaled = kScaledSums<T>;\n  RowStats s;",
        "  constexpr bool kScaled = false;\n  RowStats s;", None, "client_stats or clip_rows"),
    "client_stats: the block reduction drops the scaled-down squares": (
        "cuda/client_stats.cu", "  s.down = warp_sum(s.down);\n", "", None, "client_stats or clip_rows"),
    "clip_rows: the factor applied in the arithmetic type, without the row's power of two": (
        "cuda/client_stats.cu", "from_acc<T>(static_cast<acc_t<T>>(clip_value(f, x)))",
        "from_acc<T>(static_cast<acc_t<T>>(x) * static_cast<acc_t<T>>(f.factor))", None, "clip_rows"),
    "order_stats: the register kernels never start the overflow redo": (
        "cuda/order_stats.cu", "    if (is_infinite(mean)) atomicOr(overflowed, 1u);\n", "", None, "overflow"),
    "order_stats: the redo kernel also redoes columns holding NaN/Inf": (
        "cuda/order_stats.cu", "    if (finite) out[j] = from_acc<T>(order_mean_select(column, n, lo, hi));",
        "    out[j] = from_acc<T>(order_mean_select(column, n, lo, hi));", None, "overflow"),
    "order_stats: the slice kernel's network path does not redo an overflowed mean": (
        "cuda/order_stats.cu", "      if (finite && is_infinite(mean)) mean = kept_mean_rescaled(v, lo, hi);\n", "",
        None, "overflow"),
    "order_stats: the slice kernel also redoes columns holding NaN/Inf": (
        "cuda/order_stats.cu", "if (finite && is_infinite(mean)) mean = kept_mean_rescaled(v, lo, hi);",
        "if (is_infinite(mean)) mean = kept_mean_rescaled(v, lo, hi);", None, "overflow"),
    "order_stats: the redo kernel's column copy holds 64 values for every dtype (ASan)": (
        "cuda/order_stats.cu", "  A column[sizeof(A) == sizeof(float) ? kRegisterMaxFloatN : kRegisterMaxN];",
        "  A column[kRegisterMaxN];", "address", "overflowing_kept_sum and registers-100"),
    "order_stats: the overflow flag is a plain store (TSan)": (
        "cuda/order_stats.cu", "    if (is_infinite(mean)) atomicOr(overflowed, 1u);",
        "    if (is_infinite(mean)) *overflowed = 1u;", "thread", "overflowing_kept_sum and float32-registers-18"),
    "rlr: no overflow redo": (
        "cuda/sign_votes.cu",
        "    if (is_infinite(sum)) mean = rescued_rlr_mean<T, kWeighted>(G, rows, weights, n, d, j, weight_total, "
        "mean);\n", "", None, "rlr"),
    "rlr: the overflow redo gives every row weight 1": (
        "cuda/sign_votes.cu", "const double w = kWeighted ? static_cast<double>(__ldg(weights + i)) : 1.0;",
        "const double w = 1.0;", None, "rlr"),
    "topk: the error-feedback state does not saturate": (
        "cuda/topk.cu", "storage_max<T>(), error, momentum);", "positive_infinity<acc_t<T>>(), error, momentum);", None,
        "topk_ef_step"),
    "topk: float16 state saturates at FLT_MAX": (
        "cuda/common.cuh", "storage_max<__half>() { return 65504.0f; }",
        "storage_max<__half>() { return 0x1.fffffep127f; }", None, "topk_ef_step"),
    "pairwise: unsafe float64 rows are left to the Gram matrix": (
        "cuda/pairwise.cu", "return std::is_same<T, double>::value && gram_row_unsafe(gram[i * n + i]);",
        "return false;", None, "pairwise"),
    "pairwise: an unsafe row's own pair is not listed": (
        "cuda/pairwise.cu", "  if (i == j || unsafe) return unsafe;",
        "  if (i == j) return false;\n  if (unsafe) return true;", None, "pairwise"),
    "pairwise: unsafe pairs take the unscaled Gram product": (
        "cuda/pairwise.cu", "scaled ? s.dot : kij", "kij", None, "pairwise"),
    "pairwise: equal rows decided by a zero distance": (
        "cuda/pairwise.cu", "s.differ == 0);", "s.sqdist == 0.0);", None, "pairwise"),
    "pairwise: the warp sum drops the count of differing entries": (
        "cuda/pairwise.cu", "    s.differ += __shfl_down_sync(0xffffffffu, s.differ, offset);\n", "", None, "pairwise"),
    # ---- row selections: every read of G goes through the selection (core's selected_row)
    "selected_row: the selection is ignored": (
        "core/common.h", "return G + (rows ? rows[i] : i) * d;", "return G + i * d;", None, "row_selection"),
    "selected_row: the row number is read one position late (ASan)": (
        "core/common.h", "rows ? rows[i] : i", "rows ? rows[i + 1] : i", "address", "row_selection"),
    "sign_sum: reads rows 0..n-1 of G instead of the selection": (
        "cuda/sign_votes.cu", "load_acc(selected_row(G, rows, i, d) + j);\n      if (is_nonfinite(x)) flag_row",
        "load_acc(G + i * d + j);\n      if (is_nonfinite(x)) flag_row", None, "row_selection and sign_sum"),
    "rlr: the overflow redo reads rows 0..n-1 of G instead of the selection": (
        "cuda/sign_votes.cu", "load_acc(selected_row(G, rows, i, d) + j);\n    if (is_nonfinite(x)) return",
        "load_acc(G + i * d + j);\n    if (is_nonfinite(x)) return", None, "row_selection and rlr"),
    "order_stats: the register kernel reads rows 0..n-1 of G instead of the selection": (
        "cuda/order_stats.cu", "if (i < n) {\n        const A x = load_acc(selected_row(G, rows, i, d) + j);",
        "if (i < n) {\n        const A x = load_acc(G + i * d + j);", None, "row_selection and order_mean"),
    "order_stats: the redo kernel reads rows 0..n-1 of G instead of the selection": (
        "cuda/order_stats.cu", "column[i] = load_acc(selected_row(G, rows, i, d) + j);",
        "column[i] = load_acc(G + i * d + j);", None, "row_selection and overflowing"),
    "order_stats: the slice kernel reads rows 0..n-1 of G instead of the selection": (
        "cuda/order_stats.cu", "load_acc(selected_row(G, rows, i, d) + j);\n      const bool bad",
        "load_acc(G + i * d + j);\n      const bool bad", None, "row_selection and order_mean"),
    "closest_to_median_mean: sorts rows 0..n-1 of G instead of the selection": (
        "cuda/order_stats.cu", "load_acc(selected_row(G, rows, i, d) + j);\n      if (is_nonfinite(x))",
        "load_acc(G + i * d + j);\n      if (is_nonfinite(x))", None, "row_selection and closest"),
    "closest_to_median_mean: a tie is broken in G's row order instead of the selection's": (
        "cuda/order_stats.cu", "[&](int64_t i) { return load_acc(selected_row(G, rows, i, d) + j); };",
        "[&](int64_t i) { return load_acc(G + i * d + j); };", None, "row_selection and closest"),
}

_RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}


def _preload(runtime: str) -> str:
    cxx = os.environ.get("CXX_EMU") or shutil.which("g++")
    paths = [subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in (runtime, "libstdc++.so")]
    return " ".join(paths)


def run(name: str, work: Path) -> str:
    path, text, replacement, sanitizer, selection = MUTATIONS[name]
    csrc = work / "csrc"
    shutil.rmtree(csrc, ignore_errors=True)
    shutil.copytree(ROOT / "csrc", csrc)
    source = (csrc / path).read_text()
    if text not in source:
        return "NOT APPLICABLE (the source changed; update the mutation)"
    (csrc / path).write_text(source.replace(text, replacement, 1))
    env = dict(os.environ, ROBUSTAGG_EMU_CSRC=str(csrc), ROBUSTAGG_EMU_CACHE=str(work / "cache"))
    if sanitizer is not None:
        env.update(ROBUSTAGG_EMU_SANITIZER=sanitizer, ROBUSTAGG_EMU_SCHEDULES="ascending",
                   LD_PRELOAD=_preload(_RUNTIMES[sanitizer]), ASAN_OPTIONS="detect_leaks=0", OMP_NUM_THREADS="1")
        selection = f"({selection}) and not asan and not tsan and not emulator"
    no_capture = ["-s"] if sanitizer is not None else []  # the sanitizer's report goes to stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda_emulated.py"), "-q", "-x",
                           *no_capture, "-p", "no:cacheprovider", "-k", selection], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return "MISSED"
    if "AddressSanitizer" in proc.stderr or "ThreadSanitizer" in proc.stderr:
        return f"caught by {sanitizer} (exit {proc.returncode})"
    if proc.returncode < 0:
        return f"caught: the test process died of signal {-proc.returncode}"
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return f"caught: {failed[0][:110]}" if failed else f"caught: test process exit {proc.returncode}"


def main(prefixes: list[str]) -> int:
    missed = 0
    with tempfile.TemporaryDirectory(prefix="cuda_emu_mutate_") as tmp:
        for name in MUTATIONS:
            if prefixes and not any(name.startswith(p) for p in prefixes):
                continue
            verdict = run(name, Path(tmp))
            missed += verdict.startswith(("MISSED", "NOT"))
            print(f"{name}: {verdict}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
