// CPU kernels of client_stats and clip_rows (docs/ops.md): one read of G for the statistics.
//
// G is cut into a fixed number of column chunks (a function of d only, never of the thread
// count), each walked in blocks: for one block every row is read once while ref's block stays in
// cache. Squares and products accumulate in float64 over 8 fixed lanes (the same order on every
// ISA), with core/client_stats.h's scaled sums for float64 input; chunks are merged in column
// order, so the result is bitwise reproducible.
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types

#include <algorithm>
#include <type_traits>
#include <vector>

#include "core/client_stats.h"
#include "cpu/kernels.h"

namespace robustagg {
namespace cpu {
namespace {

constexpr int kLanes = 8;
// Columns per block: each visit of a row streams 128 KiB of float32, long enough for the hardware
// prefetcher (8 KiB visits ran 2x slower, benchmarks/NOTES.md); ref's block stays in L2.
constexpr int64_t kBlock = 32768;
constexpr int64_t kChunkColumns = 1 << 16;
constexpr int64_t kMaxChunks = 256;

template <Isa isa, typename T, bool kRef>
RA_ALWAYS_INLINE void add_vector(RowSums<f64x8>& acc, const T* g, const T* ref) {
  constexpr bool kScaled = std::is_same<T, double>::value;
  const f64x8 x = load_f64x8_on<isa>(g);
  row_sums_add<kScaled>(acc, x);
  if constexpr (kRef) row_sums_add_ref<kScaled>(acc, x, load_f64x8_on<isa>(ref));
}

// The sums of one row (and with ref, its dot with ref and distance from it) over one block, in
// 8 float64 lanes folded in a fixed order; the partial last vector is zero-padded, and zeros add
// nothing to any of the sums.
template <Isa isa, typename T, bool kRef>
RA_ALWAYS_INLINE void row_block_body(const T* g, const T* ref, int64_t len, RowSums<double>* out) {
  RowSums<f64x8> acc;
  row_sums_init(acc);
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) add_vector<isa, T, kRef>(acc, g + j, kRef ? ref + j : nullptr);
  if (j < len) {
    T tail[kLanes] = {}, tail_ref[kLanes] = {};
    for (int64_t l = 0; j + l < len; ++l) {
      tail[l] = g[j + l];
      if (kRef) tail_ref[l] = ref[j + l];
    }
    add_vector<isa, T, kRef>(acc, tail, tail_ref);
  }
  RowSums<double> folded;
  folded.sumsq = {fold_f64x8(acc.sumsq.plain), fold_f64x8(acc.sumsq.down), fold_f64x8(acc.sumsq.up)};
  folded.dot = {fold_f64x8(acc.dot.plain), fold_f64x8(acc.dot.down)};
  folded.dist = {fold_f64x8(acc.dist.plain), fold_f64x8(acc.dist.down), fold_f64x8(acc.dist.up)};
  row_sums_merge(*out, folded);
}

RA_CPU_KERNEL(row_block, (typename T, bool kRef), (T, kRef),
              (const T* g, const T* r, int64_t len, RowSums<double>* out), (g, r, len, out))

// Sign classes of one row over the columns [lo, hi) of the window.
template <typename T> void count_signs(const T* g, int64_t lo, int64_t hi, RowStats& st) {
  int64_t pos = 0, neg = 0, zero = 0;
  for (int64_t j = lo; j < hi; ++j) {
    const acc_t<T> x = static_cast<acc_t<T>>(g[j]);
    pos += x > 0;
    neg += x < 0;
    zero += x == 0;
  }
  st.count[kPositive] += pos;
  st.count[kNegative] += neg;
  st.count[kZero] += zero;
}

// Per-row statistics of G and the sums of ref itself (its norm).
struct Totals {
  std::vector<RowStats> rows;
  RowSums<double> ref;
};

template <typename T>
Totals accumulate(const T* G, int64_t n, int64_t d, const T* ref, int64_t wstart, int64_t wlen) {
  const int64_t chunks = std::min(kMaxChunks, std::max<int64_t>(1, (d + kChunkColumns - 1) / kChunkColumns));
  std::vector<RowStats> part(chunks * n);
  std::vector<RowSums<double>> ref_part(chunks);
  const Isa isa = best_isa();
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      RowStats* st = &part[c * n];
      for (int64_t i = 0; i < n; ++i) row_stats_init(st[i]);
      row_sums_init(ref_part[c]);
      const int64_t c0 = d * c / chunks, c1 = d * (c + 1) / chunks;
      for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
        const int64_t len = std::min(kBlock, c1 - b0);
        // ref's block is read here first and then stays in cache for the n rows
        if (ref) row_block<T, false>(isa, ref + b0, nullptr, len, &ref_part[c]);
        const int64_t w0 = std::max(b0, wstart), w1 = std::min(b0 + len, wstart + wlen);
        for (int64_t i = 0; i < n; ++i) {
          const T* g = G + i * d;
          if (ref)
            row_block<T, true>(isa, g + b0, ref + b0, len, &st[i].sums);
          else
            row_block<T, false>(isa, g + b0, nullptr, len, &st[i].sums);
          if (w0 < w1) count_signs(g, w0, w1, st[i]);
        }
      }
    }
  }
  Totals out;
  out.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) row_stats_init(out.rows[i]);
  row_sums_init(out.ref);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = 0; i < n; ++i) row_stats_merge(out.rows[i], part[c * n + i]);
    row_sums_merge(out.ref, ref_part[c]);
  }
  return out;
}

