// Emulator shim of cuda_runtime.h (tests/cuda_emu): the device-side language the csrc/cuda
// sources use, executed on the CPU by the fiber scheduler of tests/cuda_emu/runtime.cpp.
//
// * __global__/__device__/__host__ are no-ops; __forceinline__ is `inline` (header functions are
//   defined in several translation units).
// * __shared__ is `static`: blocks run one after another, so a static is exactly one block's
//   shared memory; build.py's rewrite has each block start it as garbage (fresh_shared).
//   `extern __shared__ T name[];` (dynamic shared memory) is rewritten by
//   tests/cuda_emu/build.py into a pointer to the launch's dynamic buffer.
// * threadIdx/blockIdx/blockDim/gridDim read the emulated thread that is running.
// * __syncthreads and the warp intrinsics park the calling fiber until its partners arrived,
//   then compute what the hardware computes; divergence, exited partners and deadlocks stop the
//   launch with a message naming the kernel, block and thread.
// * `kernel<<<grid, block, smem, stream>>>(args)` is rewritten by build.py into
//   `::cuda_emu::launcher("kernel", kernel, grid, block, smem, stream)(args)`.
// Only the intrinsics the sources use (and a few close relatives) exist; any other is a compile
// error, never a silent stub.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

constexpr int warpSize = 32;

namespace cuda_emu {

// The emulated thread that is running (set by the scheduler before it resumes a fiber).
struct ThreadIndex {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern const ThreadIndex* g_index;

void* dynamic_shared();
void fresh_shared(void* variable, size_t bytes);
void check_launch_bounds(int max_threads);
void syncthreads(const char* file, int line);

enum class WarpOp { kSyncwarp, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kMatchAny };

// Parks until every lane of `mask` is at the same intrinsic (same op, mask and call site), then
// returns this lane's result: the 64 value bits of the source lane for the shuffles, the lane
// mask for ballot and match_any, 0/1 for any/all. `bytes` is the size of the value.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int bytes, int arg, int width,
                         const char* file, int line);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert((std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8)),
                "the emulator shuffles 32- and 64-bit arithmetic values, like CUDA's overloads");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T var, int arg, int width, const char* file, int line) {
  return from_bits<T>(warp_collective(op, mask, to_bits(var), sizeof(T), arg, width, file, line));
}

// ---- launches

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs body(context) once per thread of every block; returns the launch error (configuration
// problems), throws cuda_emu::Error for what the hardware would turn into a hang or a fault.
void run_grid(const char* name, const char* signature, const void* func, const LaunchConfig& config,
              void (*body)(void*), void* context);

// Kernel parameters are converted as a call would convert them, copied once per launch, and
// each thread calls the kernel with its own copies (parameters are per-thread locals).
template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  LaunchConfig config;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(P), "wrong number of kernel arguments");
    using Params = std::tuple<std::decay_t<P>...>;
    struct Call {
      void (*kernel)(P...);
      Params params;
      static void run(void* self) {
        Call* call = static_cast<Call*>(self);
        std::apply(call->kernel, call->params);
      }
    };
    Call call{kernel, Params(std::forward<Args>(args)...)};
    run_grid(name, __PRETTY_FUNCTION__, reinterpret_cast<const void*>(kernel), config, &Call::run, &call);
  }
};

template <typename... P>
Launcher<P...> launcher(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                        cudaStream_t stream = 0) {
  return Launcher<P...>{name, kernel, LaunchConfig{grid, block, shared_bytes, stream}};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::g_index->thread_idx)
#define blockIdx (::cuda_emu::g_index->block_idx)
#define blockDim (::cuda_emu::g_index->block_dim)
#define gridDim (::cuda_emu::g_index->grid_dim)

