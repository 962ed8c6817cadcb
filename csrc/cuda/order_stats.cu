// CUDA kernels of the order statistics (docs/ops.md), the fused Invariant Aggregator and Bulyan's
// closest_to_median_mean.
//
// One thread per coordinate; a warp reads 32 consecutive coordinates of one client row, so loads
// are coalesced, and each row's non-finite flag and the sign votes come out of the same pass. The
// rows are G's, or those a selection names (launch.h), read where they lie through core's
// selected_row; n below is always the number of rows read.
//
// * n <= 64 (n <= 128 for 16/32-bit data, whose 128 float wires still fit in the 255 registers of
//   a thread): the n values sit in registers, padded with +Inf to N = 2^ceil(log2 n) wires, and are
//   sorted by Batcher's odd-even merge network (Knuth 5.3.4, the network of core/order_stats.h)
//   unrolled at compile time, so every wire index is a constant and nothing goes to local memory
//   (tests/test_cuda_compile.py checks ptxas for spills). A step touching a padding wire only
//   keeps +Inf on the higher wire, so the first n wires end up exactly as core's batcher_network(n)
//   leaves them. A kept mean that overflowed is redone by a second, gated kernel (below).
// * larger n: each thread copies its column into its own slice of shared memory (or, when even 32
//   slices do not fit, of a global workspace) and runs, like the CPU kernel, core's Batcher network
//   pruned to the kept positions (n <= 2048, built on the host once per call) or core's
//   order_mean_select (larger n).
//
// Every path adds the kept values like core's kept_mean (sorted[lo] + ... + sorted[hi-1], then one
// division by hi - lo) and places equal values (-0 and +0) like the CPU path for the same n, so
// float32 results equal the CPU backend's bit for bit. Where that mean is ±Inf although the
// coordinate's values were all finite (two 3e38 values in float32), every path redoes it like the
// CPU kernel with core's kept_mean_rescaled (docs/nonfinite.md): the slice kernel in place, the selection
// path inside core's order_mean_select, the register kernels through order_mean_redo_kernel.
//
// closest_to_median_mean uses the slices for every n: each thread sorts its column (the full network,
// or heap_sort beyond kNetworkMaxRows) and runs core's window search; the beta slots after the column
// hold the kept values of a tied coordinate. Any exact sort gives the same result bits there: the
// window, the sum of its values and its zeros' sign do not depend on where -0 and +0 land.
#include <vector>

#include "core/order_stats.h"
#include "core/sign_votes.h"
#include "cuda/batcher_network.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kRegisterMaxN = 64;
constexpr int kRegisterMaxFloatN = 128;  // float wires; 128 doubles would spill
constexpr int kRegisterThreads = 128;
constexpr int kRedoThreads = 128;
constexpr int64_t kRedoMaxBlocks = 1024;

// Coordinate j's result. mask == nullptr: order_mean's kept mean; otherwise the fused invariant's
// mask bit and the kept mean where the votes pass, 0 elsewhere.
template <typename T, typename A>
__device__ __forceinline__ void store_coordinate(T* __restrict__ out, bool* __restrict__ mask, int64_t j, A mean,
                                                 int votes, int min_votes) {
  if (mask == nullptr) {
    out[j] = from_acc<T>(mean);
    return;
  }
  const bool keep = invariant_keeps(votes, min_votes);
  mask[j] = keep;
  out[j] = from_acc<T>(keep ? mean : A(0));
}

// mask == nullptr: order_mean; otherwise the fused invariant (votes and values from one read).
// A ±Inf kept mean sets *overflowed (an integer atomic, rare), which starts order_mean_redo_kernel.
template <typename T, int N>
__global__ void __launch_bounds__(kRegisterThreads)
    order_mean_registers_kernel(const T* __restrict__ G, const int64_t* __restrict__ rows, int n, int64_t d, int lo,
                                int hi, int min_votes, T* __restrict__ out, bool* __restrict__ mask,
                                bool* __restrict__ nonfinite, unsigned int* __restrict__ overflowed) {
  using A = acc_t<T>;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A v[N];
    int votes = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        const A x = load_acc(selected_row(G, rows, i, d) + j);
        if (is_nonfinite(x)) flag_row(nonfinite, i);
        votes += sign_vote(x);
        v[i] = x;
      } else {
        v[i] = positive_infinity<A>();
      }
    }
    sort_wires(v);
    const A mean = kept_mean_wires(v, lo, hi);
    if (is_infinite(mean)) atomicOr(overflowed, 1u);
    store_coordinate(out, mask, j, mean, votes, min_votes);
  }
}

