// CPU kernel of maxpool_amplify (docs/ops.md): every segment of the layout table and every client in
// one call, no loop over layers outside the kernel.
//
// The row of G is cut into tasks: bands of pooled rows of a pooled segment, slices of a
// pass-through segment, and gaps no segment covers (Layout.flat's dropped tail). Tasks of all
// clients run in one OpenMP loop. Every value of the row is read once, so the non-finite check
// covers the dropped remainder too; with restore=True every output value is written exactly once.
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/maxpool.h"
#include "cpu/kernels.h"

namespace robustagg {
namespace cpu {
namespace {

constexpr int64_t kTaskValues = 1 << 15;  // input values per task, about 128 KiB of float32

enum class TaskKind { kPool, kCopy, kGap };

// kPool: pooled rows [begin, end) of segment `seg` (the last band also owns the dropped rows).
// kCopy / kGap: values [begin, end) of the row (kCopy: of segment `seg`).
struct Task {
  TaskKind kind;
  int64_t seg, begin, end;
};

std::vector<Task> make_tasks(const std::vector<PoolSegment>& segs, int64_t d, int64_t kernel) {
  std::vector<Task> tasks;
  std::vector<std::pair<int64_t, int64_t>> covered;
  for (int64_t s = 0; s < int64_t(segs.size()); ++s) {
    const PoolSegment& g = segs[s];
    const int64_t numel = g.rows * g.cols;
    covered.emplace_back(g.in_offset, g.in_offset + numel);
    if (numel == 0) continue;
    if (!g.pooled) {
      for (int64_t b = 0; b < numel; b += kTaskValues)
        tasks.push_back({TaskKind::kCopy, s, g.in_offset + b, g.in_offset + std::min(numel, b + kTaskValues)});
      continue;
    }
    const int64_t pooled_rows = g.rows / kernel;
    const int64_t band = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, kernel * g.cols));
    int64_t r = 0;
    do {
      const int64_t end = std::min(pooled_rows, r + band);
      tasks.push_back({TaskKind::kPool, s, r, end});
      r = end;
    } while (r < pooled_rows);
  }
  std::sort(covered.begin(), covered.end());
  int64_t at = 0;
  for (const auto& c : covered) {
    for (int64_t b = at; b < c.first; b += kTaskValues) tasks.push_back({TaskKind::kGap, -1, b, std::min(c.first, b + kTaskValues)});
    at = std::max(at, c.second);
  }
  for (int64_t b = at; b < d; b += kTaskValues) tasks.push_back({TaskKind::kGap, -1, b, std::min(d, b + kTaskValues)});
  return tasks;
}

template <typename T> RA_ALWAYS_INLINE bool any_nonfinite(const T* x, int64_t len) {
  using A = acc_t<T>;
  bool bad = false;
  for (int64_t j = 0; j < len; ++j) {
    const A v = static_cast<A>(x[j]);
    bad |= !(v - v == A(0));
  }
  return bad;
}

// One pooled row, any kernel k: best[c] / arg[c] over the k x k windows of input rows x[0..k).
template <typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE bool pool_row(const T* x, int64_t cols, int64_t k, int64_t pooled_cols, A* best, int64_t* arg,
                               bool want_arg) {
  bool bad = false;
  for (int64_t dr = 0; dr < k; ++dr) {
    const T* row = x + dr * cols;
    bad |= any_nonfinite(row, cols);
    for (int64_t c = 0; c < pooled_cols; ++c) {
      for (int64_t dc = 0; dc < k; ++dc) {
        const A v = static_cast<A>(row[c * k + dc]);
        const bool first = dr == 0 && dc == 0;
        if (first || window_takes(v, best[c])) {
          best[c] = v;
          if (want_arg) arg[c] = dr * k + dc;
        }
      }
    }
  }
  return bad;
}

// One 64-byte vector of the arithmetic type, and the integer mask type of its comparisons.
template <typename A> struct Lanes;
template <> struct Lanes<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t M __attribute__((vector_size(64)));
  static constexpr int kWidth = 16;
};
template <> struct Lanes<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t M __attribute__((vector_size(64)));
  static constexpr int kWidth = 8;
};

