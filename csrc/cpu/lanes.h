// SIMD lanes for the CPU loops: one 64-byte vector of coordinates (16 floats or 8 doubles), and
// eight float64 lanes for the loops that accumulate in float64, as GCC vector types, so the loops
// carry no intrinsics and compile for any x86 (or other) target; csrc/cpu/isa.h compiles each
// loop once per instruction set. G is row-major, so the W consecutive coordinates of one row are
// one contiguous vector.
#pragma once
// Vectors wider than the baseline ABI only cross inlined (flattened) calls, never a real call
// boundary between differently compiled code. (Include this header first.)
#pragma GCC diagnostic ignored "-Wpsabi"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/common.h"
#include "cpu/isa.h"

namespace robustagg::cpu {

constexpr int kVectorBytes = 64;

template <typename A>
struct Lanes;

template <>
struct Lanes<float> {
  using V = float __attribute__((vector_size(kVectorBytes)));
  using Mask = int32_t __attribute__((vector_size(kVectorBytes)));  // comparison results: -1 or 0
  using Bytes = int8_t __attribute__((vector_size(16)));            // one byte per lane (bool masks)
  using Count = int32_t;                                             // one lane of Mask
  static constexpr int W = 16;
};

template <>
struct Lanes<double> {
  using V = double __attribute__((vector_size(kVectorBytes)));
  using Mask = int64_t __attribute__((vector_size(kVectorBytes)));
  using Bytes = int8_t __attribute__((vector_size(8)));
  using Count = int64_t;
  static constexpr int W = 8;
};

using u16x16 = uint16_t __attribute__((vector_size(32)));
using u32x16 = uint32_t __attribute__((vector_size(64)));
using f32x16 = Lanes<float>::V;

template <typename V, typename S>
inline V broadcast(S s) {
  return V{} + s;
}

// IEEE half to float, exactly, for 16 lanes: place the half's exponent and mantissa bits at the
// bottom of a float's and scale by 2^(127-15) = 2^112, which is exact for normal and subnormal
// halves alike; Inf and NaN keep an all-ones exponent and their mantissa.
inline f32x16 half_to_float(u16x16 h) {
  u32x16 bits = __builtin_convertvector(h, u32x16);
  u32x16 sign = (bits & 0x8000u) << 16;
  u32x16 magnitude = (bits & 0x7fffu) << 13;
  f32x16 scaled;
  std::memcpy(&scaled, &magnitude, sizeof scaled);
  scaled = scaled * 0x1p112f;
  u32x16 finite_bits;
  std::memcpy(&finite_bits, &scaled, sizeof finite_bits);
  u32x16 special = (u32x16)(magnitude >= (0x7c00u << 13));  // all ones where Inf/NaN
  u32x16 out = ((special & (magnitude | 0x7f800000u)) | (~special & finite_bits)) | sign;
  f32x16 result;
  std::memcpy(&result, &out, sizeof result);
  return result;
}

// bfloat16 is the upper half of a float32.
inline f32x16 bfloat16_to_float(u16x16 h) {
  u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

// One vector of W coordinates of a row, in the accumulator type.
template <typename T>
inline typename Lanes<acc_t<T>>::V load_lanes(const T* p) {
  using V = typename Lanes<acc_t<T>>::V;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    u16x16 h;
    std::memcpy(&h, p, sizeof h);
    if constexpr (std::is_same_v<T, c10::Half>) {
      return half_to_float(h);
    } else {
      return bfloat16_to_float(h);
    }
  }
}

// The last, partial vector of a row: the missing lanes read as zeros (finite, no vote).
template <typename T>
inline typename Lanes<acc_t<T>>::V load_lanes_partial(const T* p, int64_t count) {
  T padded[Lanes<acc_t<T>>::W];
  std::memset(static_cast<void*>(padded), 0, sizeof padded);
  std::memcpy(static_cast<void*>(padded), p, count * sizeof(T));
  return load_lanes(padded);
}

template <typename T, typename V>
inline void store_lanes(T* p, const V& v, int64_t count) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::memcpy(p, &v, count * sizeof(T));
  } else {
    for (int64_t l = 0; l < count; ++l) p[l] = static_cast<T>(v[l]);  // c10: round to nearest even
  }
}

// True when some lane of a NaN-sticky accumulator (a sum of x - x terms) is not zero (NaN is not).
// One vector comparison and an OR of the mask's 64-bit words: the compiler keeps it in vector
// registers, where a loop over the lanes becomes one scalar comparison per lane.
template <typename V>
inline bool any_nonzero(const V& v) {
  const auto nonzero = v != V{};
  uint64_t words[sizeof(nonzero) / sizeof(uint64_t)];
  std::memcpy(words, &nonzero, sizeof(words));
  uint64_t any = 0;
  for (uint64_t word : words) any |= word;
  return any != 0;
}

// Per-thread scratch of vectors, aligned to the vector size (std::vector does not align GCC
// vector types beyond 16 bytes).
template <typename V>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count)
      : data_(static_cast<V*>(std::aligned_alloc(kVectorBytes, std::max<int64_t>(1, count) * sizeof(V)))) {
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  V* data() const { return data_; }

 private:
  V* data_;
};

// ---- eight float64 lanes, for the kernels that accumulate 16/32-bit data in float64

// Eight float64 lanes: one AVX-512 register, two AVX2 registers or four SSE2 registers, with the
// same per-lane arithmetic on each.
typedef double f64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int64_t i64x8 __attribute__((vector_size(64)));

// p[0..7] converted to float64 (16-bit types through float, as acc_t does).
RA_ALWAYS_INLINE f64x8 load_f64x8(const double* p) {
  f64x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
RA_ALWAYS_INLINE f64x8 load_f64x8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, f64x8);
}
template <typename T> RA_ALWAYS_INLINE f64x8 load_f64x8(const T* p) {
  f32x8 v;
  for (int l = 0; l < 8; ++l) v[l] = static_cast<float>(p[l]);
  return __builtin_convertvector(v, f64x8);
}

#if defined(__x86_64__)
// GCC 12 splits the generic float -> double vector conversion into four 256-bit steps; AVX-512
// has it as one instruction. The conversion is exact, so the results do not depend on which runs.
// (GCC 12's _mm512_cvtps_pd starts from an undefined vector it fully overwrites: a false warning.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,f16c"))) inline f64x8 load_f64x8_avx512(
    const float* p) {
  return reinterpret_cast<f64x8>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
}
#pragma GCC diagnostic pop
#endif

// load_f64x8 through the fastest conversion that `isa` allows.
template <Isa isa, typename T> RA_ALWAYS_INLINE f64x8 load_f64x8_on(const T* p) {
#if defined(__x86_64__)
  if constexpr (isa == Isa::avx512 && std::is_same<T, float>::value) return load_f64x8_avx512(p);
#endif
  return load_f64x8(p);
}

// Sum of the lanes in a fixed pairwise order.
RA_ALWAYS_INLINE double fold_f64x8(f64x8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

}  // namespace robustagg::cpu
