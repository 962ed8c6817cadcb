// Emulator shim of cuda_bf16.h (tests/cuda_emu): __nv_bfloat16 as its 16 bits (the top half of a
// float), with only the explicit conversions (see cuda_fp16.h).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  unsigned short __x;
};

// Exact: a bfloat16 is a float with the low 16 bits zero.
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even on the bits: adding 0x7fff plus the lowest kept bit carries into the kept
// half exactly when the dropped half is above one half, or equal to it with the kept half odd;
// a carry out of the largest finite values gives Inf, as it should. NaN becomes 0x7fff (CUDA's
// canonical NaN) instead of possibly rounding into Inf.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    h.__x = 0x7fff;
    return h;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  h.__x = static_cast<unsigned short>(bits >> 16);
  return h;
}