// The overflow redo of the register kernels, which cannot do it themselves: keeping all N wires
// live past the mean for it costs them registers and spills (ptxas). Rare, so it does nothing
// unless *overflowed is set; then every output that is ±Inf (a superset of the overflowed means:
// a 16-bit output may round to Inf from a finite mean) whose column is finite is recomputed from
// a copy of the column with core's order_mean_select, whose kept_mean_finite redoes it with
// kept_mean_rescaled. Selection keeps the network's kept values (core/order_stats.h) up to the
// places of -0 and +0, which cannot change a mean of huge values, so the bits are the CPU's.
// A column with NaN/Inf keeps its value, as on the CPU. Invariant coordinates that are ±Inf
// passed their vote, so only `out` changes.
template <typename T>
__global__ void __launch_bounds__(kRedoThreads)
    order_mean_redo_kernel(const T* __restrict__ G, const int64_t* __restrict__ rows, int n, int64_t d, int lo,
                           int hi, const unsigned int* __restrict__ overflowed, T* __restrict__ out) {
  using A = acc_t<T>;
  if (*overflowed == 0) return;
  A column[sizeof(A) == sizeof(float) ? kRegisterMaxFloatN : kRegisterMaxN];
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!is_infinite(to_acc(out[j]))) continue;
    bool finite = true;
    for (int i = 0; i < n; ++i) {
      column[i] = load_acc(selected_row(G, rows, i, d) + j);
      finite = finite && !is_nonfinite(column[i]);
    }
    if (finite) out[j] = from_acc<T>(order_mean_select(column, n, lo, hi));
  }
}

// ---- n > 64: each thread sorts or selects its column in its own slice of memory

// The CPU kernel (csrc/cpu/order_stats.cpp, kNetworkMaxRows) runs the pruned Batcher network up
// to this many rows and core's selection above; the same split here keeps even the sign of a zero
// result (which -0 / +0 lands in the kept window) equal across backends. tests/test_cuda_compile.py
// checks that the two constants agree.
constexpr int64_t kNetworkMaxRows = 2048;
constexpr int kSliceMaxThreads = 128;
constexpr size_t kSliceSharedBudget = 96 * 1024;  // opt-in dynamic shared memory, sm_80 and sm_90
constexpr size_t kSliceGlobalBudget = size_t(512) << 20;
constexpr int64_t kSliceMaxGlobalThreads = 32768;
constexpr size_t kAlign = 256;

size_t network_bytes(int64_t n) {
  if (n > kNetworkMaxRows) return 0;
  const size_t bytes = static_cast<size_t>(batcher_network_capacity(static_cast<int>(n))) * sizeof(CompareExchange);
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

struct SlicePlan {
  int threads;           // per block
  unsigned int blocks;
  int64_t stride;        // values between two threads' slices (odd: no shared-memory bank conflicts)
  size_t shared_bytes;   // 0: slices live in the global workspace, after the network
  size_t workspace_bytes;
};

SlicePlan slice_plan(int64_t n, int64_t d, size_t acc_size) {
  SlicePlan plan{};
  plan.stride = n | 1;
  plan.workspace_bytes = network_bytes(n);
  const size_t slice = static_cast<size_t>(plan.stride) * acc_size;
  const int64_t fit = static_cast<int64_t>(kSliceSharedBudget / slice) / 32 * 32;
  if (fit >= 32) {
    plan.threads = static_cast<int>(fit < kSliceMaxThreads ? fit : kSliceMaxThreads);
    plan.blocks = grid_for(d, plan.threads);
    plan.shared_bytes = slice * plan.threads;
    return plan;
  }
  plan.stride = n;
  int64_t total = static_cast<int64_t>(kSliceGlobalBudget / (static_cast<size_t>(n) * acc_size));
  total = total < 128 ? 128 : (total > kSliceMaxGlobalThreads ? kSliceMaxGlobalThreads : total);
  total = total / 128 * 128;
  plan.threads = 128;
  plan.blocks = grid_for(d < total ? d : total, plan.threads);
  plan.workspace_bytes += static_cast<size_t>(plan.blocks) * plan.threads * n * acc_size;
  return plan;
}

// net == nullptr: core's order_mean_select; otherwise core's run_network with the pruned network
// (every thread runs the same steps, so the step loads are broadcasts and nothing diverges).
template <typename T>
__global__ void __launch_bounds__(kSliceMaxThreads)
    order_mean_slices_kernel(const T* __restrict__ G, const int64_t* __restrict__ rows, int64_t n, int64_t d,
                             int64_t lo, int64_t hi, int min_votes, const CompareExchange* __restrict__ net, int steps,
                             int64_t stride, acc_t<T>* scratch, T* __restrict__ out, bool* __restrict__ mask,
                             bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  extern __shared__ unsigned char shared_raw[];
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  A* v = scratch != nullptr ? scratch + thread * stride
                            : reinterpret_cast<A*>(shared_raw) + static_cast<int64_t>(threadIdx.x) * stride;
  for (int64_t j = thread; j < d; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int votes = 0;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      const A x = load_acc(selected_row(G, rows, i, d) + j);
      const bool bad = is_nonfinite(x);
      if (bad) flag_row(nonfinite, i);
      finite = finite && !bad;
      votes += sign_vote(x);
      v[i] = x;
    }
    A mean;
    if (net != nullptr) {
      run_network(v, net, steps);
      mean = kept_mean<A>(v, lo, hi);
      if (finite && is_infinite(mean)) mean = kept_mean_rescaled(v, lo, hi);
    } else {
      mean = order_mean_select(v, n, lo, hi);
    }
    store_coordinate(out, mask, j, mean, votes, min_votes);
  }
}

