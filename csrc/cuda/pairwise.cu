// CUDA kernels of pairwise_sqdist and pairwise_cosine (docs/ops.md); the per-entry math is
// core/pairwise.h, shared with the CPU kernels.
//
// 1. gram_tiles: the Gram matrix K = G G^T in float64, over 32 x 32 tiles of row pairs (upper
//    triangle of tiles only) and a fixed split of the columns into chunks; each thread keeps a
//    4 x 4 block of entries in registers. Every entry is the same sequence of operations over the
//    same columns, so bitwise identical rows give K_ii == K_jj == K_ij exactly.
// 2. gram_reduce: the chunks of each entry added in chunk order (no float atomics); entry (i, j)
//    and (j, i) read the same partials in the same order, so K is exactly symmetric.
// 3. The pairs K cannot give are listed: those whose Gram distance cancels (core's needs_direct)
//    and, for float64 input, every pair with an unsafe row (core's gram_row_unsafe: K_ii overflowed
//    or is below 2^-900), the row's own pair included. One block per listed pair adds, in a fixed
//    tree order, the squared differences, the products of the two rows scaled by their row_scale
//    and the count of differing entries (docs/nonfinite.md, docs/ops.md), like the CPU kernel's direct pass.
// 4. finish: distances and cosines from K and the direct sums, symmetric by construction, float64
//    for every input dtype (a squared distance between finite float32 rows need not fit float32).
// Non-finite rows are flagged while the tiles are loaded.
#include <type_traits>

#include "core/pairwise.h"
#include "core/sign_votes.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kTile = 32;          // rows per tile side
constexpr int kStep = 32;          // columns per shared-memory step
constexpr int kPerThread = 4;      // each thread: kPerThread x kPerThread entries
constexpr int kSide = kTile / kPerThread;
constexpr int kTileThreads = kSide * kSide;
constexpr int kEntries = kTile * kTile;
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinChunkColumns = 1024;
constexpr size_t kMaxPartialBytes = size_t(256) << 20;
constexpr int kDirectThreads = 256;
constexpr int64_t kDirectBlocks = 1024;
constexpr int kThreads = 256;

struct Plan {
  int64_t tiles;       // tiles per side
  int64_t tile_pairs;  // tiles (a, b) with a <= b
  int64_t chunks;
};

Plan plan_for(int64_t n, int64_t d) {
  Plan p;
  p.tiles = ceil_div(n, kTile);
  p.tile_pairs = p.tiles * (p.tiles + 1) / 2;
  int64_t chunks = ceil_div(kTargetBlocks, p.tile_pairs);
  const int64_t by_size = ceil_div(d, kMinChunkColumns);
  const int64_t by_memory = static_cast<int64_t>(kMaxPartialBytes / (p.tile_pairs * kEntries * sizeof(double)));
  if (chunks > by_size) chunks = by_size;
  if (chunks > by_memory) chunks = by_memory;
  p.chunks = chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks);
  return p;
}

// The direct sums of one listed pair of rows a, b (the CPU kernel's DirectSums). Equal rows are
// those with differ == 0: the distance of two different tiny rows can underflow to 0.
struct PairSums {
  double sqdist;   // sum_c (a_c - b_c)^2
  double dot;      // sum_c (a_c p_a)(b_c p_b), p the rows' row_scale
  int64_t differ;  // entries with a_c != b_c
};

// The number of pairs (i, j) with i <= j: the most that can be listed.
int64_t pair_capacity(int64_t n) { return n * (n + 1) / 2; }

struct Workspace {
  double* partial;   // [chunks][tile_pairs][kTile * kTile]
  double* gram;      // [n][n]
  PairSums* direct;  // [n][n], entries (i <= j) of listed pairs
  int64_t* pairs;    // [pair_capacity(n)] listed pairs i * n + j
  unsigned long long* listed;
};

Workspace carve(void* base, const Plan& p, int64_t n) {
  Workspace w;
  w.partial = static_cast<double*>(base);
  w.gram = w.partial + p.chunks * p.tile_pairs * kEntries;
  w.direct = reinterpret_cast<PairSums*>(w.gram + n * n);
  w.pairs = reinterpret_cast<int64_t*>(w.direct + n * n);
  w.listed = reinterpret_cast<unsigned long long*>(w.pairs + pair_capacity(n));
  return w;
}

