// CPU kernels of client_stats and clip_rows (SPEC §4.5): one read of G for the statistics.
//
// G is cut into a fixed number of column chunks (a function of d only, never of the thread
// count), each walked in blocks: for one block every row is read once while ref's block stays in
// cache. Squares and products accumulate in float64 over 8 fixed lanes (the same order on every
// ISA), chunks are merged in column order, so the result is bitwise reproducible.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "core/client_stats.h"
#include "cpu/isa.h"
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

template <typename T> RA_ALWAYS_INLINE double load(const T* p, int64_t j) {
  return static_cast<double>(static_cast<acc_t<T>>(p[j]));
}

// Squares (and products with ref, given as float64) of one row over one block. A float64 value
// can square to Inf while finite, so float64 rows also sum x * 0, NaN exactly when x is NaN/Inf.
template <Isa isa, typename T, bool kDot>
RA_ALWAYS_INLINE void row_block_body(const T* g, const T* ref, int64_t len, double* sumsq, double* dot,
                                     double* check) {
  constexpr bool kCheck = std::is_same<T, double>::value;
  f64x8 s = {}, t = {}, f = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const f64x8 x = load_f64x8_on<isa>(g + j);
    s += x * x;
    if (kDot) t += x * load_f64x8_on<isa>(ref + j);
    if (kCheck) f += x * 0.0;
  }
  for (int l = 0; j < len; ++j, ++l) {
    const double x = load(g, j);
    s[l] += x * x;
    if (kDot) t[l] += x * load(ref, j);
    if (kCheck) f[l] += x * 0.0;
  }
  *sumsq += fold_f64x8(s);
  if (kDot) *dot += fold_f64x8(t);
  if (kCheck) *check += fold_f64x8(f);
}

template <typename T, bool kDot>
RA_TARGET_AVX512 void row_block_avx512(const T* g, const T* r, int64_t len, double* s, double* t, double* f) {
  row_block_body<Isa::kAvx512, T, kDot>(g, r, len, s, t, f);
}
template <typename T, bool kDot>
RA_TARGET_AVX2 void row_block_avx2(const T* g, const T* r, int64_t len, double* s, double* t, double* f) {
  row_block_body<Isa::kAvx2, T, kDot>(g, r, len, s, t, f);
}
template <typename T, bool kDot>
void row_block_base(const T* g, const T* r, int64_t len, double* s, double* t, double* f) {
  row_block_body<Isa::kBase, T, kDot>(g, r, len, s, t, f);
}

template <typename T, bool kDot>
void row_block(Isa isa, const T* g, const T* r, int64_t len, double* s, double* t, double* f) {
  if (isa == Isa::kAvx512) return row_block_avx512<T, kDot>(g, r, len, s, t, f);
  if (isa == Isa::kAvx2) return row_block_avx2<T, kDot>(g, r, len, s, t, f);
  row_block_base<T, kDot>(g, r, len, s, t, f);
}

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

// Per-row statistics of G (sumsq, dot, counts, value check) and the squared norm of ref.
struct Totals {
  std::vector<RowStats> rows;
  std::vector<double> check;
  double ref_sumsq = 0.0;
};

template <typename T>
Totals accumulate(const T* G, int64_t n, int64_t d, const T* ref, int64_t wstart, int64_t wlen) {
  const int64_t chunks = std::min(kMaxChunks, std::max<int64_t>(1, (d + kChunkColumns - 1) / kChunkColumns));
  std::vector<RowStats> part(chunks * n);
  std::vector<double> check(chunks * n, 0.0), ref_part(chunks, 0.0);
  const Isa isa = cpu_isa();
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      RowStats* st = &part[c * n];
      double* ck = &check[c * n];
      for (int64_t i = 0; i < n; ++i) row_stats_init(st[i]);
      const int64_t c0 = d * c / chunks, c1 = d * (c + 1) / chunks;
      for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
        const int64_t len = std::min(kBlock, c1 - b0);
        if (ref) {  // ref's block is read here first and then stays in cache for the n rows
          double unused = 0.0;  // ops.client_stats rejects a non-finite ref before the kernel
          row_block<T, false>(isa, ref + b0, nullptr, len, &ref_part[c], nullptr, &unused);
        }
        const int64_t w0 = std::max(b0, wstart), w1 = std::min(b0 + len, wstart + wlen);
        for (int64_t i = 0; i < n; ++i) {
          const T* g = G + i * d;
          if (ref)
            row_block<T, true>(isa, g + b0, ref + b0, len, &st[i].sumsq, &st[i].dot, &ck[i]);
          else
            row_block<T, false>(isa, g + b0, nullptr, len, &st[i].sumsq, &st[i].dot, &ck[i]);
          if (w0 < w1) count_signs(g, w0, w1, st[i]);
        }
      }
    }
  }
  Totals out;
  out.rows.resize(n);
  out.check.assign(n, 0.0);
  for (int64_t i = 0; i < n; ++i) row_stats_init(out.rows[i]);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = 0; i < n; ++i) {
      row_stats_merge(out.rows[i], part[c * n + i]);
      out.check[i] += check[c * n + i];
    }
    out.ref_sumsq += ref_part[c];
  }
  return out;
}