// Builds core's pruned network for (n, lo, hi) on the host and queues its upload into the
// workspace. The copy is from pageable memory, so it has left `host` when cudaMemcpyAsync returns.
cudaError_t upload_network(int64_t n, int64_t lo, int64_t hi, CompareExchange* device_net, int& steps,
                           cudaStream_t stream) {
  std::vector<CompareExchange> host(batcher_network_capacity(static_cast<int>(n)) + 1);
  std::vector<unsigned char> live(n);
  const int count = batcher_network(static_cast<int>(n), host.data());
  steps = prune_network(host.data(), count, static_cast<int>(n), static_cast<int>(lo), static_cast<int>(hi),
                        live.data());
  if (steps == 0) return cudaSuccess;
  return cudaMemcpyAsync(device_net, host.data(), steps * sizeof(CompareExchange), cudaMemcpyHostToDevice, stream);
}

template <typename T>
cudaError_t launch_slices(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes,
                          T* out, bool* mask, bool* nonfinite, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const SlicePlan plan = slice_plan(n, d, sizeof(A));
  if (plan.workspace_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  unsigned char* base = static_cast<unsigned char*>(workspace);
  CompareExchange* net = nullptr;
  int steps = 0;
  if (n <= kNetworkMaxRows) {
    net = reinterpret_cast<CompareExchange*>(base);
    RA_CUDA_TRY(upload_network(n, lo, hi, net, steps, stream));
  }
  A* scratch = nullptr;
  if (plan.shared_bytes > 0) {
    RA_CUDA_TRY(cudaFuncSetAttribute(order_mean_slices_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan.shared_bytes)));
  } else {
    scratch = reinterpret_cast<A*>(base + network_bytes(n));
  }
  order_mean_slices_kernel<T><<<plan.blocks, plan.threads, plan.shared_bytes, stream>>>(
      G, rows, n, d, lo, hi, min_votes, net, steps, plan.stride, scratch, out, mask, nonfinite);
  return cudaGetLastError();
}