// Tile pair t -> (a, b), a <= b, in the order (0,0), (0,1), ..., (0,T-1), (1,1), ...
__device__ __forceinline__ void tile_pair(int64_t t, int64_t tiles, int64_t& a, int64_t& b) {
  a = 0;
  while (t >= tiles - a) {
    t -= tiles - a;
    ++a;
  }
  b = a + t;
}

// Loads rows [row0, row0 + kTile) x columns [col, col + kStep) of G, transposed, as float64.
template <typename T>
__device__ __forceinline__ void load_tile(const T* G, int64_t n, int64_t d, int64_t row0, int64_t col, int64_t col_end,
                                          double (*tile)[kTile + 1], bool check, bool* nonfinite) {
  for (int e = threadIdx.x; e < kTile * kStep; e += kTileThreads) {
    const int r = e / kStep, c = e % kStep;
    const int64_t row = row0 + r, j = col + c;
    double x = 0.0;
    if (row < n && j < col_end) {
      const acc_t<T> v = load_acc(G + row * d + j);
      if (check && is_nonfinite(v)) flag_row(nonfinite, row);
      x = static_cast<double>(v);
    }
    tile[c][r] = x;
  }
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    gram_tiles_kernel(const T* __restrict__ G, int64_t n, int64_t d, int64_t tiles, double* __restrict__ partial,
                      bool* __restrict__ nonfinite) {
  __shared__ double tile_a[kStep][kTile + 1];
  __shared__ double tile_b[kStep][kTile + 1];
  int64_t a, b;
  tile_pair(blockIdx.x, tiles, a, b);
  const int64_t chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t c0 = d * chunk / chunks, c1 = d * (chunk + 1) / chunks;
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  double acc[kPerThread][kPerThread] = {};
  for (int64_t col = c0; col < c1; col += kStep) {
    // Every row is in the first operand of its diagonal tile, so checking there covers G.
    load_tile(G, n, d, a * kTile, col, c1, tile_a, true, nonfinite);
    load_tile(G, n, d, b * kTile, col, c1, tile_b, false, nonfinite);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kStep; ++k) {
      double x[kPerThread], y[kPerThread];
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) {
        x[q] = tile_a[k][ty * kPerThread + q];
        y[q] = tile_b[k][tx * kPerThread + q];
      }
#pragma unroll
      for (int p = 0; p < kPerThread; ++p)
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) acc[p][q] = __fma_rn(x[p], y[q], acc[p][q]);
    }
    __syncthreads();
  }
  double* out = partial + (chunk * gridDim.x + blockIdx.x) * kEntries;
#pragma unroll
  for (int p = 0; p < kPerThread; ++p)
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) out[(ty * kPerThread + p) * kTile + tx * kPerThread + q] = acc[p][q];
}

// K_ij for every (i, j): the partials of the canonical entry (min, max) in chunk order.
__global__ void __launch_bounds__(kThreads)
    gram_reduce_kernel(const double* __restrict__ partial, int64_t n, int64_t tiles, int64_t tile_pairs,
                       int64_t chunks, double* __restrict__ gram) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e % n;
    const int64_t lo = i < j ? i : j, hi = i < j ? j : i;
    const int64_t ta = lo / kTile, tb = hi / kTile;
    const int64_t t = ta * tiles - ta * (ta - 1) / 2 + (tb - ta);
    const int64_t entry = (lo % kTile) * kTile + hi % kTile;
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[(c * tile_pairs + t) * kEntries + entry];
    gram[e] = sum;
  }
}

// Unsafe rows (core/pairwise.h) occur for float64 input only: 16/32-bit squares cannot leave the
// float64 range.
template <typename T>
__device__ __forceinline__ bool row_unsafe(const double* gram, int64_t n, int64_t i) {
  return std::is_same<T, double>::value && gram_row_unsafe(gram[i * n + i]);
}