// ---- barriers and warp intrinsics (call sites recorded through g++'s __builtin_FILE/LINE)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emu::syncthreads(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  cuda_emu::warp_collective(cuda_emu::WarpOp::kSyncwarp, mask, 0, 0, 0, warpSize, file, line);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShfl, mask, var, src_lane, width, file, line);
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflUp, mask, var, static_cast<int>(delta), width, file, line);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflDown, mask, var, static_cast<int>(delta), width, file, line);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflXor, mask, var, lane_mask, width, file, line);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      cuda_emu::warp_collective(cuda_emu::WarpOp::kBallot, mask, predicate != 0, 4, 0, warpSize, file, line));
}

inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      cuda_emu::warp_collective(cuda_emu::WarpOp::kAny, mask, predicate != 0, 4, 0, warpSize, file, line));
}

inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      cuda_emu::warp_collective(cuda_emu::WarpOp::kAll, mask, predicate != 0, 4, 0, warpSize, file, line));
}

// CUDA's overloads: unsigned int, int, unsigned long (long), long (long), float, double.
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  return static_cast<unsigned>(cuda_emu::warp_collective(cuda_emu::WarpOp::kMatchAny, mask,
                                                         cuda_emu::to_bits(value), sizeof(T), 0, warpSize, file,
                                                         line));
}

// ---- memory and bit intrinsics

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

inline float __int_as_float(int x) { return cuda_emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(cuda_emu::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return cuda_emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(cuda_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return cuda_emu::from_bits<double>(static_cast<uint64_t>(x)); }
inline long long __double_as_longlong(double x) { return static_cast<long long>(cuda_emu::to_bits(x)); }

// Fused multiply-add, rounded once (exactly what the FMA instruction does).
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }

// ---- integer atomics. Fibers switch only inside the intrinsics above, so no other thread runs
// during a read-modify-write; the __atomic builtins make that visible to ThreadSanitizer too (the
// racecheck build), which would otherwise report concurrent atomicAdds as races. Each returns the
// old value, like the hardware.

namespace cuda_emu {
template <typename T> struct same { using type = T; };  // keeps the value argument out of deduction

template <typename T>
inline void check_atomic_type() {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned int> || std::is_same_v<T, unsigned long long>,
                "the emulator covers CUDA's integer atomics on int, unsigned int, unsigned long long");
}
}  // namespace cuda_emu

#define CUDA_EMU_ATOMIC_FETCH(NAME, BUILTIN)                                    \
  template <typename T>                                                         \
  inline T NAME(T* address, typename cuda_emu::same<T>::type val) {             \
    cuda_emu::check_atomic_type<T>();                                           \
    return BUILTIN(address, val, __ATOMIC_RELAXED);                             \
  }
CUDA_EMU_ATOMIC_FETCH(atomicAdd, __atomic_fetch_add)
CUDA_EMU_ATOMIC_FETCH(atomicSub, __atomic_fetch_sub)
CUDA_EMU_ATOMIC_FETCH(atomicAnd, __atomic_fetch_and)
CUDA_EMU_ATOMIC_FETCH(atomicOr, __atomic_fetch_or)
CUDA_EMU_ATOMIC_FETCH(atomicXor, __atomic_fetch_xor)
CUDA_EMU_ATOMIC_FETCH(atomicExch, __atomic_exchange_n)
#undef CUDA_EMU_ATOMIC_FETCH

template <typename T>
inline T atomicCAS(T* address, typename cuda_emu::same<T>::type compare, typename cuda_emu::same<T>::type val) {
  cuda_emu::check_atomic_type<T>();
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value, whether or not it was replaced
}

template <typename T>
inline T atomicMax(T* address, typename cuda_emu::same<T>::type val) {
  cuda_emu::check_atomic_type<T>();
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < val && !__atomic_compare_exchange_n(address, &old, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

template <typename T>
inline T atomicMin(T* address, typename cuda_emu::same<T>::type val) {
  cuda_emu::check_atomic_type<T>();
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (val < old && !__atomic_compare_exchange_n(address, &old, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