// workspace: the overflow flag of the register kernels.
template <typename T, int N>
cudaError_t launch_registers(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi,
                             int min_votes, T* out, bool* mask, bool* nonfinite, void* workspace,
                             cudaStream_t stream) {
  if (workspace == nullptr) return cudaErrorInvalidValue;
  unsigned int* overflowed = static_cast<unsigned int*>(workspace);
  RA_CUDA_TRY(cudaMemsetAsync(overflowed, 0, sizeof(unsigned int), stream));
  order_mean_registers_kernel<T, N><<<grid_for(d, kRegisterThreads), kRegisterThreads, 0, stream>>>(
      G, rows, static_cast<int>(n), d, static_cast<int>(lo), static_cast<int>(hi), min_votes, out, mask, nonfinite,
      overflowed);
  RA_CUDA_TRY(cudaGetLastError());
  order_mean_redo_kernel<T><<<grid_for(d, kRedoThreads, kRedoMaxBlocks), kRedoThreads, 0, stream>>>(
      G, rows, static_cast<int>(n), d, static_cast<int>(lo), static_cast<int>(hi), overflowed, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t order_statistic(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi,
                            int min_votes, T* out, bool* mask, bool* nonfinite, void* workspace, cudaStream_t stream) {
  if (n < 1 || d < 1 || lo < 0 || hi <= lo || hi > n) return cudaErrorInvalidValue;
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  if (n <= 1) return launch_registers<T, 1>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  if (n <= 2) return launch_registers<T, 2>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  if (n <= 4) return launch_registers<T, 4>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  if (n <= 8) return launch_registers<T, 8>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  if (n <= 16) {
    return launch_registers<T, 16>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  }
  if (n <= 32) {
    return launch_registers<T, 32>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  }
  if (n <= kRegisterMaxN) {
    return launch_registers<T, 64>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
  }
  if constexpr (sizeof(acc_t<T>) == sizeof(float)) {
    if (n <= kRegisterMaxFloatN) {
      return launch_registers<T, kRegisterMaxFloatN>(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite,
                                                     workspace, stream);
    }
  }
  return launch_slices(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
}

// ---- closest_to_median_mean

template <typename T>
__global__ void __launch_bounds__(kSliceMaxThreads)
    closest_slices_kernel(const T* __restrict__ G, const int64_t* __restrict__ rows, int64_t n, int64_t d,
                          int64_t beta, const CompareExchange* __restrict__ net, int steps, int64_t stride,
                          acc_t<T>* scratch, T* __restrict__ out, bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  extern __shared__ unsigned char shared_raw[];
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  A* v = scratch != nullptr ? scratch + thread * stride
                            : reinterpret_cast<A*>(shared_raw) + static_cast<int64_t>(threadIdx.x) * stride;
  A* kept = v + n;
  for (int64_t j = thread; j < d; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t i = 0; i < n; ++i) {
      const A x = load_acc(selected_row(G, rows, i, d) + j);
      if (is_nonfinite(x)) flag_row(nonfinite, i);
      v[i] = x;
    }
    if (net != nullptr) {
      run_network(v, net, steps);
    } else {
      heap_sort(v, n);
    }
    const A center = to_acc(from_acc<T>(sorted_median(v, n)));  // the median as ops.median returns it
    const NearestWindow window = nearest_window(v, n, beta, center);
    A mean;
    if (!window.tied) {
      mean = kept_mean_finite(v, window.begin, window.end);
    } else {
      const auto value_of = [&](int64_t i) { return load_acc(selected_row(G, rows, i, d) + j); };
      mean = nearest_by_index(value_of, n, beta, center, window, v, kept);
    }
    out[j] = from_acc<T>(mean);
  }
}

// The column and its beta kept slots share one slice; the network needs no more than n + beta wires' room.
template <typename T>
cudaError_t launch_closest(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t beta, T* out,
                           bool* nonfinite, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const SlicePlan plan = slice_plan(n + beta, d, sizeof(A));
  if (plan.workspace_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  unsigned char* base = static_cast<unsigned char*>(workspace);
  CompareExchange* net = nullptr;
  int steps = 0;
  if (n + beta <= kNetworkMaxRows) {
    net = reinterpret_cast<CompareExchange*>(base);
    RA_CUDA_TRY(upload_network(n, 0, n, net, steps, stream));
  }
  A* scratch = nullptr;
  if (plan.shared_bytes > 0) {
    RA_CUDA_TRY(cudaFuncSetAttribute(closest_slices_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan.shared_bytes)));
  } else {
    scratch = reinterpret_cast<A*>(base + network_bytes(n + beta));
  }
  closest_slices_kernel<T><<<plan.blocks, plan.threads, plan.shared_bytes, stream>>>(
      G, rows, n, d, beta, net, steps, plan.stride, scratch, out, nonfinite);
  return cudaGetLastError();
}

}  // namespace

size_t closest_workspace_bytes(int64_t n, int64_t beta, int64_t d, size_t acc_size) {
  return d < 1 ? 0 : slice_plan(n + beta, d, acc_size).workspace_bytes;
}

template <typename T>
cudaError_t closest_to_median_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t beta, T* out,
                                   bool* nonfinite, void* workspace, cudaStream_t stream) {
  if (n < 1 || d < 1 || beta < 1 || beta > n) return cudaErrorInvalidValue;
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  return launch_closest(G, rows, n, d, beta, out, nonfinite, workspace, stream);
}

size_t order_stats_workspace_bytes(int64_t n, int64_t d, size_t acc_size) {
  if (n <= kRegisterMaxN || (acc_size == sizeof(float) && n <= kRegisterMaxFloatN)) return sizeof(unsigned int);
  return d < 1 ? 0 : slice_plan(n, d, acc_size).workspace_bytes;
}

template <typename T>
cudaError_t order_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out,
                       bool* nonfinite, void* workspace, cudaStream_t stream) {
  return order_statistic(G, rows, n, d, lo, hi, 0, out, nullptr, nonfinite, workspace, stream);
}

template <typename T>
cudaError_t invariant(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes,
                      T* out, bool* mask, bool* nonfinite, void* workspace, cudaStream_t stream) {
  if (mask == nullptr) return cudaErrorInvalidValue;
  return order_statistic(G, rows, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
}

#define RA_INSTANTIATE(T)                                                                                            \
  template cudaError_t order_mean<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, T*, bool*, void*, \
                                     cudaStream_t);                                                                  \
  template cudaError_t invariant<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int, T*, bool*,    \
                                    bool*, void*, cudaStream_t);                                                     \
  template cudaError_t closest_to_median_mean<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, T*, bool*,     \
                                                 void*, cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
