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
