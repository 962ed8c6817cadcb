// CPU kernels of pairwise_sqdist and pairwise_cosine (docs/ops.md).
//
// The Gram matrix K = G G^T is accumulated in float64 over column tiles: the tile of all rows is
// converted to float64 once (a float32 product is then exact), and register blocks of rows
// multiply it with 8-lane accumulators. Every entry K_ij goes through the same operations in the
// same order, wherever it sits in a block, and tiles are added in column order, so the result is
// deterministic, symmetric, and K_ii == K_jj == K_ij for equal rows. Pairs whose Gram distance
// cancels (csrc/core/pairwise.h) are recomputed from direct differences in one batched pass: that
// keeps full precision for close rows and gives exactly 0 / 1 only for equal rows. The same pass
// gives every pair with a float64 row that the Gram matrix cannot hold (core's unsafe rows).
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/pairwise.h"
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

// Rows per register block: 4x4 blocks fill 16 of the 32 AVX-512 registers; AVX2 and SSE2 have 16
// and take 2x2.
constexpr int gram_block_rows(Isa isa) { return isa == Isa::avx512 ? 4 : 2; }

// K[i0.., j0..] += the products of rows i0..i0+B and j0..j0+B of the tile X (float64 for every
// input; len is a multiple of 8, ld the row stride), B = gram_block_rows(isa).
template <Isa isa, typename Tile>
RA_ALWAYS_INLINE void gram_block_body(const Tile* X, int64_t ld, int64_t i0, int64_t j0, int64_t len, double* K,
                                      int64_t ldk) {
  constexpr int BI = gram_block_rows(isa), BJ = BI;
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

RA_CPU_KERNEL(gram_block, (typename Tile), (Tile),
              (const Tile* X, int64_t ld, int64_t i0, int64_t j0, int64_t len, double* K, int64_t ldk),
              (X, ld, i0, j0, len, K, ldk))

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
  const Isa isa = best_isa();
  const int block = gram_block_rows(isa);
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
          gram_block<double>(isa, X.data(), kTile, i0, j0, padded, K, ldk);
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

// What the direct pass adds up for one pair of rows a, b (scaled by pa, pb for the products).
struct DirectSums {
  double sqdist;   // sum_c (a_c - b_c)^2
  double dot;      // sum_c (a_c pa)(b_c pb)
  int64_t differ;  // entries with a_c != b_c
};

template <Isa, typename T>
RA_ALWAYS_INLINE DirectSums direct_body(const T* a, const T* b, int64_t len, double pa, double pb) {
  f64x8 s = {}, t = {};
  i64x8 ne = {};
  int64_t c = 0;
  for (; c + 8 <= len; c += 8) {
    const f64x8 x = load_f64x8(a + c), y = load_f64x8(b + c);
    const f64x8 diff = x - y;
    s += diff * diff;
    t += (x * pa) * (y * pb);
    ne -= x != y;  // a true comparison is -1
  }
  for (int l = 0; c < len; ++c, ++l) {
    const double x = static_cast<double>(static_cast<acc_t<T>>(a[c]));
    const double y = static_cast<double>(static_cast<acc_t<T>>(b[c]));
    s[l] += sqdiff(x, y);
    t[l] += (x * pa) * (y * pb);
    ne[l] += x != y;
  }
  int64_t differ = 0;
  for (int l = 0; l < 8; ++l) differ += ne[l];
  return DirectSums{fold_f64x8(s), fold_f64x8(t), differ};
}
RA_CPU_KERNEL(direct, (typename T), (T), (const T* a, const T* b, int64_t len, double pa, double pb),
              (a, b, len, pa, pb))

// The direct sums of the listed pairs, rows scaled by `scale` for the products, in one pass over
// the columns: fixed column chunks in parallel, each walked in blocks small enough for the rows
// to stay cached, partial sums added in chunk order.
template <typename T>
std::vector<DirectSums> direct_pass(const T* G, int64_t d, const std::vector<std::pair<int64_t, int64_t>>& pairs,
                                    const std::vector<double>& scale) {
  const int64_t P = pairs.size();
  std::vector<DirectSums> out(P, DirectSums{0.0, 0.0, 0});
  if (P == 0) return out;
  const int64_t chunks = std::max<int64_t>(1, std::min({kDirectChunks, (d + kDirectBlock - 1) / kDirectBlock,
                                                        kDirectBudget / P}));
  std::vector<DirectSums> part(chunks * P, DirectSums{0.0, 0.0, 0});
  const Isa isa = best_isa();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c1 = d * (ch + 1) / chunks;
    for (int64_t b0 = d * ch / chunks; b0 < c1; b0 += kDirectBlock) {
      const int64_t len = std::min(kDirectBlock, c1 - b0);
      for (int64_t p = 0; p < P; ++p) {
        const auto [i, j] = pairs[p];
        const T* a = G + i * d + b0;
        const T* b = G + j * d + b0;
        const DirectSums s = direct<T>(isa, a, b, len, scale[i], scale[j]);
        DirectSums& acc = part[ch * P + p];
        acc.sqdist += s.sqdist;
        acc.dot += s.dot;
        acc.differ += s.differ;
      }
    }
  }
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t p = 0; p < P; ++p) {
      out[p].sqdist += part[ch * P + p].sqdist;
      out[p].dot += part[ch * P + p].dot;
      out[p].differ += part[ch * P + p].differ;
    }
  return out;
}

}  // namespace

