// extern "C" entry points over the real launchers of csrc/cuda/launch.h, for ctypes
// (tests/test_cuda_emulated.py). Each entry mirrors how csrc/cuda/bindings.cpp calls its launcher:
// the same argument order and derived values, a workspace of exactly *_workspace_bytes (at least
// one byte, like bindings' `workspace`), on one stream. The workspace is filled with garbage
// first, as a fresh allocation from torch's caching allocator may be.
//
// Return codes: 0 success; > 0 the cudaError_t the launcher returned; -1 the emulator stopped
// the launch (deadlock, divergence, wrong stream, ...) or the launcher left an error unread;
// emu_last_message() says which.
//
// The emu_selftest_* entries launch small kernels of their own, to show that the emulator catches
// what it claims to catch (bad launch configurations, races, deadlocks).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/launch.h"
#include "cuda_emu_control.h"
#include "cuda_runtime.h"

namespace {

using namespace robustagg;

std::string g_message;
char g_stream_object;
cudaStream_t stream() { return reinterpret_cast<cudaStream_t>(&g_stream_object); }

enum DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

template <typename F>
cudaError_t dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kHalf: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    case kFloat: return f(float{});
    case kDouble: return f(double{});
  }
  return cudaErrorInvalidValue;
}

// A workspace of `bytes` (at least 1), 256-byte aligned like cudaMalloc, holding garbage.
struct Workspace {
  void* ptr = nullptr;
  explicit Workspace(size_t bytes) {
    const size_t size = bytes < 1 ? 1 : bytes;
    if (posix_memalign(&ptr, 256, size) != 0) ptr = nullptr;
    if (ptr != nullptr) std::memset(ptr, 0xa5, size);
  }
  ~Workspace() { std::free(ptr); }
};

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateBenignRaceSized(const char* file, int line, const volatile void* mem, unsigned long size,
                                        const char* description);

// Row flags are written racily by design: every thread that sees NaN/Inf stores the same `true`
// (common.cuh's flag_row). Under ThreadSanitizer the launchers get this buffer, declared a benign
// race once, and the flags are copied out afterwards.
bool g_flags[1 << 16];
struct AnnotateFlags {
  AnnotateFlags() { AnnotateBenignRaceSized(__FILE__, __LINE__, g_flags, sizeof g_flags, "row flags"); }
} g_annotate_flags;

struct Flags {
  bool* user;
  int64_t n;
  bool* ptr() const { return n <= static_cast<int64_t>(sizeof g_flags) ? g_flags : nullptr; }
  ~Flags() {
    if (ptr() != nullptr) std::memcpy(user, g_flags, static_cast<size_t>(n));
  }
};
#else
struct Flags {
  bool* user;
  int64_t n;
  bool* ptr() const { return user; }
};
#endif

template <typename Call>
int guarded(Call&& call) {
  g_message.clear();
  try {
    const cudaError_t err = call();
    if (err != cudaSuccess) {
      g_message = std::string("launcher returned ") + cudaGetErrorName(err);
      cudaGetLastError();
      return static_cast<int>(err);
    }
    const cudaError_t unread = cuda_emu::unread_error();
    if (unread != cudaSuccess) {
      g_message = std::string("the launcher returned cudaSuccess but left ") + cudaGetErrorName(unread) +
                  " unread (a launch failed and its error was not checked)";
      cudaGetLastError();
      return -1;
    }
    return 0;
  } catch (const std::exception& e) {
    g_message = e.what();
    cudaGetLastError();
    return -1;
  }
}

template <typename T> T* as(void* p) { return static_cast<T*>(p); }
template <typename T> const T* as(const void* p) { return static_cast<const T*>(p); }

}  // namespace

extern "C" {

const char* emu_last_message() { return g_message.c_str(); }

void emu_configure(int schedule, uint64_t seed) {
  cuda_emu::configure(static_cast<cuda_emu::Schedule>(schedule), seed, stream());
}

void emu_counters(uint64_t* out) {
  const cuda_emu::Counters c = cuda_emu::counters();
  out[0] = c.launches;
  out[1] = c.blocks;
  out[2] = c.threads;
  out[3] = c.barriers;
  out[4] = c.warp_collectives;
}

// ---- the ops

// rows: the selection of the coordinate-wise ops (int64[n]) or nullptr; n counts the rows read.
int emu_sign_sum(int dtype, const void* G, const int64_t* rows, int64_t n, int64_t d, int32_t* sums,
                 bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      return cuda::sign_sum(as<T>(G), rows, n, d, sums, flags.ptr(), stream());
    });
  });
}

int emu_rlr(int dtype, const void* G, const int64_t* rows, const void* weights, int64_t n, int64_t d, int theta,
            double server_lr, void* out, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      return cuda::rlr(as<T>(G), rows, as<A>(weights), n, d, theta, static_cast<A>(server_lr), as<T>(out),
                       flags.ptr(), stream());
    });
  });
}