// Kernel 2, the paper's setting: W windows per step, the even and odd columns of both input rows
// split apart by shuffles. Writes the pooled row to `out`, or with restore (out0, out1 not null)
// the two restored rows. Same result as pool_row: the first maximum in row-major window order,
// or the first NaN.
template <typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE bool pool_row_2x2(const T* x0, const T* x1, int64_t cols, T* out, T* out0, T* out1) {
  const int64_t pooled_cols = cols / 2;
  const bool restore = out0 != nullptr;
  int64_t c = 0;
  bool bad = false;
  if constexpr (std::is_same<T, A>::value) {
    using V = typename Lanes<A>::V;
    using M = typename Lanes<A>::M;
    constexpr int W = Lanes<A>::kWidth;
    M even, odd, low, high, nonfinite = {};
    for (int l = 0; l < W; ++l) {
      even[l] = 2 * l, odd[l] = 2 * l + 1;
      low[l] = l / 2 + (l % 2) * W, high[l] = W / 2 + l / 2 + (l % 2) * W;  // interleave two vectors
    }
    for (; c + W <= pooled_cols; c += W) {
      V r0[2], r1[2];
      std::memcpy(r0, x0 + 2 * c, sizeof(r0));
      std::memcpy(r1, x1 + 2 * c, sizeof(r1));
      const V a = __builtin_shuffle(r0[0], r0[1], even), b = __builtin_shuffle(r0[0], r0[1], odd);
      const V e = __builtin_shuffle(r1[0], r1[1], even), f = __builtin_shuffle(r1[0], r1[1], odd);
      // strictly greater replaces, so ties keep the earlier value, as window_takes does
      const V m1 = b > a ? b : a;
      const V m2 = e > m1 ? e : m1;
      const V m = f > m2 ? f : m2;
      const V z = (a - a) + (b - b) + (e - e) + (f - f);  // NaN exactly when a value is NaN/Inf
      nonfinite |= z != z;
      if (!restore) {
        std::memcpy(out + c, &m, sizeof(m));
        continue;
      }
      // The winner is the last of a, b, e, f that replaced the running max; its position is
      // carried as a float (0..3) so that every select tests one comparison of two vectors
      // (GCC 12 scalarizes selects on combined or inverted float masks).
      const V zero = {}, one = zero + 1, two = zero + 2, three = zero + 3;
      V at = b > a ? one : zero;
      at = e > m1 ? two : at;
      at = f > m2 ? three : at;
      const V ra = at == zero ? m : zero, rb = at == one ? m : zero;
      const V re = at == two ? m : zero, rf = at == three ? m : zero;
      const V w0[2] = {__builtin_shuffle(ra, rb, low), __builtin_shuffle(ra, rb, high)};
      const V w1[2] = {__builtin_shuffle(re, rf, low), __builtin_shuffle(re, rf, high)};
      std::memcpy(out0 + 2 * c, w0, sizeof(w0));
      std::memcpy(out1 + 2 * c, w1, sizeof(w1));
    }
    // A NaN breaks the plain max chain: redo such a row with window_takes (rare: attacked rows).
    for (int l = 0; l < W; ++l) bad |= nonfinite[l] != 0;
    if (bad) c = 0;
  }
  for (; c < pooled_cols; ++c) {
    const A v[4] = {static_cast<A>(x0[2 * c]), static_cast<A>(x0[2 * c + 1]), static_cast<A>(x1[2 * c]),
                    static_cast<A>(x1[2 * c + 1])};
    int arg = 0;
    for (int w = 1; w < 4; ++w) arg = window_takes(v[w], v[arg]) ? w : arg;
    bad |= any_nonfinite(x0 + 2 * c, 2) | any_nonfinite(x1 + 2 * c, 2);
    if (!restore) {
      out[c] = static_cast<T>(v[arg]);
      continue;
    }
    out0[2 * c] = arg == 0 ? static_cast<T>(v[0]) : T(0);
    out0[2 * c + 1] = arg == 1 ? static_cast<T>(v[1]) : T(0);
    out1[2 * c] = arg == 2 ? static_cast<T>(v[2]) : T(0);
    out1[2 * c + 1] = arg == 3 ? static_cast<T>(v[3]) : T(0);
  }
  if (cols % 2) {
    bad |= any_nonfinite(x0 + cols - 1, 1) | any_nonfinite(x1 + cols - 1, 1);
    if (restore) out0[cols - 1] = out1[cols - 1] = T(0);  // the dropped column
  }
  return bad;
}