template <typename T> void pairwise(const T* G, int64_t n, int64_t d, bool cosine, double* out, bool* nonfinite) {
  int64_t ldk = 0;
  const std::vector<double> K = gram(G, n, d, nonfinite, ldk);
  auto k = [&](int64_t i, int64_t j) { return K[std::min(i, j) * ldk + std::max(i, j)]; };

  // Unsafe rows (core/pairwise.h) occur for float64 input only: 16/32-bit squares cannot leave
  // the float64 range.
  std::vector<char> unsafe(n, 0);
  std::vector<double> scale(n, 1.0);
  if constexpr (std::is_same<T, double>::value) {
    for (int64_t i = 0; i < n; ++i) {
      unsafe[i] = gram_row_unsafe(k(i, i));
      scale[i] = row_scale(k(i, i));
    }
  }
  // Pairs the Gram matrix cannot give: close rows, and every pair with an unsafe row (itself
  // included, for its scaled self product).
  std::vector<std::pair<int64_t, int64_t>> listed;
  std::vector<int64_t> slot(n * n, -1);
  auto list = [&](int64_t i, int64_t j) {
    slot[i * n + j] = listed.size();
    listed.emplace_back(i, j);
  };
  for (int64_t i = 0; i < n; ++i) {
    if (unsafe[i]) list(i, i);
    for (int64_t j = i + 1; j < n; ++j)
      if (unsafe[i] || unsafe[j] || needs_direct(k(i, i), k(j, j), sqdist_from_gram(k(i, i), k(j, j), k(i, j))))
        list(i, j);
  }
  const std::vector<DirectSums> direct = direct_pass(G, d, listed, scale);
  auto self = [&](int64_t i) { return unsafe[i] ? direct[slot[i * n + i]].dot : k(i, i); };
  for (int64_t i = 0; i < n; ++i) {
    out[i * n + i] = cosine ? cosine_from_gram(self(i), self(i), self(i), true) : 0.0;
    for (int64_t j = i + 1; j < n; ++j) {
      double v;
      const int64_t p = slot[i * n + j];
      if (p < 0) {
        v = cosine ? cosine_from_gram(k(i, i), k(j, j), k(i, j), false) : sqdist_from_gram(k(i, i), k(j, j), k(i, j));
      } else {
        const DirectSums& s = direct[p];
        const bool scaled = unsafe[i] || unsafe[j];
        v = cosine ? cosine_from_gram(self(i), self(j), scaled ? s.dot : k(i, j), s.differ == 0) : s.sqdist;
      }
      out[i * n + j] = out[j * n + i] = v;
    }
  }
}

#define RA_INSTANTIATE(T) template void pairwise<T>(const T*, int64_t, int64_t, bool, double*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