int emu_order_mean(int dtype, const void* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi,
                   void* out, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::order_stats_workspace_bytes(n, d, sizeof(acc_t<T>)));
      return cuda::order_mean(as<T>(G), rows, n, d, lo, hi, as<T>(out), flags.ptr(), ws.ptr, stream());
    });
  });
}

int emu_invariant(int dtype, const void* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi,
                  int min_votes, void* out, bool* mask, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::order_stats_workspace_bytes(n, d, sizeof(acc_t<T>)));
      return cuda::invariant(as<T>(G), rows, n, d, lo, hi, min_votes, as<T>(out), mask, flags.ptr(), ws.ptr,
                             stream());
    });
  });
}

int emu_closest_to_median_mean(int dtype, const void* G, const int64_t* rows, int64_t n, int64_t d, int64_t beta,
                               void* out, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::closest_workspace_bytes(n, beta, d, sizeof(acc_t<T>)));
      return cuda::closest_to_median_mean(as<T>(G), rows, n, d, beta, as<T>(out), flags.ptr(), ws.ptr, stream());
    });
  });
}

int emu_client_stats(int dtype, const void* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length,
                     const void* ref, double* norm, double* sign_frac, double* dot, double* ref_norm,
                     double* ref_dist, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::client_stats_workspace_bytes(n, d));
      return cuda::client_stats(as<T>(G), n, d, window_start, window_length, as<T>(ref), norm, sign_frac, dot,
                                ref_norm, ref_dist, flags.ptr(), ws.ptr, stream());
    });
  });
}

int emu_clip_rows(int dtype, const void* G, int64_t n, int64_t d, const void* max_norm, void* out, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      Workspace ws(cuda::client_stats_workspace_bytes(n, d));
      return cuda::clip_rows(as<T>(G), n, d, as<A>(max_norm), as<T>(out), flags.ptr(), ws.ptr, stream());
    });
  });
}

int emu_topk_ef_step(int dtype, const void* u, void* error, void* momentum, int64_t d, int64_t k, double rho,
                     int64_t* indices, void* values, bool* nonfinite, bool* host_nonfinite) {
  const Flags flags{nonfinite, 1};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::topk_workspace_bytes(d, sizeof(acc_t<T>)));
      return cuda::topk_ef_step(as<T>(u), as<T>(error), as<T>(momentum), d, k, rho, indices, as<T>(values),
                                flags.ptr(), host_nonfinite, ws.ptr, stream());
    });
  });
}

int emu_topk_abs(int dtype, const void* x, int64_t d, int64_t k, int64_t* indices, void* values, bool* nonfinite) {
  const Flags flags{nonfinite, 1};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::topk_workspace_bytes(d, sizeof(acc_t<T>)));
      return cuda::topk_abs(as<T>(x), d, k, indices, as<T>(values), flags.ptr(), ws.ptr, stream());
    });
  });
}

int emu_maxpool_amplify(int dtype, const void* G, int64_t n, int64_t d, const int64_t* segments,
                        int64_t num_segments, int64_t kernel, bool restore, int64_t out_width, void* out,
                        bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::maxpool_workspace_bytes(num_segments));
      return cuda::maxpool_amplify(as<T>(G), n, d, segments, num_segments, kernel, restore, out_width, as<T>(out),
                                   flags.ptr(), ws.ptr, stream());
    });
  });
}

int emu_pairwise(int dtype, const void* G, int64_t n, int64_t d, int cosine, double* out, bool* nonfinite) {
  const Flags flags{nonfinite, n};
  return guarded([&] {
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      Workspace ws(cuda::pairwise_workspace_bytes(n, d));
      return cosine ? cuda::pairwise_cosine(as<T>(G), n, d, out, flags.ptr(), ws.ptr, stream())
                    : cuda::pairwise_sqdist(as<T>(G), n, d, out, flags.ptr(), ws.ptr, stream());
    });
  });
}

// ---- conversions of the 16-bit shims, checked against torch

void emu_float_to_half(const float* in, uint16_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __float2half_rn(in[i]).__x;
}

void emu_float_to_bfloat16(const float* in, uint16_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}

void emu_half_to_float(const uint16_t* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __half2float(__half{in[i]});
}

void emu_bfloat16_to_float(const uint16_t* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}

}  // extern "C"

// ---- emulator self-tests

