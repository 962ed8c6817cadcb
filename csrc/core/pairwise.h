// Per-entry math of pairwise_sqdist and pairwise_cosine (docs/ops.md), shared by the CPU and CUDA
// kernels.
//
// The kernels accumulate the Gram matrix K = G G^T in float64 (a float32 product is exact in
// float64), computing every entry K_ij with the same sequence of operations, so bitwise identical
// rows i, j give K_ii == K_jj == K_ij exactly and sqdist_from_gram returns exactly 0 for them.
// Where K_ii + K_jj - 2 K_ij cancels (needs_direct), the kernels recompute the distance from the
// direct differences sum_c (G_ic - G_jc)^2, which is accurate and 0 only for equal rows.
#pragma once
#include <cmath>

#include "core/common.h"

namespace robustagg {

// Relative size of K_ii + K_jj below which the Gram formula loses too many digits. float64
// accumulation over d <= 2^31 terms errs by at most ~d * 2^-53 * (K_ii + K_jj) in the worst case
// and ~sqrt(d) * 2^-53 typically, so distances this small are recomputed directly (within the float64 tolerance of 1e-5 in docs/ops.md).
constexpr double kGramCancellation = 1e-6;

RA_HD double sqdist_from_gram(double kii, double kjj, double kij) {
  const double d2 = (kii + kjj) - 2.0 * kij;
  return d2 < 0.0 ? 0.0 : d2;  // rounding can leave a tiny negative; NaN passes through
}

// True when the Gram distance of rows i, j must be recomputed from direct differences.
RA_HD bool needs_direct(double kii, double kjj, double d2) { return d2 <= kGramCancellation * (kii + kjj); }

// One term of the direct squared distance.
RA_HD double sqdiff(double a, double b) {
  const double t = a - b;
  return t * t;
}

// Float64 rows whose Gram diagonal K_ii overflowed (a value beyond ~1e154) or is below 2^-900
// (values below ~1e-136, or a zero row) are unsafe: their products with other rows can overflow
// or lose every digit. Every pair with an unsafe row comes from a direct pass instead, with each
// row scaled by its row_scale (exact; the cosine does not change): its squared distance from the
// plain differences (which overflow or underflow only where the exact value does), its cosine
// from the scaled products, and equality from a count of differing entries.
RA_HD bool gram_row_unsafe(double kii) { return !(kii >= kTinySquares && kii - kii == 0.0); }

RA_HD double row_scale(double kii) {
  if (!gram_row_unsafe(kii)) return 1.0;
  return kii >= kTinySquares ? kScaleDown : kScaleUp;
}

// Cosine from the Gram entries (or from the scaled direct sums of an unsafe pair): 0 if either row is zero, exactly 1 for equal rows (d2 == 0 from
// the direct differences), otherwise K_ij / (|i| |j|) clamped to [-1, 1].
RA_HD double cosine_from_gram(double kii, double kjj, double kij, bool equal_rows) {
  if (!(kii > 0.0) || !(kjj > 0.0)) return (kii != kii || kjj != kjj || kij != kij) ? kij : 0.0;
  if (equal_rows) return 1.0;
  const double c = kij / (sqrt(kii) * sqrt(kjj));
  return c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
}

}  // namespace robustagg
