// Per-coordinate math of the sign-vote family (docs/ops.md), shared by the CPU and CUDA
// kernels. Everything here works on one coordinate's values in the accumulator type A
// (acc_t<T>: float, or double for double inputs).
//
// API (stable; the CUDA kernels call these):
//   int  sign_vote(A x)                    +1, -1, or 0 for ±0 (and for NaN)
//   bool is_nonfinite(A x)                 true for NaN and ±Inf (defined in core/common.h)
//   bool invariant_keeps(int votes, int min_votes)
//                                          Invariant Aggregator's AND-mask: |votes| >= min_votes
//   I    invariant_keeps_lanes(I votes, I min_votes)
//                                          the same test on a vector of counts (CPU lanes; a
//                                          GCC integer vector): -1 in the kept lanes, 0 elsewhere
//   A    rlr_accumulate(A sum, A w, A x)   one step of sum_i w_i * x_i; rows are added in
//                                          ascending row order, starting from sum = 0
//   A    rlr_finish(int votes, int theta, A weighted_sum, A weight_total, A server_lr)
//                                          (|votes| >= theta ? +lr : -lr) * (weighted_sum / weight_total)
//   A    rlr_apply(int votes, int theta, A mean, A server_lr)
//                                          the same for a mean already formed
//   RescuedMean, rescued_mean_add, rescued_mean_value
//                                          the weighted mean where the weighted sum overflowed
//                                          (is_infinite) although the coordinate's rows were finite
//
// Bitwise agreement between backends: rlr adds w_i * x_i for i = 0, 1, ..., n-1 (w_i = 1 when
// the caller passes no weights; 1 * x is exact, so the unweighted loop may add x directly), then
// divides once by the total weight (w_0 + w_1 + ... + w_{n-1}, added in that order; n when
// unweighted) and multiplies by ±lr. Kernels are compiled without
// floating-point contraction, so w * x + sum is never fused into an FMA.
#pragma once
#include "core/common.h"

namespace robustagg {

template <typename A>
RA_HD int sign_vote(A x) {
  return static_cast<int>(x > A(0)) - static_cast<int>(x < A(0));
}

// Invariant Aggregator (docs/ops.md): the coordinate is kept when its sign agreement |s_j| / n
// passes tau. ops.invariant turns (tau, strict) into the integer threshold min_votes, so every
// backend decides the mask with the same integer comparison.
RA_HD bool invariant_keeps(int votes, int min_votes) {
  return (votes < 0 ? -votes : votes) >= min_votes;
}

template <typename I>
RA_HD I invariant_keeps_lanes(I votes, I min_votes) {
  return (votes >= min_votes) | (-votes >= min_votes);
}

template <typename A>
RA_HD A rlr_accumulate(A sum, A w, A x) {
  return sum + w * x;
}

// Robust learning rate (Ozdayi et al. 2021, Eq. 3): the server lr keeps its sign where at least
// theta clients agree on the sign of the coordinate, and flips it elsewhere.
template <typename A>
RA_HD A rlr_apply(int votes, int theta, A mean, A server_lr) {
  A lr = (votes < 0 ? -votes : votes) >= theta ? server_lr : -server_lr;
  return lr * mean;
}

template <typename A>
RA_HD A rlr_finish(int votes, int theta, A weighted_sum, A weight_total, A server_lr) {
  return rlr_apply(votes, theta, weighted_sum / weight_total, server_lr);
}

// The weighted mean of a coordinate whose rows were all finite but whose weighted sum overflowed
// (two 3e38 rows in float32): sum_i (w_i / W) x_i in float64, rows in ascending order, where no
// term exceeds its |x_i|; clamped to [min_i x_i, max_i x_i], which rounding could leave by an ulp
// (reference.weighted_mean, docs/nonfinite.md). Feed rows 0, 1, ..., n-1 with their share w_i / W.
struct RescuedMean {
  double sum, lo, hi;
};

RA_HD void rescued_mean_add(RescuedMean& m, int64_t row, double share, double x) {
  m.sum = row == 0 ? share * x : m.sum + share * x;
  m.lo = row == 0 || x < m.lo ? x : m.lo;
  m.hi = row == 0 || m.hi < x ? x : m.hi;
}

RA_HD double rescued_mean_value(const RescuedMean& m) {
  return m.sum < m.lo ? m.lo : (m.hi < m.sum ? m.hi : m.sum);
}

}  // namespace robustagg
