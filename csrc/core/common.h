// Shared definitions for the per-coordinate math used by both the CPU and the CUDA kernels.
#pragma once
#include <cstdint>

// Marks a function callable from host and device code, so that the CPU and CUDA backends run the
// same arithmetic (docs/backends.md).
#if defined(__CUDACC__)
#define RA_HD __host__ __device__ __forceinline__
#else
#define RA_HD inline
#endif

// Applies M (a macro that declares one explicit instantiation) to the four storage types of
// docs/backends.md; each backend names its own 16-bit types (c10::Half/c10::BFloat16, __half/__nv_bfloat16).
#define RA_FOR_EACH_DTYPE(M, HALF, BFLOAT16) M(HALF) M(BFLOAT16) M(float) M(double)

namespace robustagg {

// Arithmetic type per storage type (docs/backends.md): float32 for 16/32-bit inputs, float64 for float64.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// True for NaN and ±Inf: x - x is 0 for every finite x and NaN otherwise. Needs no <cmath> on
// either side and is shared by every op's same-pass non-finite detection (docs/nonfinite.md).
template <typename A>
RA_HD bool is_nonfinite(A x) {
  return !(x - x == A(0));
}

// True for ±Inf only: where a sum of finite values overflowed (NaN means a NaN was added).
template <typename A>
RA_HD bool is_infinite(A x) {
  return x == x && !(x - x == A(0));
}

// x limited to [-limit, limit] (NaN passes through).
template <typename A>
RA_HD A saturate(A x, A limit) {
  return x > limit ? limit : (x < -limit ? -limit : x);
}

// Row i of the rows a coordinate-wise op reads (docs/ops.md, the `rows` argument): row rows[i] of G
// when the op was given a row selection, row i when rows is null. A selection is read in place, so
// dropping rows never copies G. Without one nothing more is loaded, and on a GPU the test is the
// same for every thread, so the branch never diverges.
template <typename T>
RA_HD const T* selected_row(const T* G, const int64_t* rows, int64_t i, int64_t d) {
  return G + (rows ? rows[i] : i) * d;
}

// Power-of-two scales for float64 values whose squares or products would overflow or underflow
// (docs/nonfinite.md): |x| * 2^-600 <= 2^424 for every float64, and a value below 2^-450 times 2^600 is a
// normal number whose square is one too. Multiplying by a power of two is exact in that range.
constexpr double kScaleDown = 0x1p-600;
constexpr double kScaleUp = 0x1p600;
// A float64 sum of squares below this may have lost squares to underflow.
constexpr double kTinySquares = 0x1p-900;

}  // namespace robustagg
