// CUDA kernels of client_stats and clip_rows (docs/ops.md); the per-value math is
// core/client_stats.h, shared with the CPU kernels.
//
// Deterministic reductions, no float atomics: G is cut into a fixed number of column chunks (a
// function of n and d only); block (row, chunk) reduces its chunk in a fixed tree order into one
// RowStats in the workspace, and a second kernel merges the chunks of each row in column order.
// The block grid puts the rows of one chunk next to each other, so the chunk of ref they all read
// is served from L2. Non-finite values are flagged while they are read.
//
// Every statistic is float64 (docs/nonfinite.md, docs/ops.md): float64 input keeps core's scaled sums of squares
// besides the plain ones, so a norm or distance of 1e200 or 1e-200 values that fits float64 is
// returned, and clip_rows multiplies in float64 and rounds once.
#include <type_traits>

#include "core/client_stats.h"
#include "core/sign_votes.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinChunkColumns = 4096;
constexpr int64_t kTargetBlocks = 2048;

// core's kScaled: float64 squares can overflow or underflow, 16/32-bit ones cannot.
template <typename T> constexpr bool kScaledSums = std::is_same<T, double>::value;

int64_t chunk_count(int64_t rows, int64_t d) {
  int64_t by_rows = kTargetBlocks / rows;
  if (by_rows < 1) by_rows = 1;
  const int64_t by_size = ceil_div(d, kMinChunkColumns);
  return by_rows < by_size ? by_rows : by_size;
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ int64_t warp_sum(int64_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ void warp_sum(SquareSums<double>& s) {
  s.plain = warp_sum(s.plain);
  s.down = warp_sum(s.down);
  s.up = warp_sum(s.up);
}

// Tree reduction of one RowStats per thread, every field in a fixed order; thread 0 gets the
// block's total. The scaled sums of 16/32-bit rows stay 0 and cost only this reduction.
__device__ RowStats block_reduce(RowStats s) {
  __shared__ RowStats warp_totals[kWarps];
  warp_sum(s.sums.sumsq);
  s.sums.dot.plain = warp_sum(s.sums.dot.plain);
  s.sums.dot.down = warp_sum(s.sums.dot.down);
  warp_sum(s.sums.dist);
  for (int c = 0; c < 3; ++c) s.count[c] = warp_sum(s.count[c]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_totals[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) row_stats_merge(s, warp_totals[w]);
  }
  return s;
}

// Block (blockIdx.x = row, blockIdx.y = chunk). Row n (when ref != nullptr) is ref itself, whose
// sums of squares give ref_norm; the other rows also add their products with ref and their squared
// differences from it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const T* __restrict__ G, int64_t n, int64_t d, int64_t window_start, int64_t window_end,
                     const T* __restrict__ ref, RowStats* __restrict__ partial, bool* __restrict__ nonfinite) {
  const int64_t row = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t c0 = d * chunk / chunks, c1 = d * (chunk + 1) / chunks;
  const bool is_ref = row == n;
  const T* g = is_ref ? ref : G + row * d;
  constexpr bool kScaled = kScaledSums<T>;
  RowStats s;
  row_stats_init(s);
  // Sign counts live in three registers: indexing s.count by a run-time class would put it in
  // local memory.
  int64_t positive = 0, zero = 0, negative = 0;
  bool bad = false;
#pragma unroll 4
  for (int64_t j = c0 + threadIdx.x; j < c1; j += kThreads) {
    const acc_t<T> value = load_acc(g + j);
    const double x = static_cast<double>(value);
    bad |= is_nonfinite(value);
    row_sums_add<kScaled>(s.sums, x);
    if (ref != nullptr && !is_ref) row_sums_add_ref<kScaled>(s.sums, x, static_cast<double>(load_acc(ref + j)));
    if (j >= window_start && j < window_end) {
      const int c = sign_class(x);
      positive += c == kPositive;
      zero += c == kZero;
      negative += c == kNegative;
    }
  }
  s.count[kPositive] = positive;
  s.count[kZero] = zero;
  s.count[kNegative] = negative;
  if (bad && !is_ref) flag_row(nonfinite, row);
  s = block_reduce(s);
  if (threadIdx.x == 0) partial[row * chunks + chunk] = s;
}

// Merges the chunks of one row in column order.
__device__ __forceinline__ RowStats merge_chunks(const RowStats* partial, int64_t row, int64_t chunks) {
  RowStats total;
  row_stats_init(total);
  for (int64_t c = 0; c < chunks; ++c) row_stats_merge(total, partial[row * chunks + c]);
  return total;
}

template <bool kScaled>
__global__ void client_stats_finish_kernel(const RowStats* __restrict__ partial, int64_t n, int64_t chunks,
                                           int64_t window_length, bool with_ref, double* __restrict__ norm,
                                           double* __restrict__ sign_frac, double* __restrict__ dot,
                                           double* __restrict__ ref_norm, double* __restrict__ ref_dist) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row > n || (row == n && !with_ref)) return;
  const RowStats s = merge_chunks(partial, row, chunks);
  if (row == n) {
    ref_norm[0] = norm_value(scaled_norm<kScaled>(s.sums.sumsq));
    return;
  }
  norm[row] = norm_value(scaled_norm<kScaled>(s.sums.sumsq));
  for (int c = 0; c < 3; ++c) sign_frac[row * 3 + c] = sign_fraction(s, c, window_length);
  if (with_ref) {
    dot[row] = dot_value<kScaled>(s.sums.dot);
    ref_dist[row] = norm_value(scaled_norm<kScaled>(s.sums.dist));
  }
}

