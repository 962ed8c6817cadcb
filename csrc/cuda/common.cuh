// Device helpers shared by the CUDA kernels in csrc/cuda/*.cu: storage <-> arithmetic conversion,
// return-code checking, launch sizing. No torch header here (docs/backends.md).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/common.h"

// Returns the error of a failed CUDA runtime call from the enclosing launcher.
#define RA_CUDA_TRY(call)                      \
  do {                                         \
    const cudaError_t ra_err_ = (call);        \
    if (ra_err_ != cudaSuccess) return ra_err_; \
  } while (0)

namespace robustagg {
namespace cuda {

// Storage -> arithmetic type (docs/backends.md: float32, or float64 for float64). The 16-bit conversions
// are exact; the reverse ones round to nearest even, as c10::Half / c10::BFloat16 do on the CPU.
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Read-only load through the non-coherent cache; G is never written while a kernel reads it.
template <typename T> __device__ __forceinline__ acc_t<T> load_acc(const T* p) { return to_acc(__ldg(p)); }

// The largest finite value of the storage type T, in its arithmetic type (std::numeric_limits<T>::max()
// on the CPU): where topk_ef_step's state saturates (core's ef_update, docs/nonfinite.md).
template <typename T> __device__ __forceinline__ acc_t<T> storage_max();
template <> __device__ __forceinline__ float storage_max<__half>() { return 65504.0f; }
template <> __device__ __forceinline__ float storage_max<__nv_bfloat16>() { return 0x1.fep127f; }  // bits 0x7F7F
template <> __device__ __forceinline__ float storage_max<float>() { return 0x1.fffffep127f; }     // FLT_MAX
template <> __device__ __forceinline__ double storage_max<double>() { return 0x1.fffffffffffffp1023; }  // DBL_MAX

template <typename A> __device__ __forceinline__ A positive_infinity();
template <> __device__ __forceinline__ float positive_infinity<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double positive_infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// Row flags are written only as `true` by every thread that sees a NaN/Inf: many writers store the
// same byte, so the result does not depend on their order. The launchers clear the flags first.
__device__ __forceinline__ void flag_row(bool* nonfinite, int64_t row) { nonfinite[row] = true; }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over `work` items: enough blocks to fill any current GPU,
// never more than the work needs, within the 1-D grid limit.
inline unsigned int grid_for(int64_t work, int threads, int64_t max_blocks = 65535) {
  int64_t blocks = ceil_div(work, threads);
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace cuda
}  // namespace robustagg
