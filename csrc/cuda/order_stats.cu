// CUDA kernels of the order statistics (SPEC §4.2) and the fused Invariant Aggregator (§4.3).
//
// One thread per coordinate; a warp reads 32 consecutive coordinates of one client row, so loads
// are coalesced, and each row's non-finite flag and the sign votes come out of the same pass.
//
// * n <= 64: the n values sit in registers, padded with +Inf to N = 2^ceil(log2 n) wires, and are
//   sorted by Batcher's odd-even merge network (Knuth 5.3.4, the network of core/order_stats.h)
//   unrolled at compile time, so every wire index is a constant and nothing goes to local memory
//   (tests/test_cuda_compile.py checks ptxas for spills). A step touching a padding wire only
//   keeps +Inf on the higher wire, so the first n wires end up exactly as core's batcher_network(n)
//   leaves them.
// * n > 64: each thread copies its column into its own slice of shared memory (or, when even 32
//   slices do not fit, of a global workspace) and runs core's order_mean_select.
//
// Both paths add the kept values like core's kept_mean (sorted[lo] + ... + sorted[hi-1], then one
// division by hi - lo), so float32 results equal the CPU backend's bit for bit.
#include "core/order_stats.h"
#include "core/sign_votes.h"
#include "cuda/batcher_network.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kRegisterMaxN = 64;
constexpr int kRegisterThreads = 128;

// mask == nullptr: order_mean; otherwise the fused invariant (votes and values from one read).
template <typename T, int N>
__global__ void __launch_bounds__(kRegisterThreads)
    order_mean_registers_kernel(const T* __restrict__ G, int n, int64_t d, int lo, int hi, int min_votes,
                                T* __restrict__ out, bool* __restrict__ mask, bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A v[N];
    int votes = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        const A x = load_acc(G + i * d + j);
        if (is_nonfinite(x)) flag_row(nonfinite, i);
        votes += sign_vote(x);
        v[i] = x;
      } else {
        v[i] = positive_infinity<A>();
      }
    }
    sort_wires(v);
    const A mean = kept_mean_wires(v, lo, hi);
    if (mask == nullptr) {
      out[j] = from_acc<T>(mean);
    } else {
      const bool keep = invariant_keeps(votes, min_votes);
      mask[j] = keep;
      out[j] = from_acc<T>(keep ? mean : A(0));
    }
  }
}

// ---- n > 64: per-thread selection in shared or global memory

constexpr int kSelectMaxThreads = 128;
constexpr size_t kSelectSharedBudget = 96 * 1024;  // opt-in dynamic shared memory, sm_80 and sm_90
constexpr size_t kSelectGlobalBudget = size_t(512) << 20;
constexpr int64_t kSelectMaxGlobalThreads = 32768;

struct SelectPlan {
  int threads;           // per block
  unsigned int blocks;
  int64_t stride;        // values between two threads' slices (odd: no shared-memory bank conflicts)
  size_t shared_bytes;   // 0: slices live in the global workspace
  size_t workspace_bytes;
};

SelectPlan select_plan(int64_t n, int64_t d, size_t acc_size) {
  SelectPlan plan{};
  plan.stride = n | 1;
  const size_t slice = static_cast<size_t>(plan.stride) * acc_size;
  const int64_t fit = static_cast<int64_t>(kSelectSharedBudget / slice) / 32 * 32;
  if (fit >= 32) {
    plan.threads = static_cast<int>(fit < kSelectMaxThreads ? fit : kSelectMaxThreads);
    plan.blocks = grid_for(d, plan.threads);
    plan.shared_bytes = slice * plan.threads;
    return plan;
  }
  plan.stride = n;
  int64_t total = static_cast<int64_t>(kSelectGlobalBudget / (static_cast<size_t>(n) * acc_size));
  total = total < 128 ? 128 : (total > kSelectMaxGlobalThreads ? kSelectMaxGlobalThreads : total);
  total = total / 128 * 128;
  plan.threads = 128;
  plan.blocks = grid_for(d < total ? d : total, plan.threads);
  plan.workspace_bytes = static_cast<size_t>(plan.blocks) * plan.threads * n * acc_size;
  return plan;
}

