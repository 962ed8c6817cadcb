// CUDA kernel of maxpool_amplify (docs/ops.md): one launch over the whole segment table and every
// client; the per-window rule (max over raw signed values, NaN wins, first arg-max) is
// core/maxpool.h, shared with the CPU kernel.
//
// A row of G is cut into pieces: for each pooled segment its kernel x kernel windows and its
// leftover values (the rows % kernel last rows and cols % kernel last columns floor mode drops),
// for each pass-through segment its values, and the tail after the last segment (Layout.flat's
// partial row and skip_tail). A one-thread kernel turns the table into piece offsets; the main
// kernel decodes each work item once (binary search over the pieces) and then walks the client
// rows. Every value of G is read by exactly one work item, so the non-finite flags cover the
// whole row, including values no window keeps.
#include "core/maxpool.h"
#include "core/sign_votes.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxWorkBlocks = 8192;

// Piece 2s is segment s's windows (pooled) or values (pass-through), piece 2s + 1 its leftovers,
// piece 2S the tail; begin[p] is the first work item of piece p and begin[2S + 1] the total.
__global__ void piece_offsets_kernel(const int64_t* __restrict__ table, int64_t segments, int64_t d,
                                     int64_t kernel, int64_t* __restrict__ begin, int64_t* __restrict__ tail_begin) {
  int64_t work = 0, covered = 0;
  for (int64_t s = 0; s < segments; ++s) {
    const PoolSegment seg = pool_segment(table + 5 * s);
    const int64_t numel = seg.rows * seg.cols;
    const int64_t kept = seg.pooled ? (seg.rows / kernel) * (seg.cols / kernel) : numel;
    const int64_t windows_cover = seg.pooled ? kept * kernel * kernel : numel;
    begin[2 * s] = work;
    work += kept;
    begin[2 * s + 1] = work;
    work += numel - windows_cover;
    if (seg.in_offset + numel > covered) covered = seg.in_offset + numel;
  }
  begin[2 * segments] = work;
  work += d - covered;
  begin[2 * segments + 1] = work;
  *tail_begin = covered;
}

// The piece holding work item w: the last p with begin[p] <= w (empty pieces are skipped).
__device__ __forceinline__ int64_t find_piece(const int64_t* begin, int64_t pieces, int64_t w) {
  int64_t lo = 0, hi = pieces;  // begin[lo] <= w < begin[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (begin[mid] <= w) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename T>
struct Pool {
  const T* G;
  int64_t n, d, kernel, out_width;
  bool restore;
  T* out;
  bool* nonfinite;
};

template <typename T>
__device__ __forceinline__ void check_value(const Pool<T>& p, int64_t row, acc_t<T> x) {
  if (is_nonfinite(x)) flag_row(p.nonfinite, row);
}

// Window w of a pooled segment, for client rows row0, row0 + row_step, ...
template <typename T>
__device__ void pool_window(const Pool<T>& p, const PoolSegment& seg, int64_t w, int64_t row0, int64_t row_step) {
  using A = acc_t<T>;
  const int64_t k = p.kernel, C = seg.cols / k;
  const int64_t r = w / C, c = w % C;
  const int64_t corner = (r * k) * seg.cols + c * k;
  for (int64_t row = row0; row < p.n; row += row_step) {
    const T* g = p.G + row * p.d + seg.in_offset + corner;
    A best = A(0);
    int64_t arg = 0;
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = 0; b < k; ++b) {
        const A x = load_acc(g + a * seg.cols + b);
        check_value(p, row, x);
        if ((a == 0 && b == 0) || window_takes(x, best)) {
          best = x;
          arg = a * seg.cols + b;
        }
      }
    }
    if (!p.restore) {
      p.out[row * p.out_width + seg.out_offset + w] = from_acc<T>(best);
      continue;
    }
    T* o = p.out + row * p.out_width + seg.out_offset + corner;
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = 0; b < k; ++b) {
        o[a * seg.cols + b] = from_acc<T>(a * seg.cols + b == arg ? best : A(0));
      }
    }
  }
}

