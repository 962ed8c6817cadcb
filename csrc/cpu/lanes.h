// SIMD lanes for the CPU loops: one 64-byte vector of coordinates (16 floats or 8 doubles), as a
// GCC vector type, so the loops carry no intrinsics and compile for any x86 (or other) target.
// G is row-major, so the W consecutive coordinates of one row are one contiguous vector.
//
// Runtime ISA dispatch: the hot loops are written once and compiled three times through
// RA_CPU_KERNEL (AVX-512, AVX2, baseline). `flatten` inlines every helper (these lane functions,
// the core math) into each copy, so each copy runs on its own instruction set.
// ROBUSTAGG_CPU_ISA=avx512|avx2|baseline caps the level (tests use it to cover every copy).
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

#include "core/common.h"


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

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The best instruction set this CPU (and ROBUSTAGG_CPU_ISA, if set) allows.
inline Isa best_isa() {
  Isa cap = Isa::avx512;
  if (const char* env = std::getenv("ROBUSTAGG_CPU_ISA")) {
    if (std::strcmp(env, "baseline") == 0) cap = Isa::baseline;
    if (std::strcmp(env, "avx2") == 0) cap = Isa::avx2;
  }
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  bool avx2 = __builtin_cpu_supports("avx2");
  if (avx512 && cap >= Isa::avx512) return Isa::avx512;
  if (avx2 && cap >= Isa::avx2) return Isa::avx2;
  return Isa::baseline;
}

}  // namespace robustagg::cpu

// Defines NAME_avx512, NAME_avx2 and NAME_baseline from one body, NAME_body, a function template
// over TPARAMS, and NAME(isa, ...), which calls the copy for `isa` (from best_isa(), resolved once
// per call of an op). Usage:
//   RA_CPU_KERNEL(order_tiles, (typename T, bool kVotes), (T, kVotes),
//                 (const Job<T>& job, int64_t begin, int64_t end), (job, begin, end))
#define RA_CPU_KERNEL(NAME, TPARAMS, TARGS, PARAMS, ARGS)                                          \
  template <RA_UNPAREN TPARAMS>                                                                    \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), flatten)) void NAME##_avx512      \
      PARAMS {                                                                                     \
    NAME##_body<RA_UNPAREN TARGS> ARGS;                                                            \
  }                                                                                                \
  template <RA_UNPAREN TPARAMS>                                                                    \
  __attribute__((target("avx2"), flatten)) void NAME##_avx2 PARAMS {                               \
    NAME##_body<RA_UNPAREN TARGS> ARGS;                                                            \
  }                                                                                                \
  template <RA_UNPAREN TPARAMS>                                                                    \
  __attribute__((flatten)) void NAME##_baseline PARAMS {                                           \
    NAME##_body<RA_UNPAREN TARGS> ARGS;                                                            \
  }                                                                                                \
  template <RA_UNPAREN TPARAMS>                                                                    \
  void NAME(::robustagg::cpu::Isa isa, RA_UNPAREN PARAMS) {                                        \
    switch (isa) {                                                                                 \
      case ::robustagg::cpu::Isa::avx512: NAME##_avx512<RA_UNPAREN TARGS> ARGS; break;             \
      case ::robustagg::cpu::Isa::avx2: NAME##_avx2<RA_UNPAREN TARGS> ARGS; break;                 \
      default: NAME##_baseline<RA_UNPAREN TARGS> ARGS; break;                                      \
    }                                                                                              \
  }
#define RA_UNPAREN(...) __VA_ARGS__