// Pooled rows [r0, r1) of segment s for every kernel; K = 2 (the paper's setting) selects the
// vectorized row at compile time, K = 0 means the kernel is only known at run time.
template <Isa, int K, typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE bool pool_band_body(const T* g, const PoolSegment& s, int64_t kernel_rt, int64_t r0, int64_t r1,
                                     bool restore, T* out, A* best, int64_t* arg) {
  const int64_t k = K ? K : kernel_rt;
  const int64_t pooled_cols = s.cols / k, pooled_rows = s.rows / k;
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = g + s.in_offset + r * k * s.cols;
    if (K == 2) {
      T* o = out + s.out_offset + (restore ? r * 2 * s.cols : r * pooled_cols);
      bad |= restore ? pool_row_2x2<T>(x, x + s.cols, s.cols, nullptr, o, o + s.cols)
                     : pool_row_2x2<T>(x, x + s.cols, s.cols, o, nullptr, nullptr);
      continue;
    }
    bad |= pool_row<T>(x, s.cols, k, pooled_cols, best, arg, restore);
    if (!restore) {
      T* o = out + s.out_offset + r * pooled_cols;
      for (int64_t c = 0; c < pooled_cols; ++c) o[c] = static_cast<T>(best[c]);
      continue;
    }
    // restore: the max at its first arg-max, 0 elsewhere, the dropped columns included.
    for (int64_t dr = 0; dr < k; ++dr) {
      T* o = out + s.out_offset + (r * k + dr) * s.cols;
      for (int64_t c = 0; c < pooled_cols; ++c)
        for (int64_t dc = 0; dc < k; ++dc)
          o[c * k + dc] = arg[c] == dr * k + dc ? static_cast<T>(best[c]) : T(0);
      for (int64_t c = pooled_cols * k; c < s.cols; ++c) o[c] = T(0);
    }
  }
  if (r1 == pooled_rows) {  // the dropped rows: checked, and zero in restore mode
    const int64_t first = s.in_offset + pooled_rows * k * s.cols, len = (s.rows - pooled_rows * k) * s.cols;
    bad |= any_nonfinite(g + first, len);
    if (restore) std::fill(out + first, out + first + len, T(0));
  }
  return bad;
}

RA_CPU_KERNEL(pool_band, (int K, typename T), (K, T),
              (const T* g, const PoolSegment& s, int64_t k, int64_t r0, int64_t r1, bool restore, T* out,
               acc_t<T>* best, int64_t* arg),
              (g, s, k, r0, r1, restore, out, best, arg))

}  // namespace

template <typename T>
void maxpool_amplify(const T* G, int64_t n, int64_t d, const int64_t* table, int64_t segments, int64_t kernel,
                     bool restore, int64_t out_width, T* out, bool* nonfinite) {
  using A = acc_t<T>;
  std::vector<PoolSegment> segs(segments);
  int64_t widest = 1;  // pooled columns of the widest segment that has a window
  for (int64_t s = 0; s < segments; ++s) {
    segs[s] = pool_segment(table + 5 * s);
    if (segs[s].pooled && segs[s].rows >= kernel) widest = std::max(widest, segs[s].cols / kernel);
  }
  const std::vector<Task> tasks = make_tasks(segs, d, kernel);
  const int64_t per_row = tasks.size();
  std::vector<char> bad(n * per_row, 0);
  const Isa isa = best_isa();
  // Scratch for every thread, allocated here: an allocation failure inside the parallel region
  // would terminate the process instead of raising.
  const int threads = omp_get_max_threads();
  std::vector<A> best_all(threads * widest);
  std::vector<int64_t> arg_all(threads * widest);
#pragma omp parallel num_threads(threads)
  {
    A* best = best_all.data() + omp_get_thread_num() * widest;
    int64_t* arg = arg_all.data() + omp_get_thread_num() * widest;
#pragma omp for schedule(dynamic, 4)
    for (int64_t w = 0; w < n * per_row; ++w) {
      const int64_t i = w / per_row;
      const Task& t = tasks[w % per_row];
      const T* g = G + i * d;
      T* o = out + i * out_width;
      if (t.kind == TaskKind::kPool) {
        const PoolSegment& s = segs[t.seg];
        bad[w] = kernel == 2 ? pool_band<2, T>(isa, g, s, kernel, t.begin, t.end, restore, o, best, arg)
                             : pool_band<0, T>(isa, g, s, kernel, t.begin, t.end, restore, o, best, arg);
      } else if (t.kind == TaskKind::kCopy) {
        const PoolSegment& s = segs[t.seg];
        bad[w] = any_nonfinite(g + t.begin, t.end - t.begin);
        std::memcpy(o + s.out_offset + (t.begin - s.in_offset), g + t.begin, (t.end - t.begin) * sizeof(T));
      } else {
        bad[w] = any_nonfinite(g + t.begin, t.end - t.begin);
        if (restore) std::fill(o + t.begin, o + t.end, T(0));
      }
    }
  }
  for (int64_t i = 0; i < n; ++i)
    nonfinite[i] = std::any_of(bad.begin() + i * per_row, bad.begin() + (i + 1) * per_row, [](char b) { return b != 0; });
}

#define RA_INSTANTIATE(T)                                                                                       \
  template void maxpool_amplify<T>(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, bool, int64_t, \
                                   T*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
