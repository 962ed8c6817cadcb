// Per-element math of client_stats and clip_rows (SPEC §4.5), shared by the CPU and CUDA kernels.
//
// A kernel keeps one RowStats per (row, column block), feeds it every value of the block with
// row_stats_add (and row_stats_add_dot when a reference vector is given), counts signs only for
// columns inside the window, merges blocks in a fixed order with row_stats_merge, and finishes
// with row_norm / sign_fraction. clip_factor is the clipping rule of reference.clip_rows.
#pragma once
#include <cmath>

#include "core/common.h"

namespace robustagg {

// Sign classes counted by client_stats: index into sign_frac[:, 3] = (> 0, == 0, < 0).
enum SignClass : int { kPositive = 0, kZero = 1, kNegative = 2 };

// sign_frac column of x. NaN is counted in none of the classes; its row is flagged non-finite.
RA_HD int sign_class(double x) { return x > 0 ? kPositive : (x < 0 ? kNegative : (x == 0 ? kZero : -1)); }

// Partial statistics of one row over a range of columns. Squares and products accumulate in
// float64: a float32 value squares to at most ~1.2e77, so a finite float32/16-bit row never
// overflows and Inf/NaN in sumsq is exactly "the row holds a non-finite value" (SPEC §3).
struct RowStats {
  double sumsq;
  double dot;
  int64_t count[3];
};

RA_HD void row_stats_init(RowStats& s) {
  s.sumsq = 0.0;
  s.dot = 0.0;
  s.count[0] = s.count[1] = s.count[2] = 0;
}

RA_HD void row_stats_add(RowStats& s, double x) { s.sumsq += x * x; }

RA_HD void row_stats_add_dot(RowStats& s, double x, double ref) { s.dot += x * ref; }

RA_HD void row_stats_count_sign(RowStats& s, double x) {
  const int c = sign_class(x);
  if (c >= 0) s.count[c] += 1;
}

// Adds block `b` into `a`; callers merge blocks in column order so the result is deterministic.
RA_HD void row_stats_merge(RowStats& a, const RowStats& b) {
  a.sumsq += b.sumsq;
  a.dot += b.dot;
  for (int c = 0; c < 3; ++c) a.count[c] += b.count[c];
}

// True when the row held NaN/Inf. Valid for 16/32-bit inputs (squares cannot overflow float64);
// float64 kernels must also test the values themselves (a 1e200 squares to Inf).
RA_HD bool row_sumsq_nonfinite(double sumsq) { return !(sumsq - sumsq == 0.0); }

RA_HD double row_norm(const RowStats& s) { return sqrt(s.sumsq); }

// Fraction of `length` window columns in class c, computed in float64 like the reference.
RA_HD double sign_fraction(const RowStats& s, int c, int64_t length) {
  return static_cast<double>(s.count[c]) / static_cast<double>(length);
}

// reference.clip_scale: min(1, max_norm / norm) in float64; exactly 1 for a zero row, so a zero
// row stays zero and never becomes NaN. The caller rounds it to the arithmetic type once and
// multiplies every value of the row by it in that type.
RA_HD double clip_factor(double norm, double max_norm) { return norm > max_norm ? max_norm / norm : 1.0; }

}  // namespace robustagg
