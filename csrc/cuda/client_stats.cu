// CUDA kernels of client_stats and clip_rows (SPEC §4.5); the per-value math is
// core/client_stats.h, shared with the CPU kernels.
//
// Deterministic reductions, no float atomics: G is cut into a fixed number of column chunks (a
// function of n and d only); block (row, chunk) reduces its chunk in a fixed tree order into one
// RowStats in the workspace, and a second kernel merges the chunks of each row in column order.
// The block grid puts the rows of one chunk next to each other, so the chunk of ref they all read
// is served from L2. Non-finite values are flagged while they are read.
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

// Tree reduction of one RowStats per thread, in a fixed order; thread 0 gets the block's total.
__device__ RowStats block_reduce(RowStats s) {
  __shared__ RowStats warp_totals[kWarps];
  s.sumsq = warp_sum(s.sumsq);
  s.dot = warp_sum(s.dot);
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
// sum of squares gives ref_norm.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const T* __restrict__ G, int64_t n, int64_t d, int64_t window_start, int64_t window_end,
                     const T* __restrict__ ref, RowStats* __restrict__ partial, bool* __restrict__ nonfinite) {
  const int64_t row = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t c0 = d * chunk / chunks, c1 = d * (chunk + 1) / chunks;
  const bool is_ref = row == n;
  const T* g = is_ref ? ref : G + row * d;
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
    row_stats_add(s, x);
    if (ref != nullptr && !is_ref) row_stats_add_dot(s, x, static_cast<double>(load_acc(ref + j)));
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

template <typename A>
__global__ void client_stats_finish_kernel(const RowStats* __restrict__ partial, int64_t n, int64_t chunks,
                                           int64_t window_length, bool with_ref, A* __restrict__ norm,
                                           A* __restrict__ sign_frac, A* __restrict__ dot, A* __restrict__ ref_norm) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row > n || (row == n && !with_ref)) return;
  const RowStats s = merge_chunks(partial, row, chunks);
  if (row == n) {
    ref_norm[0] = static_cast<A>(row_norm(s));
    return;
  }
  norm[row] = static_cast<A>(row_norm(s));
  for (int c = 0; c < 3; ++c) sign_frac[row * 3 + c] = static_cast<A>(sign_fraction(s, c, window_length));
  if (with_ref) dot[row] = static_cast<A>(s.dot);
}

template <typename A>
__global__ void clip_factor_kernel(const RowStats* __restrict__ partial, int64_t n, int64_t chunks,
                                   const A* __restrict__ max_norm, A* __restrict__ factor) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= n) return;
  const RowStats s = merge_chunks(partial, row, chunks);
  factor[row] = static_cast<A>(clip_factor(row_norm(s), static_cast<double>(max_norm[row])));
}

// reference.clip_rows: every value times its row's factor, in the arithmetic type.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    clip_scale_kernel(const T* __restrict__ G, int64_t n, int64_t d, const acc_t<T>* __restrict__ factor,
                      T* __restrict__ out) {
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const acc_t<T> f = factor[row];
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[row * d + j] = from_acc<T>(load_acc(G + row * d + j) * f);
    }
  }
}

struct Workspace {
  RowStats* partial;
  void* factor;
};

Workspace carve(void* workspace, int64_t rows, int64_t chunks) {
  unsigned char* base = static_cast<unsigned char*>(workspace);
  return Workspace{reinterpret_cast<RowStats*>(base),
                   base + static_cast<size_t>(rows * chunks) * sizeof(RowStats)};
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
  return static_cast<size_t>(rows * chunk_count(rows, d)) * sizeof(RowStats) + static_cast<size_t>(n) * sizeof(double);
}

template <typename T>
cudaError_t client_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length, const T* ref,
                         acc_t<T>* norm, acc_t<T>* sign_frac, acc_t<T>* dot, acc_t<T>* ref_norm, bool* nonfinite,
                         void* workspace, cudaStream_t stream) {
  if (n < 1 || d < 1 || n >= (int64_t(1) << 31) || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = chunk_count(n + 1, d);
  const Workspace ws = carve(workspace, n + 1, chunks);
  RA_CUDA_TRY(launch_row_stats(G, n, d, window_start, window_length, ref, ws.partial, chunks, nonfinite, stream));
  client_stats_finish_kernel<acc_t<T>><<<grid_for(n + 1, kThreads), kThreads, 0, stream>>>(
      ws.partial, n, chunks, window_length, ref != nullptr, norm, sign_frac, dot, ref_norm);
  return cudaGetLastError();
}

template <typename T>
cudaError_t clip_rows(const T* G, int64_t n, int64_t d, const acc_t<T>* max_norm, T* out, bool* nonfinite,
                      void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  if (n < 1 || d < 1 || n >= (int64_t(1) << 31) || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = chunk_count(n + 1, d);
  const Workspace ws = carve(workspace, n + 1, chunks);
  A* factor = static_cast<A*>(ws.factor);
  RA_CUDA_TRY(launch_row_stats<T>(G, n, d, 0, 0, nullptr, ws.partial, chunks, nonfinite, stream));
  clip_factor_kernel<A><<<grid_for(n, kThreads), kThreads, 0, stream>>>(ws.partial, n, chunks, max_norm, factor);
  RA_CUDA_TRY(cudaGetLastError());
  const dim3 grid(grid_for(d, kThreads, 1024), static_cast<unsigned int>(n < 65535 ? n : 65535));
  clip_scale_kernel<T><<<grid, kThreads, 0, stream>>>(G, n, d, factor, out);
  return cudaGetLastError();
}

#define RA_INSTANTIATE(T)                                                                                      \
  template cudaError_t client_stats<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, acc_t<T>*,      \
                                       acc_t<T>*, acc_t<T>*, acc_t<T>*, bool*, void*, cudaStream_t);           \
  template cudaError_t clip_rows<T>(const T*, int64_t, int64_t, const acc_t<T>*, T*, bool*, void*, cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
