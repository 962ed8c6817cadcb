// Host launch API of the CUDA kernels (csrc/cuda/*.cu).
//
// Plain CUDA C++, no torch: every launcher takes device pointers, sizes and a stream, enqueues its
// kernels on that stream and returns the first failing cudaError_t (cudaSuccess otherwise).
// csrc/cuda/bindings.cpp is the only caller; it allocates outputs and workspaces (sizes from the
// *_workspace_bytes functions), dispatches on dtype and checks the returned code.
//
// Conventions shared by all launchers:
//   * G is row-major (n, d), contiguous; T is __half, __nv_bfloat16, float or double and A = acc_t<T>
//     the arithmetic type (float, double for double);
//   * nonfinite is bool[n] (bool[1] for the top-k vector ops); the launcher clears it and the kernels
//     set the rows holding NaN/Inf in the same pass that computes the result (docs/nonfinite.md);
//   * the coordinate-wise ops (sign_sum, rlr, order_mean, invariant, closest_to_median_mean) take
//     `rows`: int64[n] row numbers of G, in range and on the device (repeats allowed), or nullptr
//     for rows 0..n-1. They read row i of their n rows at G + rows[i] * d, so that dropping rows
//     never copies G; n, the ranks, thresholds, weights and flags all count those n rows, in that
//     order, and the result is the op's on G.index_select(0, rows), bit for bit. G may have more
//     rows than n then;
//   * indices and sizes are 64-bit.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "core/common.h"

namespace robustagg {
namespace cuda {

// ---- sign_votes.cu (docs/ops.md)

template <typename T>
cudaError_t sign_sum(const T* G, const int64_t* rows, int64_t n, int64_t d, int32_t* sums, bool* nonfinite,
                     cudaStream_t stream);

// weights: A[n], one per row read, or nullptr for all-ones. A coordinate whose weighted sum
// overflowed although its rows were finite gets core's RescuedMean instead.
template <typename T>
cudaError_t rlr(const T* G, const int64_t* rows, const acc_t<T>* weights, int64_t n, int64_t d, int theta,
                acc_t<T> server_lr, T* out, bool* nonfinite, cudaStream_t stream);

// ---- order_stats.cu (docs/ops.md)

// Workspace of order_mean / invariant for this (n, d, element size of A): for n <= 64 (128 for
// 16/32-bit data) only the flag that starts the overflow redo.
size_t order_stats_workspace_bytes(int64_t n, int64_t d, size_t acc_size);

template <typename T>
cudaError_t order_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out,
                       bool* nonfinite, void* workspace, cudaStream_t stream);

// out = (|sign_sum| >= min_votes) ? order_mean(lo, hi) : 0, with the mask in `mask`.
template <typename T>
cudaError_t invariant(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes,
                      T* out, bool* mask, bool* nonfinite, void* workspace, cudaStream_t stream);

// Workspace of closest_to_median_mean: the network and, when shared memory cannot hold them, the
// threads' slices of n + beta values.
size_t closest_workspace_bytes(int64_t n, int64_t beta, int64_t d, size_t acc_size);

// Per coordinate, the mean of the beta (1..n) values nearest the median (Bulyan).
template <typename T>
cudaError_t closest_to_median_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t beta, T* out,
                                   bool* nonfinite, void* workspace, cudaStream_t stream);

// ---- client_stats.cu (docs/ops.md)

size_t client_stats_workspace_bytes(int64_t n, int64_t d);

// Every statistic is float64 for every T: norm[n], sign_frac[n, 3], dot[n], ref_norm[1] and
// ref_dist[n] (= ||G_i - ref||). ref, dot, ref_norm, ref_dist: nullptr when there is no reference
// vector.
template <typename T>
cudaError_t client_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length,
                         const T* ref, double* norm, double* sign_frac, double* dot, double* ref_norm,
                         double* ref_dist, bool* nonfinite, void* workspace, cudaStream_t stream);

// max_norm: A[n], finite and >= 0. The clipped values are formed in float64 and rounded once.
template <typename T>
cudaError_t clip_rows(const T* G, int64_t n, int64_t d, const acc_t<T>* max_norm, T* out, bool* nonfinite,
                      void* workspace, cudaStream_t stream);

// ---- topk.cu (docs/ops.md)

size_t topk_workspace_bytes(int64_t d, size_t acc_size);

// Top-k with error feedback, k_sel = min(k, d) selected. Updates error and momentum in place
// unless u holds NaN/Inf; then it sets *host_nonfinite, leaves the state untouched and writes no
// outputs. indices: int64[k_sel] ascending; values: T[k_sel]. rho is rounded to A once; rho == 0
// (tested on the double, like the CPU kernel) means momentum = u. Momentum and error saturate at the
// largest finite value of T. Synchronizes the stream once, to learn whether u was finite.
template <typename T>
cudaError_t topk_ef_step(const T* u, T* error, T* momentum, int64_t d, int64_t k, double rho,
                         int64_t* indices, T* values, bool* nonfinite, bool* host_nonfinite, void* workspace,
                         cudaStream_t stream);

// Stateless top-k by magnitude, k_sel = min(k, d) selected; never synchronizes.
template <typename T>
cudaError_t topk_abs(const T* x, int64_t d, int64_t k, int64_t* indices, T* values, bool* nonfinite,
                     void* workspace, cudaStream_t stream);

// ---- maxpool.cu (docs/ops.md)

size_t maxpool_workspace_bytes(int64_t num_segments);

// segments: int64[S, 5] on the device, rows (in_offset, rows, cols, pooled, out_offset).
// out: T[n, out_width] (restore: out_width == d).
template <typename T>
cudaError_t maxpool_amplify(const T* G, int64_t n, int64_t d, const int64_t* segments, int64_t num_segments,
                            int64_t kernel, bool restore, int64_t out_width, T* out, bool* nonfinite,
                            void* workspace, cudaStream_t stream);

// ---- pairwise.cu (docs/ops.md)

size_t pairwise_workspace_bytes(int64_t n, int64_t d);

// out: float64[n, n] for every T.
template <typename T>
cudaError_t pairwise_sqdist(const T* G, int64_t n, int64_t d, double* out, bool* nonfinite, void* workspace,
                            cudaStream_t stream);

template <typename T>
cudaError_t pairwise_cosine(const T* G, int64_t n, int64_t d, double* out, bool* nonfinite, void* workspace,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace robustagg