template <typename T>
__device__ __forceinline__ double scale_of_row(const double* gram, int64_t n, int64_t i) {
  return std::is_same<T, double>::value ? row_scale(gram[i * n + i]) : 1.0;
}

// True when pair (i, j), i <= j, comes from the direct pass: a pair with an unsafe row (its own
// pair included, for its scaled self product), or one whose Gram distance cancels.
template <typename T>
__device__ __forceinline__ bool pair_listed(const double* gram, int64_t n, int64_t i, int64_t j) {
  const bool unsafe = row_unsafe<T>(gram, n, i) || row_unsafe<T>(gram, n, j);
  if (i == j || unsafe) return unsafe;
  const double kii = gram[i * n + i], kjj = gram[j * n + j];
  return needs_direct(kii, kjj, sqdist_from_gram(kii, kjj, gram[i * n + j]));
}

// Lists the pairs i <= j that come from the direct pass. The list order is not fixed, but each
// listed pair's sums are computed on their own in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    list_direct_pairs_kernel(const double* __restrict__ gram, int64_t n, int64_t* __restrict__ pairs,
                             unsigned long long* __restrict__ listed) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e % n;
    if (i <= j && pair_listed<T>(gram, n, i, j)) pairs[atomicAdd(listed, 1ull)] = e;
  }
}

__device__ __forceinline__ void warp_sum(PairSums& s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.sqdist += __shfl_down_sync(0xffffffffu, s.sqdist, offset);
    s.dot += __shfl_down_sync(0xffffffffu, s.dot, offset);
    s.differ += __shfl_down_sync(0xffffffffu, s.differ, offset);
  }
}

template <typename T>
__global__ void __launch_bounds__(kDirectThreads)
    direct_pairs_kernel(const T* __restrict__ G, int64_t n, int64_t d, const double* __restrict__ gram,
                        const int64_t* __restrict__ pairs, const unsigned long long* __restrict__ listed,
                        PairSums* __restrict__ direct) {
  __shared__ PairSums warp_sums[kDirectThreads / 32];
  const int64_t count = static_cast<int64_t>(*listed);
  for (int64_t p = blockIdx.x; p < count; p += gridDim.x) {
    const int64_t e = pairs[p], i = e / n, j = e % n;
    const T* gi = G + i * d;
    const T* gj = G + j * d;
    const double pi = scale_of_row<T>(gram, n, i), pj = scale_of_row<T>(gram, n, j);
    PairSums s{0.0, 0.0, 0};
    for (int64_t c = threadIdx.x; c < d; c += kDirectThreads) {
      const double x = static_cast<double>(load_acc(gi + c)), y = static_cast<double>(load_acc(gj + c));
      s.sqdist += sqdiff(x, y);
      s.dot += (x * pi) * (y * pj);
      s.differ += x != y;
    }
    warp_sum(s);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      PairSums total{0.0, 0.0, 0};
      for (int w = 0; w < kDirectThreads / 32; ++w) {
        total.sqdist += warp_sums[w].sqdist;
        total.dot += warp_sums[w].dot;
        total.differ += warp_sums[w].differ;
      }
      direct[e] = total;
    }
    __syncthreads();
  }
}

// Row i's (scaled) self product: K_ii, or for an unsafe row the direct pass's sum of (x_i p_i)^2.
template <typename T>
__device__ __forceinline__ double self_product(const double* gram, const PairSums* direct, int64_t n, int64_t i) {
  return row_unsafe<T>(gram, n, i) ? direct[i * n + i].dot : gram[i * n + i];
}

// Entry (lo, hi), lo <= hi, as the CPU kernel's pairwise() finishes it.
template <typename T, bool kCosine>
__device__ __forceinline__ double pair_value(const double* gram, const PairSums* direct, int64_t n, int64_t lo,
                                             int64_t hi) {
  if (lo == hi) {
    const double self = self_product<T>(gram, direct, n, lo);
    return kCosine ? cosine_from_gram(self, self, self, true) : 0.0;
  }
  const double kii = gram[lo * n + lo], kjj = gram[hi * n + hi], kij = gram[lo * n + hi];
  if (!pair_listed<T>(gram, n, lo, hi)) {
    return kCosine ? cosine_from_gram(kii, kjj, kij, false) : sqdist_from_gram(kii, kjj, kij);
  }
  const PairSums& s = direct[lo * n + hi];
  if (!kCosine) return s.sqdist;
  const bool scaled = row_unsafe<T>(gram, n, lo) || row_unsafe<T>(gram, n, hi);
  return cosine_from_gram(self_product<T>(gram, direct, n, lo), self_product<T>(gram, direct, n, hi),
                          scaled ? s.dot : kij, s.differ == 0);
}