namespace {

__global__ void selftest_noop_kernel(int* out) {
  const bool first = threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0;
  if (first && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) out[0] = 1;
}

// Every thread publishes salt + its id and reads its right neighbour's; without the barrier the
// read races with the neighbour's write.
__global__ void selftest_neighbour_kernel(int salt, bool barrier, int* out) {
  __shared__ int published[64];
  const int t = threadIdx.x;
  published[t] = salt + t;
  if (barrier) __syncthreads();
  out[t] = published[(t + 1) % 64];
}

// Two rounds of "count the flags of every warp through shared memory". Without the barrier after
// the reads, a warp that runs ahead overwrites its count while another warp still reads it.
__global__ void selftest_rounds_kernel(bool trailing_barrier, int* out) {
  __shared__ int warp_counts[2];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int round = 0; round < 2; ++round) {
    const unsigned ballot = __ballot_sync(0xffffffffu, threadIdx.x % (warp + 2 + 2 * round) == 0);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    out[round * 64 + threadIdx.x] = warp_counts[0] + 100 * warp_counts[1];
    if (trailing_barrier) __syncthreads();
  }
}

__global__ void selftest_warp_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 8;
  o[0] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  int sum = lane;
  for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  o[1] = sum;
  int scan = lane;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, scan, offset);
    if (lane >= offset) scan += y;
  }
  o[2] = scan;
  o[3] = static_cast<int>(__match_any_sync(0xffffffffu, lane / 4));
  o[4] = __shfl_sync(0xffffffffu, lane, 3, 8);
  o[5] = __shfl_down_sync(0xffffffffu, lane, 4, 16);
  o[6] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 31);
  o[7] = static_cast<int>(__shfl_down_sync(0xffffffffu, static_cast<double>(lane) + 0.5, 1));
}

// kind 0: half a warp waits at __syncwarp for lanes that exited; 1: divergent __syncthreads;
// 2: one thread at a shuffle, the rest at __syncthreads; 3: a shuffle reading a lane outside its
// mask; 4: a block larger than the kernel's __launch_bounds__ (checked by the build's rewrite);
// 5: a read one past a static shared array; 6: a write one past the dynamic shared memory. 5 and
// 6 are for the AddressSanitizer build only (elsewhere they are undefined behaviour).
__global__ void selftest_hazard_kernel(int kind, int* out) {
  __shared__ int published[64];
  extern __shared__ int dynamic[];
  const int t = threadIdx.x;
  if (kind == 5) {
    published[t] = t;
    __syncthreads();
    out[t] = published[t + 1];
  } else if (kind == 6) {
    dynamic[t + 1] = t;
  } else if (kind == 0) {
    if (t % 32 < 16) __syncwarp();
  } else if (kind == 1) {
    if (t % 2 == 0) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (kind == 2) {
    if (t == 0) {
      out[0] = __shfl_sync(0xffffffffu, t, 1);
    } else {
      __syncthreads();
    }
  } else if (kind == 3) {
    if (t < 16) out[t] = __shfl_down_sync(0x0000ffffu, t, 8);
  }
  out[t] = t;
}

__global__ void __launch_bounds__(64) selftest_bounded_kernel(int* out) { out[threadIdx.x] = 1; }

}  // namespace

extern "C" {

// Launch of the no-op kernel with this configuration; returns what cudaGetLastError says.
int emu_selftest_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t shared,
                        int opt_in_bytes, int* out) {
  return guarded([&] {
    if (opt_in_bytes > 0) {
      const cudaError_t err =
          cudaFuncSetAttribute(selftest_noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in_bytes);
      if (err != cudaSuccess) return err;
    }
    cuda_emu::launcher("selftest_noop_kernel", selftest_noop_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), shared,
                       stream())(out);
    return cudaGetLastError();
  });
}

int emu_selftest_neighbour(int salt, int barrier, int* out) {
  return guarded([&] {
    cuda_emu::launcher("selftest_neighbour_kernel", selftest_neighbour_kernel, 1, 64, 0, stream())(salt, barrier != 0,
                                                                                                  out);
    return cudaGetLastError();
  });
}

int emu_selftest_rounds(int trailing_barrier, int* out) {
  return guarded([&] {
    cuda_emu::launcher("selftest_rounds_kernel", selftest_rounds_kernel, 1, 64, 0, stream())(trailing_barrier != 0,
                                                                                            out);
    return cudaGetLastError();
  });
}

int emu_selftest_warp(int* out) {
  return guarded([&] {
    cuda_emu::launcher("selftest_warp_kernel", selftest_warp_kernel, 1, 64, 0, stream())(out);
    return cudaGetLastError();
  });
}

int emu_selftest_hazard(int kind, int* out) {
  return guarded([&] {
    if (kind == 4) {
      cuda_emu::launcher("selftest_bounded_kernel", selftest_bounded_kernel, 1, 128, 0, stream())(out);
    } else {
      const size_t shared = kind == 6 ? 64 * sizeof(int) : 0;
      cuda_emu::launcher("selftest_hazard_kernel", selftest_hazard_kernel, 1, 64, shared, stream())(kind, out);
    }
    return cudaGetLastError();
  });
}

int emu_selftest_wrong_stream(int* out) {
  return guarded([&] {
    cuda_emu::launcher("selftest_noop_kernel", selftest_noop_kernel, 1, 32, 0, nullptr)(out);
    return cudaGetLastError();
  });
}

}  // extern "C"