template <typename T>
__global__ void __launch_bounds__(kSelectMaxThreads)
    order_mean_select_kernel(const T* __restrict__ G, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes,
                             int64_t stride, acc_t<T>* scratch, T* __restrict__ out, bool* __restrict__ mask,
                             bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  extern __shared__ unsigned char shared_raw[];
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  A* v = scratch != nullptr ? scratch + thread * stride
                            : reinterpret_cast<A*>(shared_raw) + static_cast<int64_t>(threadIdx.x) * stride;
  for (int64_t j = thread; j < d; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int votes = 0;
    for (int64_t i = 0; i < n; ++i) {
      const A x = load_acc(G + i * d + j);
      if (is_nonfinite(x)) flag_row(nonfinite, i);
      votes += sign_vote(x);
      v[i] = x;
    }
    const A mean = order_mean_select(v, n, lo, hi);
    if (mask == nullptr) {
      out[j] = from_acc<T>(mean);
    } else {
      const bool keep = invariant_keeps(votes, min_votes);
      mask[j] = keep;
      out[j] = from_acc<T>(keep ? mean : A(0));
    }
  }
}

template <typename T, int N>
cudaError_t launch_registers(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes, T* out,
                             bool* mask, bool* nonfinite, cudaStream_t stream) {
  order_mean_registers_kernel<T, N><<<grid_for(d, kRegisterThreads), kRegisterThreads, 0, stream>>>(
      G, static_cast<int>(n), d, static_cast<int>(lo), static_cast<int>(hi), min_votes, out, mask, nonfinite);
  return cudaGetLastError();
}

template <typename T>
cudaError_t order_statistic(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes, T* out,
                            bool* mask, bool* nonfinite, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  if (n < 1 || d < 1 || lo < 0 || hi <= lo || hi > n) return cudaErrorInvalidValue;
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  if (n <= 1) return launch_registers<T, 1>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  if (n <= 2) return launch_registers<T, 2>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  if (n <= 4) return launch_registers<T, 4>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  if (n <= 8) return launch_registers<T, 8>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  if (n <= 16) return launch_registers<T, 16>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  if (n <= 32) return launch_registers<T, 32>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  if (n <= kRegisterMaxN) return launch_registers<T, 64>(G, n, d, lo, hi, min_votes, out, mask, nonfinite, stream);
  const SelectPlan plan = select_plan(n, d, sizeof(A));
  A* scratch = nullptr;
  if (plan.shared_bytes > 0) {
    RA_CUDA_TRY(cudaFuncSetAttribute(order_mean_select_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan.shared_bytes)));
  } else {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    scratch = static_cast<A*>(workspace);
  }
  order_mean_select_kernel<T><<<plan.blocks, plan.threads, plan.shared_bytes, stream>>>(
      G, n, d, lo, hi, min_votes, plan.stride, scratch, out, mask, nonfinite);
  return cudaGetLastError();
}

}  // namespace

size_t order_stats_workspace_bytes(int64_t n, int64_t d, size_t acc_size) {
  if (n <= kRegisterMaxN || d < 1) return 0;
  return select_plan(n, d, acc_size).workspace_bytes;
}

template <typename T>
cudaError_t order_mean(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out, bool* nonfinite,
                       void* workspace, cudaStream_t stream) {
  return order_statistic(G, n, d, lo, hi, 0, out, nullptr, nonfinite, workspace, stream);
}

template <typename T>
cudaError_t invariant(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, int min_votes, T* out, bool* mask,
                      bool* nonfinite, void* workspace, cudaStream_t stream) {
  if (mask == nullptr) return cudaErrorInvalidValue;
  return order_statistic(G, n, d, lo, hi, min_votes, out, mask, nonfinite, workspace, stream);
}

#define RA_INSTANTIATE(T)                                                                                 \
  template cudaError_t order_mean<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*, bool*, void*,      \
                                     cudaStream_t);                                                       \
  template cudaError_t invariant<T>(const T*, int64_t, int64_t, int64_t, int64_t, int, T*, bool*, bool*, \
                                    void*, cudaStream_t);
RA_INSTANTIATE(__half)
RA_INSTANTIATE(__nv_bfloat16)
RA_INSTANTIATE(float)
RA_INSTANTIATE(double)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
