// Entry points of the C++ CPU kernels. csrc/cpu/bindings.cpp checks and allocates the tensors and
// calls these with raw, contiguous pointers; T is c10::Half, c10::BFloat16, float or double, and A
// the arithmetic type acc_t<T> (csrc/core/common.h). Every function reports non-finite input in
// the same pass as its result and never throws on NaN/Inf.
//
// The coordinate-wise kernels (sign votes, order statistics) read n rows of G, given by `rows`:
// row i is row rows[i] of G, or row i itself when rows is null (core's selected_row). Their
// nonfinite flags and rlr's weights have one entry per row read.
#pragma once
#include <cstdint>

#include "core/common.h"

namespace robustagg {
namespace cpu {

// docs/ops.md; sums is int32[d].
template <typename T>
void sign_sum(const T* G, const int64_t* rows, int64_t n, int64_t d, int32_t* sums, bool* nonfinite);

// docs/ops.md; weights is A[n], or null for all-ones.
template <typename T>
void rlr(const T* G, const int64_t* rows, int64_t n, int64_t d, const acc_t<T>* weights, int64_t theta,
         double server_lr, T* out, bool* nonfinite);

// docs/ops.md: the mean of sorted positions lo..hi-1 per coordinate.
template <typename T>
void order_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out,
                bool* nonfinite);

// out = (|sign_sum| >= min_votes) ? order_mean(lo, hi) : 0, with the mask in `mask`.
template <typename T>
void invariant(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, int64_t min_votes,
               T* out, bool* mask, bool* nonfinite);

// docs/ops.md: per coordinate, the mean of the beta (1..n) values nearest the median.
template <typename T>
void closest_to_median_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t beta, T* out,
                            bool* nonfinite);

// docs/ops.md, every statistic in float64. ref may be null (then dot, ref_norm and ref_dist are
// not written). frac is [n, 3].
template <typename T>
void client_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length, const T* ref,
                  double* norm, double* frac, double* dot, double* ref_norm, double* ref_dist, bool* nonfinite);

// docs/ops.md: out_i = G_i * min(1, max_norm_i / |G_i|), computed in float64.
template <typename T>
void clip_rows(const T* G, int64_t n, int64_t d, const acc_t<T>* max_norm, T* out, bool* nonfinite);

// docs/ops.md. Writes min(k, d) ascending indices and values, updates error and momentum in place.
// Returns false, leaving error and momentum untouched, when u holds NaN/Inf.
template <typename T>
bool topk_ef_step(const T* u, T* error, T* momentum, int64_t d, int64_t k, double rho, int64_t* indices,
                  T* values);

// docs/ops.md stateless form. Returns false when x holds NaN/Inf (the outputs are still written,
// with NaN counted as the largest magnitude).
template <typename T>
bool topk_abs(const T* x, int64_t d, int64_t k, int64_t* indices, T* values);

// docs/ops.md. table is int64[segments, 5]; out is [n, out_width].
template <typename T>
void maxpool_amplify(const T* G, int64_t n, int64_t d, const int64_t* table, int64_t segments, int64_t kernel,
                     bool restore, int64_t out_width, T* out, bool* nonfinite);

// docs/ops.md; out is [n, n] in float64.
template <typename T>
void pairwise(const T* G, int64_t n, int64_t d, bool cosine, double* out, bool* nonfinite);

}  // namespace cpu
}  // namespace robustagg