template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreads)
    pairwise_finish_kernel(const double* __restrict__ gram, const PairSums* __restrict__ direct, int64_t n,
                           double* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e % n;
    out[e] = pair_value<T, kCosine>(gram, direct, n, i < j ? i : j, i < j ? j : i);
  }
}

template <typename T, bool kCosine>
cudaError_t pairwise(const T* G, int64_t n, int64_t d, double* out, bool* nonfinite, void* workspace,
                     cudaStream_t stream) {
  if (n < 1 || d < 1 || workspace == nullptr) return cudaErrorInvalidValue;
  const Plan plan = plan_for(n, d);
  const Workspace w = carve(workspace, plan, n);
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  RA_CUDA_TRY(cudaMemsetAsync(w.listed, 0, sizeof(unsigned long long), stream));
  gram_tiles_kernel<T><<<dim3(static_cast<unsigned int>(plan.tile_pairs), static_cast<unsigned int>(plan.chunks)),
                         kTileThreads, 0, stream>>>(G, n, d, plan.tiles, w.partial, nonfinite);
  RA_CUDA_TRY(cudaGetLastError());
  const unsigned int grid = grid_for(n * n, kThreads);
  gram_reduce_kernel<<<grid, kThreads, 0, stream>>>(w.partial, n, plan.tiles, plan.tile_pairs, plan.chunks, w.gram);
  RA_CUDA_TRY(cudaGetLastError());
  list_direct_pairs_kernel<T><<<grid, kThreads, 0, stream>>>(w.gram, n, w.pairs, w.listed);
  RA_CUDA_TRY(cudaGetLastError());
  const int64_t max_pairs = pair_capacity(n);
  direct_pairs_kernel<T><<<static_cast<unsigned int>(max_pairs < kDirectBlocks ? max_pairs : kDirectBlocks),
                           kDirectThreads, 0, stream>>>(G, n, d, w.gram, w.pairs, w.listed, w.direct);
  RA_CUDA_TRY(cudaGetLastError());
  pairwise_finish_kernel<T, kCosine><<<grid, kThreads, 0, stream>>>(w.gram, w.direct, n, out);
  return cudaGetLastError();
}

}  // namespace

size_t pairwise_workspace_bytes(int64_t n, int64_t d) {
  if (n < 1 || d < 1) return 0;
  const Plan p = plan_for(n, d);
  return static_cast<size_t>(p.chunks * p.tile_pairs * kEntries + n * n) * sizeof(double) +
         static_cast<size_t>(n * n) * sizeof(PairSums) + static_cast<size_t>(pair_capacity(n)) * sizeof(int64_t) +
         sizeof(unsigned long long);
}

template <typename T>
cudaError_t pairwise_sqdist(const T* G, int64_t n, int64_t d, double* out, bool* nonfinite, void* workspace,
                            cudaStream_t stream) {
  return pairwise<T, false>(G, n, d, out, nonfinite, workspace, stream);
}

template <typename T>
cudaError_t pairwise_cosine(const T* G, int64_t n, int64_t d, double* out, bool* nonfinite, void* workspace,
                            cudaStream_t stream) {
  return pairwise<T, true>(G, n, d, out, nonfinite, workspace, stream);
}

#define RA_INSTANTIATE(T)                                                                                         \
  template cudaError_t pairwise_sqdist<T>(const T*, int64_t, int64_t, double*, bool*, void*, cudaStream_t);       \
  template cudaError_t pairwise_cosine<T>(const T*, int64_t, int64_t, double*, bool*, void*, cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
