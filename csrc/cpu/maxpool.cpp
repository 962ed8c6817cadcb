// CPU kernel of maxpool_amplify (SPEC §4.7): every segment of the layout table and every client in
// one call, no loop over layers outside the kernel.
//
// The row of G is cut into tasks: bands of pooled rows of a pooled segment, slices of a
// pass-through segment, and gaps no segment covers (Layout.flat's dropped tail). Tasks of all
// clients run in one OpenMP loop. Every value of the row is read once, so the non-finite check
// covers the dropped remainder too; with restore=True every output value is written exactly once.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/maxpool.h"
#include "cpu/isa.h"
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

// One pooled row: best[c] / arg[c] over the kernel x kernel windows of input rows x[0..kernel).
// K is the kernel when known at compile time (2, the paper's default), 0 otherwise.
template <int K, typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE bool pool_row(const T* x, int64_t cols, int64_t kernel_rt, int64_t pooled_cols, A* best,
                               int32_t* arg, bool want_arg) {
  const int64_t k = K ? K : kernel_rt;
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
          if (want_arg) arg[c] = static_cast<int32_t>(dr * k + dc);
        }
      }
    }
  }
  return bad;
}

template <int K, typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE bool pool_band_body(const T* g, const PoolSegment& s, int64_t kernel_rt, int64_t r0, int64_t r1,
                                     bool restore, T* out, A* best, int32_t* arg) {
  const int64_t k = K ? K : kernel_rt;
  const int64_t pooled_cols = s.cols / k, pooled_rows = s.rows / k;
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = g + s.in_offset + r * k * s.cols;
    bad |= pool_row<K, T>(x, s.cols, k, pooled_cols, best, arg, restore);
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

template <int K, typename T, typename A = acc_t<T>>
RA_TARGET_AVX512 bool pool_band_avx512(const T* g, const PoolSegment& s, int64_t k, int64_t r0, int64_t r1, bool restore,
                                       T* out, A* best, int32_t* arg) {
  return pool_band_body<K, T>(g, s, k, r0, r1, restore, out, best, arg);
}
template <int K, typename T, typename A = acc_t<T>>
RA_TARGET_AVX2 bool pool_band_avx2(const T* g, const PoolSegment& s, int64_t k, int64_t r0, int64_t r1, bool restore,
                                   T* out, A* best, int32_t* arg) {
  return pool_band_body<K, T>(g, s, k, r0, r1, restore, out, best, arg);
}
template <int K, typename T, typename A = acc_t<T>>
bool pool_band_base(const T* g, const PoolSegment& s, int64_t k, int64_t r0, int64_t r1, bool restore, T* out,
                    A* best, int32_t* arg) {
  return pool_band_body<K, T>(g, s, k, r0, r1, restore, out, best, arg);
}

template <int K, typename T, typename A = acc_t<T>>
bool pool_band(Isa isa, const T* g, const PoolSegment& s, int64_t k, int64_t r0, int64_t r1, bool restore, T* out,
               A* best, int32_t* arg) {
  if (isa == Isa::kAvx512) return pool_band_avx512<K, T>(g, s, k, r0, r1, restore, out, best, arg);
  if (isa == Isa::kAvx2) return pool_band_avx2<K, T>(g, s, k, r0, r1, restore, out, best, arg);
  return pool_band_base<K, T>(g, s, k, r0, r1, restore, out, best, arg);
}

}  // namespace

template <typename T>
void maxpool_amplify(const T* G, int64_t n, int64_t d, const int64_t* table, int64_t segments, int64_t kernel,
                     bool restore, int64_t out_width, T* out, bool* nonfinite) {
  using A = acc_t<T>;
  std::vector<PoolSegment> segs(segments);
  int64_t widest = 1;
  for (int64_t s = 0; s < segments; ++s) {
    segs[s] = pool_segment(table + 5 * s);
    widest = std::max(widest, segs[s].cols / kernel + 1);
  }
  const std::vector<Task> tasks = make_tasks(segs, d, kernel);
  const int64_t per_row = tasks.size();
  std::vector<char> bad(n * per_row, 0);
  const Isa isa = cpu_isa();
#pragma omp parallel
  {
    std::vector<A> best(widest);
    std::vector<int32_t> arg(widest);
#pragma omp for schedule(dynamic, 4)
    for (int64_t w = 0; w < n * per_row; ++w) {
      const int64_t i = w / per_row;
      const Task& t = tasks[w % per_row];
      const T* g = G + i * d;
      T* o = out + i * out_width;
      if (t.kind == TaskKind::kPool) {
        const PoolSegment& s = segs[t.seg];
        bad[w] = kernel == 2 ? pool_band<2, T>(isa, g, s, kernel, t.begin, t.end, restore, o, best.data(), arg.data())
                             : pool_band<0, T>(isa, g, s, kernel, t.begin, t.end, restore, o, best.data(), arg.data());
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
RA_INSTANTIATE(c10::Half)
RA_INSTANTIATE(c10::BFloat16)
RA_INSTANTIATE(float)
RA_INSTANTIATE(double)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