template <typename T> constexpr bool kScaledSums = std::is_same<T, double>::value;

// out = (x * pre) * factor in float64 (core's clip_value), rounded once to T.
template <Isa, typename T> RA_ALWAYS_INLINE void scale_body(const T* g, int64_t len, ClipFactor f, T* o) {
  for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(clip_value(f, static_cast<double>(static_cast<acc_t<T>>(g[j]))));
}
RA_CPU_KERNEL(scale, (typename T), (T), (const T* g, int64_t len, ClipFactor f, T* o), (g, len, f, o))

}  // namespace

template <typename T>
void client_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length, const T* ref,
                  double* norm, double* frac, double* dot, double* ref_norm, double* ref_dist, bool* nonfinite) {
  constexpr bool kScaled = kScaledSums<T>;
  const Totals t = accumulate(G, n, d, ref, window_start, window_length);
  for (int64_t i = 0; i < n; ++i) {
    const RowStats& s = t.rows[i];
    norm[i] = norm_value(scaled_norm<kScaled>(s.sums.sumsq));
    for (int c = 0; c < 3; ++c) frac[i * 3 + c] = sign_fraction(s, c, window_length);
    if (ref) {
      dot[i] = dot_value<kScaled>(s.sums.dot);
      ref_dist[i] = norm_value(scaled_norm<kScaled>(s.sums.dist));
    }
    nonfinite[i] = row_nonfinite<kScaled>(s.sums);
  }
  if (ref) ref_norm[0] = norm_value(scaled_norm<kScaled>(t.ref.sumsq));
}

template <typename T>
void clip_rows(const T* G, int64_t n, int64_t d, const acc_t<T>* max_norm, T* out, bool* nonfinite) {
  constexpr bool kScaled = kScaledSums<T>;
  const Totals t = accumulate<T>(G, n, d, nullptr, 0, 0);
  std::vector<ClipFactor> factor(n);
  for (int64_t i = 0; i < n; ++i) {
    factor[i] = clip_factor(scaled_norm<kScaled>(t.rows[i].sums.sumsq), static_cast<double>(max_norm[i]));
    nonfinite[i] = row_nonfinite<kScaled>(t.rows[i].sums);
  }
  const int64_t blocks = (d + kChunkColumns - 1) / kChunkColumns;
  const Isa isa = best_isa();
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * blocks; ++task) {
    const int64_t i = task / blocks, b0 = (task % blocks) * kChunkColumns;
    const int64_t len = std::min(kChunkColumns, d - b0);
    const T* g = G + i * d + b0;
    T* o = out + i * d + b0;
    scale<T>(isa, g, len, factor[i], o);
  }
}

#define RA_INSTANTIATE(T)                                                                                \
  template void client_stats<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, double*, double*, \
                                double*, double*, double*, bool*);                                      \
  template void clip_rows<T>(const T*, int64_t, int64_t, const acc_t<T>*, T*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
