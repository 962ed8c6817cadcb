// CPU kernels of pairwise_sqdist and pairwise_cosine (SPEC §4.8).
//
// The Gram matrix K = G G^T is accumulated in float64 over column tiles: the tile of all rows is
// converted to float64 once (a float32 product is then exact), and register blocks of rows
// multiply it with 8-lane accumulators. Every entry K_ij goes through the same operations in the
// same order, wherever it sits in a block, and tiles are added in column order, so the result is
// deterministic, symmetric, and K_ii == K_jj == K_ij for equal rows. Pairs whose Gram distance
// cancels (csrc/core/pairwise.h) are recomputed from direct differences in one batched pass: that
// keeps full precision for close rows and gives exactly 0 / 1 only for equal rows.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "core/pairwise.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace robustagg {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;  // columns per tile: 8 KiB of float64 per row
constexpr int64_t kGramChunks = 64;
constexpr int64_t kGramBudget = int64_t(1) << 24;  // float64 partial Gram entries, 128 MiB
constexpr int64_t kDirectBlock = 2048;
constexpr int64_t kDirectChunks = 64;
constexpr int64_t kDirectBudget = int64_t(1) << 22;  // partial sums kept by the direct pass

// K[i0.., j0..] += the products of rows i0..i0+BI and j0..j0+BJ of the float64 tile X (len is a
// multiple of 8, ld the row stride).
template <int BI, int BJ>
RA_ALWAYS_INLINE void gram_block_body(const double* X, int64_t ld, int64_t i0, int64_t j0, int64_t len, double* K,
                                      int64_t ldk) {
  f64x8 acc[BI][BJ] = {};
  for (int64_t c = 0; c < len; c += 8) {
    f64x8 a[BI], b[BJ];
    for (int i = 0; i < BI; ++i) a[i] = load_f64x8(X + (i0 + i) * ld + c);
    for (int j = 0; j < BJ; ++j) b[j] = load_f64x8(X + (j0 + j) * ld + c);
    for (int i = 0; i < BI; ++i)
      for (int j = 0; j < BJ; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < BI; ++i)
    for (int j = 0; j < BJ; ++j) K[(i0 + i) * ldk + j0 + j] += fold_f64x8(acc[i][j]);
}

// 4x4 blocks fill 16 of the 32 AVX-512 registers; AVX2 and SSE2 have 16 and take 2x2.
RA_TARGET_AVX512 void gram_block_avx512(const double* X, int64_t ld, int64_t i0, int64_t j0, int64_t len, double* K,
                                        int64_t ldk) {
  gram_block_body<4, 4>(X, ld, i0, j0, len, K, ldk);
}
RA_TARGET_AVX2 void gram_block_avx2(const double* X, int64_t ld, int64_t i0, int64_t j0, int64_t len, double* K,
                                    int64_t ldk) {
  gram_block_body<2, 2>(X, ld, i0, j0, len, K, ldk);
}
void gram_block_base(const double* X, int64_t ld, int64_t i0, int64_t j0, int64_t len, double* K, int64_t ldk) {
  gram_block_body<2, 2>(X, ld, i0, j0, len, K, ldk);
}

// Converts columns [c0, c0+len) of row g to float64, zero-padded to `padded`; true on NaN/Inf.
template <typename T> bool convert_row(const T* g, int64_t len, int64_t padded, double* x) {
  using A = acc_t<T>;
  bool bad = false;
  for (int64_t c = 0; c < len; ++c) {
    const A v = static_cast<A>(g[c]);
    bad |= !(v - v == A(0));
    x[c] = static_cast<double>(v);
  }
  for (int64_t c = len; c < padded; ++c) x[c] = 0.0;
  return bad;
}

// The upper triangle (and diagonal) of K in float64; ldk = rows rounded up to the block size.
// Threads never wait on each other: each owns whole column chunks (their count depends on d and n
// only) with a private tile and partial K, and the partials are added in chunk order at the end.
template <typename T> std::vector<double> gram(const T* G, int64_t n, int64_t d, bool* nonfinite, int64_t& ldk) {
  const Isa isa = cpu_isa();
  const int block = isa == Isa::kAvx512 ? 4 : 2;
  ldk = (n + block - 1) / block * block;
  const int64_t tiles = (d + kTile - 1) / kTile;
  const int64_t chunks = std::max<int64_t>(1, std::min({kGramChunks, tiles, kGramBudget / (ldk * ldk)}));
  std::vector<double> part(chunks * ldk * ldk, 0.0);
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t i = 0; i < ldk; i += block)
    for (int64_t j = i; j < ldk; j += block) blocks.emplace_back(i, j);
  std::vector<char> bad(chunks * n, 0);
#pragma omp parallel
  {
    std::vector<double> X(ldk * kTile, 0.0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      double* K = part.data() + ch * ldk * ldk;
      for (int64_t t = tiles * ch / chunks; t < tiles * (ch + 1) / chunks; ++t) {
        const int64_t c0 = t * kTile, len = std::min(kTile, d - c0), padded = (len + 7) / 8 * 8;
        for (int64_t i = 0; i < n; ++i) bad[ch * n + i] |= convert_row(G + i * d + c0, len, padded, X.data() + i * kTile);
        for (const auto& [i0, j0] : blocks) {
          if (isa == Isa::kAvx512)
            gram_block_avx512(X.data(), kTile, i0, j0, padded, K, ldk);
          else if (isa == Isa::kAvx2)
            gram_block_avx2(X.data(), kTile, i0, j0, padded, K, ldk);
          else
            gram_block_base(X.data(), kTile, i0, j0, padded, K, ldk);
        }
      }
    }
  }
  std::vector<double> K(ldk * ldk, 0.0);
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t e = 0; e < ldk * ldk; ++e) K[e] += part[ch * ldk * ldk + e];
  for (int64_t i = 0; i < n; ++i) {
    nonfinite[i] = false;
    for (int64_t ch = 0; ch < chunks; ++ch) nonfinite[i] = nonfinite[i] || bad[ch * n + i] != 0;
  }
  return K;
}

