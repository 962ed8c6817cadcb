// CUDA kernels of the sign-vote family (docs/ops.md): sign_sum and the fused robust learning
// rate. One thread per coordinate walks the n rows it reads in order (G's rows, or the selection
// `rows` names: core's selected_row), so a warp reads 32 consecutive coordinates of one row
// (coalesced) and every row's non-finite flag comes out of the same pass.
// The per-value math is core/sign_votes.h, shared with the CPU kernels. A coordinate whose weighted
// sum overflowed is redone from its column, like the CPU kernel does.
#include "core/sign_votes.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sign_sum_kernel(const T* __restrict__ G, const int64_t* __restrict__ rows, int64_t n, int64_t d,
                    int32_t* __restrict__ sums, bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int votes = 0;
#pragma unroll 8
    for (int64_t i = 0; i < n; ++i) {
      const A x = load_acc(selected_row(G, rows, i, d) + j);
      if (is_nonfinite(x)) flag_row(nonfinite, i);
      votes += sign_vote(x);
    }
    sums[j] = votes;
  }
}

// rlr's mean of coordinate j where the weighted sum overflowed (core's RescuedMean, docs/nonfinite.md): the
// column is read again and each row's share w_i / W taken in float64, W the total as the kernel
// formed it. The overflowed mean stays where the column holds NaN/Inf. Rare: only huge finite
// values get here, so the second read of the column costs nothing in the common case.
template <typename T, bool kWeighted>
__device__ acc_t<T> rescued_rlr_mean(const T* __restrict__ G, const int64_t* __restrict__ rows,
                                     const acc_t<T>* __restrict__ weights, int64_t n, int64_t d, int64_t j,
                                     acc_t<T> weight_total, acc_t<T> overflowed) {
  using A = acc_t<T>;
  RescuedMean m{};
  for (int64_t i = 0; i < n; ++i) {
    const A x = load_acc(selected_row(G, rows, i, d) + j);
    if (is_nonfinite(x)) return overflowed;
    const double w = kWeighted ? static_cast<double>(__ldg(weights + i)) : 1.0;
    rescued_mean_add(m, i, w / static_cast<double>(weight_total), static_cast<double>(x));
  }
  return static_cast<A>(rescued_mean_value(m));
}

// Robust learning rate (Ozdayi et al. 2021, Eq. 3). Rows are added in ascending order from 0, one
// rlr_accumulate per row, like the CPU kernel, so float32 results agree bit for bit; the mean is
// weighted_sum / weight_total as in core's rlr_finish.
template <typename T, bool kWeighted>
__global__ void __launch_bounds__(kThreads)
    rlr_kernel(const T* __restrict__ G, const int64_t* __restrict__ rows, const acc_t<T>* __restrict__ weights,
               int64_t n, int64_t d, int theta, acc_t<T> server_lr, T* __restrict__ out,
               bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  __shared__ A weight_total;
  if (threadIdx.x == 0) {
    A total = A(0);
    if (kWeighted) {
      for (int64_t i = 0; i < n; ++i) total = total + weights[i];
    } else {
      total = static_cast<A>(n);
    }
    weight_total = total;
  }
  __syncthreads();
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int votes = 0;
    A sum = A(0);
#pragma unroll 8
    for (int64_t i = 0; i < n; ++i) {
      const A x = load_acc(selected_row(G, rows, i, d) + j);
      if (is_nonfinite(x)) flag_row(nonfinite, i);
      votes += sign_vote(x);
      sum = rlr_accumulate(sum, kWeighted ? __ldg(weights + i) : A(1), x);
    }
    A mean = sum / weight_total;
    if (is_infinite(sum)) mean = rescued_rlr_mean<T, kWeighted>(G, rows, weights, n, d, j, weight_total, mean);
    out[j] = from_acc<T>(rlr_apply(votes, theta, mean, server_lr));
  }
}

}  // namespace

template <typename T>
cudaError_t sign_sum(const T* G, const int64_t* rows, int64_t n, int64_t d, int32_t* sums, bool* nonfinite,
                     cudaStream_t stream) {
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  sign_sum_kernel<T><<<grid_for(d, kThreads), kThreads, 0, stream>>>(G, rows, n, d, sums, nonfinite);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rlr(const T* G, const int64_t* rows, const acc_t<T>* weights, int64_t n, int64_t d, int theta,
                acc_t<T> server_lr, T* out, bool* nonfinite, cudaStream_t stream) {
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  const unsigned int grid = grid_for(d, kThreads);
  if (weights != nullptr) {
    rlr_kernel<T, true><<<grid, kThreads, 0, stream>>>(G, rows, weights, n, d, theta, server_lr, out, nonfinite);
  } else {
    rlr_kernel<T, false><<<grid, kThreads, 0, stream>>>(G, rows, weights, n, d, theta, server_lr, out, nonfinite);
  }
  return cudaGetLastError();
}

#define RA_INSTANTIATE(T)                                                                                            \
  template cudaError_t sign_sum<T>(const T*, const int64_t*, int64_t, int64_t, int32_t*, bool*, cudaStream_t);       \
  template cudaError_t rlr<T>(const T*, const int64_t*, const acc_t<T>*, int64_t, int64_t, int, acc_t<T>, T*, bool*, \
                              cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
