// Per-element math of topk_ef_step and topk_abs (docs/ops.md), shared by the CPU and CUDA kernels.
//
// Selection is a radix select over magnitude keys: |x| as an unsigned integer orders exactly like
// |x| (IEEE-754 bit patterns of non-negative floats are monotone), so the k largest |x| are the k
// largest keys, and ties are equal keys, broken by the lower index. NaN keys lie above +Inf, the
// order torch.sort uses, so a propagated NaN is "largest" on every backend.
//
// Kernel outline: (1) ef_update every coordinate and histogram key_bucket of the new error;
// (2) find the bucket holding the k-th largest key; (3) refine inside that bucket on the
// remaining key bits to the exact k-th key T and the number of ties at T to take; (4) emit, in
// index order, keys > T plus the first `ties` keys == T, zeroing error and momentum there.
#pragma once
#include "core/common.h"

namespace robustagg {

// Unsigned integer type holding the magnitude key of an arithmetic type.
template <typename A> struct magnitude_key { using type = uint32_t; };
template <> struct magnitude_key<double> { using type = uint64_t; };
template <typename A> using key_t = typename magnitude_key<A>::type;

// Bits of the key (the sign bit is dropped): 31 for float, 63 for double.
template <typename A> struct key_bits { static constexpr int value = 8 * sizeof(A) - 1; };

RA_HD uint32_t abs_key(float x) {
  union { float f; uint32_t u; } v;
  v.f = x;
  return v.u & 0x7fffffffu;
}

RA_HD uint64_t abs_key(double x) {
  union { double f; uint64_t u; } v;
  v.f = x;
  return v.u & 0x7fffffffffffffffull;
}

// The top `bits` bits of a key: the first-level histogram bucket.
template <typename A> RA_HD uint32_t key_bucket(key_t<A> key, int bits) {
  return static_cast<uint32_t>(key >> (key_bits<A>::value - bits));
}

// SparseFed server step for one coordinate, in the arithmetic type A:
//   momentum = rho * momentum + u  (rho == 0: momentum = u);  error += momentum.
// rho is rounded to A once by the caller, as torch does with a Python scalar. Error feedback can
// legitimately outgrow the dtype (a client that keeps sending 3e38 in float32): momentum and
// error saturate at `limit`, the largest finite value of the storage type, instead of becoming
// Inf (reference.topk_ef_step).
template <typename A> RA_HD void ef_update(A u, A rho, bool use_momentum, A limit, A& error, A& momentum) {
  momentum = saturate(use_momentum ? rho * momentum + u : u, limit);
  error = saturate(error + momentum, limit);
}

}  // namespace robustagg