// Leftover value l of a pooled segment: first the columns right of the last window column (in the
// window rows), then the rows below the last window row.
__device__ __forceinline__ int64_t leftover_position(const PoolSegment& seg, int64_t k, int64_t l) {
  const int64_t window_rows = (seg.rows / k) * k, window_cols = (seg.cols / k) * k;
  const int64_t right = window_rows * (seg.cols - window_cols);
  if (l < right) {
    const int64_t width = seg.cols - window_cols;
    return (l / width) * seg.cols + window_cols + l % width;
  }
  return window_rows * seg.cols + (l - right);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    maxpool_kernel(Pool<T> p, const int64_t* __restrict__ table, int64_t segments, const int64_t* __restrict__ begin,
                   const int64_t* __restrict__ tail_begin) {
  const int64_t pieces = 2 * segments + 1;
  const int64_t total = begin[pieces];
  const int64_t row0 = blockIdx.y, row_step = gridDim.y;
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < total;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t piece = find_piece(begin, pieces, w);
    const int64_t local = w - begin[piece];
    if (piece == 2 * segments) {  // tail: no segment holds it; zero in the restored output
      const int64_t col = *tail_begin + local;
      for (int64_t row = row0; row < p.n; row += row_step) {
        check_value(p, row, load_acc(p.G + row * p.d + col));
        if (p.restore) p.out[row * p.out_width + col] = from_acc<T>(acc_t<T>(0));
      }
      continue;
    }
    const PoolSegment seg = pool_segment(table + 5 * (piece / 2));
    if (piece % 2 == 0 && seg.pooled) {
      pool_window(p, seg, local, row0, row_step);
      continue;
    }
    // A pass-through value (copied) or a leftover of a pooled segment (zero when restoring).
    const int64_t pos = seg.pooled ? leftover_position(seg, p.kernel, local) : local;
    for (int64_t row = row0; row < p.n; row += row_step) {
      const T* g = p.G + row * p.d + seg.in_offset + pos;
      check_value(p, row, load_acc(g));
      if (!seg.pooled) {
        p.out[row * p.out_width + seg.out_offset + pos] = *g;
      } else if (p.restore) {
        p.out[row * p.out_width + seg.out_offset + pos] = from_acc<T>(acc_t<T>(0));
      }
    }
  }
}

}  // namespace

size_t maxpool_workspace_bytes(int64_t num_segments) {
  return static_cast<size_t>(2 * num_segments + 3) * sizeof(int64_t);
}

template <typename T>
cudaError_t maxpool_amplify(const T* G, int64_t n, int64_t d, const int64_t* segments, int64_t num_segments,
                            int64_t kernel, bool restore, int64_t out_width, T* out, bool* nonfinite, void* workspace,
                            cudaStream_t stream) {
  if (n < 1 || d < 1 || kernel < 1 || num_segments < 0 || workspace == nullptr) return cudaErrorInvalidValue;
  int64_t* begin = static_cast<int64_t*>(workspace);
  int64_t* tail_begin = begin + 2 * num_segments + 2;
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, n * sizeof(bool), stream));
  piece_offsets_kernel<<<1, 1, 0, stream>>>(segments, num_segments, d, kernel, begin, tail_begin);
  RA_CUDA_TRY(cudaGetLastError());
  // Every value of a row belongs to one work item and a window holds >= 1 value, so d bounds the
  // work per row; rows spread over blockIdx.y when there is little work per row.
  const unsigned int blocks = grid_for(d, kThreads, kMaxWorkBlocks);
  int64_t row_blocks = kMaxWorkBlocks / blocks;
  row_blocks = row_blocks < 1 ? 1 : (row_blocks > n ? n : row_blocks);
  const Pool<T> p{G, n, d, kernel, out_width, restore, out, nonfinite};
  maxpool_kernel<T><<<dim3(blocks, static_cast<unsigned int>(row_blocks)), kThreads, 0, stream>>>(
      p, segments, num_segments, begin, tail_begin);
  return cudaGetLastError();
}

#define RA_INSTANTIATE(T)                                                                                     \
  template cudaError_t maxpool_amplify<T>(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, bool, \
                                          int64_t, T*, bool*, void*, cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