template <typename T> RA_ALWAYS_INLINE double sqdist_body(const T* a, const T* b, int64_t len) {
  f64x8 s = {};
  int64_t c = 0;
  for (; c + 8 <= len; c += 8) {
    const f64x8 t = load_f64x8(a + c) - load_f64x8(b + c);
    s += t * t;
  }
  for (int l = 0; c < len; ++c, ++l)
    s[l] += sqdiff(static_cast<double>(static_cast<acc_t<T>>(a[c])), static_cast<double>(static_cast<acc_t<T>>(b[c])));
  return fold_f64x8(s);
}
template <typename T> RA_TARGET_AVX512 double sqdist_avx512(const T* a, const T* b, int64_t len) {
  return sqdist_body(a, b, len);
}
template <typename T> RA_TARGET_AVX2 double sqdist_avx2(const T* a, const T* b, int64_t len) {
  return sqdist_body(a, b, len);
}
template <typename T> double sqdist_base(const T* a, const T* b, int64_t len) { return sqdist_body(a, b, len); }

// Direct squared distances sum_c (G_ic - G_jc)^2 of the listed pairs, in one pass over the columns:
// fixed column chunks in parallel, each walked in blocks small enough for the rows to stay cached.
template <typename T>
std::vector<double> direct_sqdist(const T* G, int64_t d, const std::vector<std::pair<int64_t, int64_t>>& pairs) {
  const int64_t P = pairs.size();
  std::vector<double> out(P, 0.0);
  if (P == 0) return out;
  const int64_t chunks = std::max<int64_t>(1, std::min({kDirectChunks, (d + kDirectBlock - 1) / kDirectBlock,
                                                        kDirectBudget / P}));
  std::vector<double> part(chunks * P, 0.0);
  const Isa isa = cpu_isa();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c1 = d * (ch + 1) / chunks;
    for (int64_t b0 = d * ch / chunks; b0 < c1; b0 += kDirectBlock) {
      const int64_t len = std::min(kDirectBlock, c1 - b0);
      for (int64_t p = 0; p < P; ++p) {
        const T* a = G + pairs[p].first * d + b0;
        const T* b = G + pairs[p].second * d + b0;
        const double s = isa == Isa::kAvx512 ? sqdist_avx512(a, b, len)
                         : isa == Isa::kAvx2 ? sqdist_avx2(a, b, len)
                                             : sqdist_base(a, b, len);
        part[ch * P + p] += s;
      }
    }
  }
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t p = 0; p < P; ++p) out[p] += part[ch * P + p];
  return out;
}

}  // namespace

template <typename T> void pairwise(const T* G, int64_t n, int64_t d, bool cosine, acc_t<T>* out, bool* nonfinite) {
  using A = acc_t<T>;
  int64_t ldk = 0;
  const std::vector<double> K = gram(G, n, d, nonfinite, ldk);
  auto k = [&](int64_t i, int64_t j) { return K[std::min(i, j) * ldk + std::max(i, j)]; };

  std::vector<std::pair<int64_t, int64_t>> close;
  std::vector<double> dist(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) {
      dist[i * n + j] = sqdist_from_gram(k(i, i), k(j, j), k(i, j));
      if (needs_direct(k(i, i), k(j, j), dist[i * n + j])) close.emplace_back(i, j);
    }
  const std::vector<double> direct = direct_sqdist(G, d, close);
  std::vector<char> equal(n * n, 0);
  for (size_t p = 0; p < close.size(); ++p) {
    const auto [i, j] = close[p];
    dist[i * n + j] = direct[p];
    equal[i * n + j] = direct[p] == 0.0;
  }
  for (int64_t i = 0; i < n; ++i) {
    out[i * n + i] = cosine ? static_cast<A>(cosine_from_gram(k(i, i), k(i, i), k(i, i), true)) : A(0);
    for (int64_t j = i + 1; j < n; ++j) {
      const double v = cosine ? cosine_from_gram(k(i, i), k(j, j), k(i, j), equal[i * n + j] != 0) : dist[i * n + j];
      out[i * n + j] = out[j * n + i] = static_cast<A>(v);
    }
  }
}

#define RA_INSTANTIATE(T) template void pairwise<T>(const T*, int64_t, int64_t, bool, acc_t<T>*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
