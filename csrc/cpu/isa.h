// Runtime choice of the x86 vector ISA for the hot loops of the CPU kernels.
//
// The default build is portable (no -march=native), which would leave the loops at SSE2. Each hot
// loop is written once, as a function template NAME_body whose first template argument is the
// Isa it is compiled for; RA_CPU_KERNEL compiles that body three times (AVX-512, AVX2, baseline,
// with `flatten` so that every helper and the core math are inlined into each copy and run on its
// instruction set) and NAME(isa, ...) calls the copy for best_isa(). The bodies use fixed-width
// lanes, so every copy performs the same floating-point operations in the same order and the
// results are bitwise identical whichever runs (the tests compare every copy, docs/backends.md).
//
// ROBUSTAGG_CPU_ISA=avx512|avx2|baseline caps the level, read on every call of an op.
#pragma once
#include <cstdlib>
#include <cstring>

#define RA_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define RA_TARGET_AVX2 __attribute__((target("avx2,f16c"), flatten))
#define RA_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,f16c"), flatten))
#else
#define RA_TARGET_AVX2 __attribute__((flatten))
#define RA_TARGET_AVX512 __attribute__((flatten))
#endif

namespace robustagg {
namespace cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The best instruction set this CPU supports, detected once.
inline Isa hardware_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::avx2;
#endif
    return Isa::baseline;
  }();
  return isa;
}

// The best instruction set this CPU and ROBUSTAGG_CPU_ISA allow.
inline Isa best_isa() {
  Isa cap = Isa::avx512;
  if (const char* env = std::getenv("ROBUSTAGG_CPU_ISA")) {
    if (std::strcmp(env, "baseline") == 0) cap = Isa::baseline;
    if (std::strcmp(env, "avx2") == 0) cap = Isa::avx2;
  }
  const Isa hardware = hardware_isa();
  return hardware < cap ? hardware : cap;
}

}  // namespace cpu
}  // namespace robustagg

// Defines NAME_avx512, NAME_avx2 and NAME_baseline from NAME_body<Isa, TARGS...>, and
// NAME(isa, ...), which returns what the copy for `isa` returns. Usage:
//   RA_CPU_KERNEL(order_tiles, (typename T, bool kVotes), (T, kVotes),
//                 (const Job<T>& job, int64_t begin, int64_t end), (job, begin, end))
// defines order_tiles<T, kVotes>(isa, job, begin, end) over
//   template <Isa isa, typename T, bool kVotes> void order_tiles_body(const Job<T>&, int64_t, int64_t);
#define RA_CPU_KERNEL(NAME, TPARAMS, TARGS, PARAMS, ARGS)                                                   \
  template <RA_UNPAREN TPARAMS>                                                                             \
  RA_TARGET_AVX512 auto NAME##_avx512 PARAMS {                                                              \
    return NAME##_body<::robustagg::cpu::Isa::avx512, RA_UNPAREN TARGS> ARGS;                               \
  }                                                                                                         \
  template <RA_UNPAREN TPARAMS>                                                                             \
  RA_TARGET_AVX2 auto NAME##_avx2 PARAMS {                                                                  \
    return NAME##_body<::robustagg::cpu::Isa::avx2, RA_UNPAREN TARGS> ARGS;                                 \
  }                                                                                                         \
  template <RA_UNPAREN TPARAMS>                                                                             \
  __attribute__((flatten)) auto NAME##_baseline PARAMS {                                                    \
    return NAME##_body<::robustagg::cpu::Isa::baseline, RA_UNPAREN TARGS> ARGS;                             \
  }                                                                                                         \
  template <RA_UNPAREN TPARAMS>                                                                             \
  auto NAME(::robustagg::cpu::Isa isa, RA_UNPAREN PARAMS) {                                                 \
    switch (isa) {                                                                                          \
      case ::robustagg::cpu::Isa::avx512: return NAME##_avx512<RA_UNPAREN TARGS> ARGS;                      \
      case ::robustagg::cpu::Isa::avx2: return NAME##_avx2<RA_UNPAREN TARGS> ARGS;                          \
      default: return NAME##_baseline<RA_UNPAREN TARGS> ARGS;                                               \
    }                                                                                                       \
  }
#define RA_UNPAREN(...) __VA_ARGS__
