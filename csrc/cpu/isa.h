// Runtime choice of the x86 vector ISA for the hot loops of the CPU kernels.
//
// The default build is portable (no -march=native), which would leave the loops at SSE2. Each hot
// loop is written once as an always-inline template body; thin wrappers compile that body with
// `target("avx2")` / `target("avx512f,...")` and cpu_isa() picks one at run time. The bodies use
// fixed-width lane accumulators, so every ISA performs the same floating-point operations in the
// same order and the results are bitwise identical whichever wrapper runs.
#pragma once

#define RA_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define RA_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define RA_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,f16c")))
#else
#define RA_TARGET_AVX2
#define RA_TARGET_AVX512
#endif

namespace robustagg {
namespace cpu {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace cpu
}  // namespace robustagg

#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// The 64-byte vectors below are passed only between always-inline functions, so the ABI note
// GCC gives for 64-byte vector returns outside AVX-512 code does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace robustagg {
namespace cpu {

// Eight float64 lanes (GNU vector extension, not intrinsics): one AVX-512 register, two AVX2
// registers or four SSE2 registers, with the same per-lane arithmetic on each.
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
RA_TARGET_AVX512 inline f64x8 load_f64x8_avx512(const float* p) {
  return reinterpret_cast<f64x8>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
}
#pragma GCC diagnostic pop
#endif

// load_f64x8 through the fastest conversion that `isa` allows.
template <Isa isa, typename T> RA_ALWAYS_INLINE f64x8 load_f64x8_on(const T* p) {
#if defined(__x86_64__)
  if constexpr (isa == Isa::kAvx512 && std::is_same<T, float>::value) return load_f64x8_avx512(p);
#endif
  return load_f64x8(p);
}


// Sum of the lanes in a fixed pairwise order.
RA_ALWAYS_INLINE double fold_f64x8(f64x8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

}  // namespace cpu
}  // namespace robustagg