// 16/32-bit rows: a non-finite sum of squares; float64 rows: the x * 0 sum (1e200 squares to Inf).
template <typename T> bool row_nonfinite(const Totals& t, int64_t i) {
  return row_sumsq_nonfinite(std::is_same<T, double>::value ? t.check[i] : t.rows[i].sumsq);
}

template <typename T, typename A = acc_t<T>> RA_ALWAYS_INLINE void scale_body(const T* g, int64_t len, A f, T* o) {
  for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(static_cast<A>(g[j]) * f);
}
template <typename T, typename A = acc_t<T>> RA_TARGET_AVX512 void scale_avx512(const T* g, int64_t len, A f, T* o) {
  scale_body<T>(g, len, f, o);
}
template <typename T, typename A = acc_t<T>> RA_TARGET_AVX2 void scale_avx2(const T* g, int64_t len, A f, T* o) {
  scale_body<T>(g, len, f, o);
}
template <typename T, typename A = acc_t<T>> void scale_base(const T* g, int64_t len, A f, T* o) {
  scale_body<T>(g, len, f, o);
}

}  // namespace

template <typename T>
void client_stats(const T* G, int64_t n, int64_t d, int64_t window_start, int64_t window_length, const T* ref,
                  acc_t<T>* norm, acc_t<T>* frac, acc_t<T>* dot, acc_t<T>* ref_norm, bool* nonfinite) {
  using A = acc_t<T>;
  const Totals t = accumulate(G, n, d, ref, window_start, window_length);
  for (int64_t i = 0; i < n; ++i) {
    const RowStats& s = t.rows[i];
    norm[i] = static_cast<A>(row_norm(s));
    for (int c = 0; c < 3; ++c) frac[i * 3 + c] = static_cast<A>(sign_fraction(s, c, window_length));
    if (ref) dot[i] = static_cast<A>(s.dot);
    nonfinite[i] = row_nonfinite<T>(t, i);
  }
  if (ref) ref_norm[0] = static_cast<A>(sqrt(t.ref_sumsq));
}

template <typename T>
void clip_rows(const T* G, int64_t n, int64_t d, const acc_t<T>* max_norm, T* out, bool* nonfinite) {
  using A = acc_t<T>;
  const Totals t = accumulate<T>(G, n, d, nullptr, 0, 0);
  std::vector<A> factor(n);
  for (int64_t i = 0; i < n; ++i) {
    factor[i] = static_cast<A>(clip_factor(row_norm(t.rows[i]), static_cast<double>(max_norm[i])));
    nonfinite[i] = row_nonfinite<T>(t, i);
  }
  const int64_t blocks = (d + kChunkColumns - 1) / kChunkColumns;
  const Isa isa = cpu_isa();
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * blocks; ++task) {
    const int64_t i = task / blocks, b0 = (task % blocks) * kChunkColumns;
    const int64_t len = std::min(kChunkColumns, d - b0);
    const T* g = G + i * d + b0;
    T* o = out + i * d + b0;
    if (isa == Isa::kAvx512)
      scale_avx512<T>(g, len, factor[i], o);
    else if (isa == Isa::kAvx2)
      scale_avx2<T>(g, len, factor[i], o);
    else
      scale_base<T>(g, len, factor[i], o);
  }
}

#define RA_INSTANTIATE(T)                                                                                \
  template void client_stats<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, acc_t<T>*,      \
                                acc_t<T>*, acc_t<T>*, acc_t<T>*, bool*);                                \
  template void clip_rows<T>(const T*, int64_t, int64_t, const acc_t<T>*, T*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
