// Emulator shim of cuda_fp16.h (tests/cuda_emu): __half as its 16 bits, with only the explicit
// conversions (the CUDA build passes -D__CUDA_NO_HALF_CONVERSIONS__ and no operators either, so a
// source relying on an implicit conversion fails here as it does under nvcc).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  unsigned short __x;
};

// Exact: every binary16 value is a float.
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, sizeof v);
  return static_cast<float>(v);
}

// Round to nearest even (g++'s _Float16 conversion, subnormals included); NaN becomes the
// canonical 0x7fff that cvt.rn.f16.f32 produces on the GPU.
inline __half __float2half_rn(float f) {
  __half h;
  if (f != f) {
    h.__x = 0x7fff;
    return h;
  }
  const _Float16 v = static_cast<_Float16>(f);
  std::memcpy(&h.__x, &v, sizeof v);
  return h;
}