template <bool kScaled, typename A>
__global__ void clip_factor_kernel(const RowStats* __restrict__ partial, int64_t n, int64_t chunks,
                                   const A* __restrict__ max_norm, ClipFactor* __restrict__ factor) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= n) return;
  const RowStats s = merge_chunks(partial, row, chunks);
  factor[row] = clip_factor(scaled_norm<kScaled>(s.sums.sumsq), static_cast<double>(max_norm[row]));
}

// reference.clip_rows: every value of a clipped row becomes (x * pre) * factor in float64 (core's
// clip_value; a float32 factor lost 5e-5 relative on a 3e38 row), rounded to T the way the CPU's
// static_cast<T>(double) does: to the arithmetic type first (16-bit types convert from float
// only, in c10 as here), then to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    clip_scale_kernel(const T* __restrict__ G, int64_t n, int64_t d, const ClipFactor* __restrict__ factor,
                      T* __restrict__ out) {
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const ClipFactor f = factor[row];
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const double x = static_cast<double>(load_acc(G + row * d + j));
      out[row * d + j] = from_acc<T>(static_cast<acc_t<T>>(clip_value(f, x)));
    }
  }
}

struct Workspace {
  RowStats* partial;
  ClipFactor* factor;
};

Workspace carve(void* workspace, int64_t rows, int64_t chunks) {
  RowStats* partial = static_cast<RowStats*>(workspace);
  return Workspace{partial, reinterpret_cast<ClipFactor*>(partial + rows * chunks)};
}

template <typename T>
cudaError_t launch_row_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length,
                             const T* ref, RowStats* partial, int64_t chunks, bool* nonfinite, cudaStream_t stream) {
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  const dim3 grid(static_cast<unsigned int>(n + (ref != nullptr ? 1 : 0)), static_cast<unsigned int>(chunks));
  row_stats_kernel<T><<<grid, kThreads, 0, stream>>>(G, n, d, window_start, window_start + window_length, ref,
                                                       partial, nonfinite);
  return cudaGetLastError();
}

}  // namespace

size_t client_stats_workspace_bytes(int64_t n, int64_t d) {
  const int64_t rows = n + 1;
  return static_cast<size_t>(rows * chunk_count(rows, d)) * sizeof(RowStats) +
         static_cast<size_t>(n) * sizeof(ClipFactor);
}

template <typename T>
cudaError_t client_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length, const T* ref,
                         double* norm, double* sign_frac, double* dot, double* ref_norm, double* ref_dist,
                         bool* nonfinite, void* workspace, cudaStream_t stream) {
  if (n < 1 || d < 1 || n >= (int64_t(1) << 31) || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = chunk_count(n + 1, d);
  const Workspace ws = carve(workspace, n + 1, chunks);
  RA_CUDA_TRY(launch_row_stats(G, n, d, window_start, window_length, ref, ws.partial, chunks, nonfinite, stream));
  client_stats_finish_kernel<kScaledSums<T>><<<grid_for(n + 1, kThreads), kThreads, 0, stream>>>(
      ws.partial, n, chunks, window_length, ref != nullptr, norm, sign_frac, dot, ref_norm, ref_dist);
  return cudaGetLastError();
}

template <typename T>
cudaError_t clip_rows(const T* G, int64_t n, int64_t d, const acc_t<T>* max_norm, T* out, bool* nonfinite,
                      void* workspace, cudaStream_t stream) {
  if (n < 1 || d < 1 || n >= (int64_t(1) << 31) || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = chunk_count(n + 1, d);
  const Workspace ws = carve(workspace, n + 1, chunks);
  RA_CUDA_TRY(launch_row_stats<T>(G, n, d, 0, 0, nullptr, ws.partial, chunks, nonfinite, stream));
  clip_factor_kernel<kScaledSums<T>, acc_t<T>><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      ws.partial, n, chunks, max_norm, ws.factor);
  RA_CUDA_TRY(cudaGetLastError());
  const dim3 grid(grid_for(d, kThreads, 1024), static_cast<unsigned int>(n < 65535 ? n : 65535));
  clip_scale_kernel<T><<<grid, kThreads, 0, stream>>>(G, n, d, ws.factor, out);
  return cudaGetLastError();
}

#define RA_INSTANTIATE(T)                                                                                      \
  template cudaError_t client_stats<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, double*,        \
                                       double*, double*, double*, double*, bool*, void*, cudaStream_t);        \
  template cudaError_t clip_rows<T>(const T*, int64_t, int64_t, const acc_t<T>*, T*, bool*, void*, cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
