// Per-element math of client_stats and clip_rows (docs/ops.md), shared by the CPU and CUDA kernels.
//
// A kernel keeps one RowStats per (row, column block), feeds every value of the block to its sums
// with row_sums_add (and row_sums_add_ref when a reference vector is given), counts signs only
// for columns inside the window, merges blocks in a fixed order with row_stats_merge, and
// finishes with scaled_norm / dot_value / sign_fraction. clip_factor is the clipping rule of
// reference.clip_rows. Every statistic is float64: n numbers whose exact values may not fit
// float32.
//
// kScaled is true for float64 input. A 16/32-bit value squares in float64 to at most ~1.2e77
// and at least 2^-298, so a plain float64 sum is safe. A float64 value beyond ~1.3e154 squares to
// Inf and one below ~1.5e-162 to 0, so float64 kernels also add the squares of x * 2^-600 and
// x * 2^600 (core/common.h): when the plain sum overflowed, every square of the first is in range;
// when it is below 2^-900, every value is below 2^-450 and the squares of the second are normal
// numbers. The chosen sum is the plain sum of an exactly rescaled row, the way LAPACK's nrm2
// avoids overflow, so a norm or distance that fits float64 is returned (docs/nonfinite.md).
#pragma once
#include <cmath>

#include "core/common.h"

namespace robustagg {

// Sign classes counted by client_stats: index into sign_frac[:, 3] = (> 0, == 0, < 0).
enum SignClass : int { kPositive = 0, kZero = 1, kNegative = 2 };

// sign_frac column of x. NaN is counted in none of the classes; its row is flagged non-finite.
RA_HD int sign_class(double x) { return x > 0 ? kPositive : (x < 0 ? kNegative : (x == 0 ? kZero : -1)); }

// Sums of squares: plain, and (kScaled) of the values scaled down and up. V is double (CUDA: one
// thread's sums) or a SIMD vector of doubles (CPU: one sum per lane, folded afterwards).
template <typename V>
struct SquareSums {
  V plain, down, up;
};

// Dot products: plain, and (kScaled) with both factors scaled down, for where the plain one
// overflowed.
template <typename V>
struct DotSums {
  V plain, down;
};

// The sums of one row over a range of columns: squares, and with a reference vector the dot with
// it and the squared differences from it.
template <typename V>
struct RowSums {
  SquareSums<V> sumsq;
  DotSums<V> dot;
  SquareSums<V> dist;
};

// A row's statistics over a range of columns: its sums and the window's sign counts.
struct RowStats {
  RowSums<double> sums;
  int64_t count[3];
};

template <typename V>
RA_HD void row_sums_init(RowSums<V>& s) {
  s.sumsq.plain = s.sumsq.down = s.sumsq.up = V{};
  s.dist.plain = s.dist.down = s.dist.up = V{};
  s.dot.plain = s.dot.down = V{};
}

template <bool kScaled, typename V>
RA_HD void square_sums_add(SquareSums<V>& s, V x) {
  s.plain += x * x;
  if (kScaled) {
    const V a = x * kScaleDown, b = x * kScaleUp;
    s.down += a * a;
    s.up += b * b;
  }
}

template <bool kScaled, typename V>
RA_HD void row_sums_add(RowSums<V>& s, V x) {
  square_sums_add<kScaled>(s.sumsq, x);
}

// The dot product with the reference value r and the squared difference from it. x - r rounds
// once (to Inf only where |x - r| itself exceeds the float64 range) and is then scaled exactly.
template <bool kScaled, typename V>
RA_HD void row_sums_add_ref(RowSums<V>& s, V x, V r) {
  s.dot.plain += x * r;
  if (kScaled) s.dot.down += (x * kScaleDown) * (r * kScaleDown);
  square_sums_add<kScaled>(s.dist, x - r);
}

// Adds the sums `b` of later columns into `a`; callers merge in column order (deterministic).
template <typename V>
RA_HD void row_sums_merge(RowSums<V>& a, const RowSums<V>& b) {
  a.sumsq.plain += b.sumsq.plain;
  a.sumsq.down += b.sumsq.down;
  a.sumsq.up += b.sumsq.up;
  a.dist.plain += b.dist.plain;
  a.dist.down += b.dist.down;
  a.dist.up += b.dist.up;
  a.dot.plain += b.dot.plain;
  a.dot.down += b.dot.down;
}

RA_HD void row_stats_init(RowStats& s) {
  row_sums_init(s.sums);
  s.count[0] = s.count[1] = s.count[2] = 0;
}

RA_HD void row_stats_merge(RowStats& a, const RowStats& b) {
  row_sums_merge(a.sums, b.sums);
  for (int c = 0; c < 3; ++c) a.count[c] += b.count[c];
}

// True when the row held NaN/Inf. The plain sum cannot overflow for 16/32-bit input, nor the
// scaled-down one for float64 (|x 2^-600|^2 <= 2^848), so either is non-finite exactly then.
template <bool kScaled>
RA_HD bool row_nonfinite(const RowSums<double>& s) {
  const double sum = kScaled ? s.sumsq.down : s.sumsq.plain;
  return !(sum - sum == 0.0);
}

// A norm as value / scale with value = ||x * scale|| in range; value / scale itself overflows
// only where the norm does not fit float64.
struct ScaledNorm {
  double value, scale;
};

template <bool kScaled>
RA_HD ScaledNorm scaled_norm(const SquareSums<double>& s) {
  if (kScaled && is_infinite(s.plain)) return ScaledNorm{sqrt(s.down), kScaleDown};
  if (kScaled && s.plain < kTinySquares) return ScaledNorm{sqrt(s.up), kScaleUp};
  return ScaledNorm{sqrt(s.plain), 1.0};
}

RA_HD double norm_value(ScaledNorm n) { return n.value / n.scale; }

// The dot product: the plain sum, or where that overflowed (to Inf, or to NaN through
// Inf - Inf) while the scaled one is finite, the scaled one times 2^1200, in two exact steps.
template <bool kScaled>
RA_HD double dot_value(const DotSums<double>& s) {
  if (kScaled && is_nonfinite(s.plain) && !is_nonfinite(s.down)) return s.down * kScaleUp * kScaleUp;
  return s.plain;
}

// Fraction of `length` window columns in class c, computed in float64 like the reference.
RA_HD double sign_fraction(const RowStats& s, int c, int64_t length) {
  return static_cast<double>(s.count[c]) / static_cast<double>(length);
}

// reference.clip_rows: a row with ||x|| > max_norm becomes (x * pre) * factor with
// pre = its norm's scale and factor = max_norm / ||x * pre||, in float64; any other row is kept
// as it is (pre = factor = 1), so a zero row stays zero and never becomes NaN. The test
// value > max_norm * scale is ||x|| > max_norm without forming ||x||, which may overflow: for a
// tiny row max_norm * 2^600 may overflow (then the row is not clipped, rightly), for a huge row
// max_norm * 2^-600 may underflow (then it is clipped, rightly).
struct ClipFactor {
  double pre, factor;
};

RA_HD ClipFactor clip_factor(ScaledNorm n, double max_norm) {
  if (!(n.value > max_norm * n.scale)) return ClipFactor{1.0, 1.0};
  return ClipFactor{n.scale, max_norm / n.value};
}

RA_HD double clip_value(ClipFactor f, double x) { return (x * f.pre) * f.factor; }

}  // namespace robustagg
