// Emulator shim of cuda_fp16.h (tests/cuda_emu): __half as its 16 bits, with only the explicit
// conversions (the CUDA build passes -D__CUDA_NO_HALF_CONVERSIONS__ and no operators either, so a
// source relying on an implicit conversion fails here as it does under nvcc). The conversions
// work on the bits, so they need no compiler support for _Float16; tests/test_cuda_emulated.py
// checks them against torch on every half and on random float bit patterns.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  unsigned short __x;
};

// Exact: every binary16 value is a float.
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exponent = (h.__x >> 10) & 0x1fu, mantissa = h.__x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // Inf, NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even; NaN becomes the canonical 0x7fff that cvt.rn.f16.f32 gives on the GPU.
inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const unsigned short sign = static_cast<unsigned short>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  __half h;
  if (a > 0x7f800000u) {
    h.__x = 0x7fff;
  } else if (a >= 0x477ff000u) {  // 65520 and above (Inf included) round to Inf
    h.__x = sign | 0x7c00u;
  } else if (a >= 0x38800000u) {  // 2^-14 and above: normal; the carry may bump the exponent
    const uint32_t rounded = a + 0x0fffu + ((a >> 13) & 1u);
    h.__x = static_cast<unsigned short>(sign | ((rounded - 0x38000000u) >> 13));
  } else if (a <= 0x33000000u) {  // up to 2^-25 (a tie with 0, which is even): zero
    h.__x = sign;
  } else {  // subnormal: a multiple of 2^-24, rounded to nearest even
    const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(a >> 23);
    const uint32_t rest = mantissa & ((1u << shift) - 1u), half_unit = 1u << (shift - 1);
    uint32_t units = mantissa >> shift;
    if (rest > half_unit || (rest == half_unit && (units & 1u))) ++units;
    h.__x = static_cast<unsigned short>(sign | units);
  }
  return h;
}
