// CPU kernels of topk_ef_step and topk_abs (SPEC §4.6): exact, deterministic global top-k by a
// radix select over the magnitude keys of csrc/core/topk.h, without sorting.
//
// Pass 1 (topk_ef_step only) applies the error-feedback update and builds a histogram of the top
// key bits in the same sweep. Pass 2 reads the keys once more and sorts every coordinate into
// "above the threshold bucket" (selected) or "in it" (candidate), per fixed column chunk so the
// lists come out in index order. The k-th key is then found among the candidates alone, ties at
// it go to the lowest indices, and the outputs are written chunk by chunk, already ascending.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "core/topk.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace robustagg {
namespace cpu {
namespace {

constexpr int64_t kChunkSize = 1 << 16;
constexpr int64_t kMaxChunks = 1024;

// First-level histogram: 12 key bits for float (exponent + 3 mantissa bits), 16 for double.
template <typename A> constexpr int first_bits() { return std::is_same<A, double>::value ? 16 : 12; }

struct Chunks {
  int64_t count, d;
  int64_t begin(int64_t c) const { return d * c / count; }
  int64_t end(int64_t c) const { return d * (c + 1) / count; }
};

Chunks make_chunks(int64_t d) {
  return Chunks{std::min(kMaxChunks, std::max<int64_t>(1, (d + kChunkSize - 1) / kChunkSize)), d};
}

template <typename T> bool all_finite(const T* x, int64_t d) {
  using A = acc_t<T>;
  bool bad = false;
#pragma omp parallel for reduction(|| : bad) schedule(static)
  for (int64_t j = 0; j < d; ++j) bad = bad || is_nonfinite(static_cast<A>(x[j]));
  return !bad;
}

// Histogram of key_bucket over all coordinates; `key(j)` gives coordinate j's magnitude key.
// Integer counts, so merging the per-thread histograms is exact in any order.
template <typename A, typename Key> std::vector<int64_t> histogram(int64_t d, Key key) {
  const int bits = first_bits<A>();
  std::vector<int64_t> hist(size_t(1) << bits, 0);
#pragma omp parallel
  {
    std::vector<int64_t> local(hist.size(), 0);
#pragma omp for schedule(static) nowait
    for (int64_t j = 0; j < d; ++j) local[key_bucket<A>(key(j), bits)] += 1;
#pragma omp critical
    for (size_t b = 0; b < hist.size(); ++b) hist[b] += local[b];
  }
  return hist;
}

// The bucket holding the k-th largest key (k >= 1), and how many keys lie in higher buckets.
struct Threshold {
  uint32_t bucket;
  int64_t above;
};

Threshold threshold_bucket(const std::vector<int64_t>& hist, int64_t k) {
  int64_t above = 0;
  for (size_t b = hist.size(); b-- > 0;) {
    if (above + hist[b] >= k) return Threshold{static_cast<uint32_t>(b), above};
    above += hist[b];
  }
  return Threshold{0, above};
}

// Pass 2: the indices above the threshold bucket and those in it, per chunk, ascending.
template <typename A, typename Key>
void classify(const Chunks& chunks, Threshold th, Key key, std::vector<std::vector<int64_t>>& selected,
              std::vector<std::vector<int64_t>>& candidates) {
  const int bits = first_bits<A>();
  selected.assign(chunks.count, {});
  candidates.assign(chunks.count, {});
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks.count; ++c) {
    for (int64_t j = chunks.begin(c); j < chunks.end(c); ++j) {
      const uint32_t b = key_bucket<A>(key(j), bits);
      if (b > th.bucket)
        selected[c].push_back(j);
      else if (b == th.bucket)
        candidates[c].push_back(j);
    }
  }
}

// Selects exactly k coordinates (1 <= k <= d) and writes their indices ascending.
template <typename A, typename Key>
void select_topk(int64_t d, int64_t k, Key key, const std::vector<int64_t>& hist, int64_t* indices) {
  using K = key_t<A>;
  const Chunks chunks = make_chunks(d);
  const Threshold th = threshold_bucket(hist, k);
  std::vector<std::vector<int64_t>> selected, candidates;
  classify<A>(chunks, th, key, selected, candidates);

  // The need-th largest key among the candidates is the exact k-th key overall.
  const int64_t need = k - th.above;
  std::vector<K> keys;
  for (const auto& list : candidates)
    for (int64_t j : list) keys.push_back(key(j));
  std::nth_element(keys.begin(), keys.begin() + (need - 1), keys.end(), std::greater<K>());
  const K kth = keys[need - 1];
  int64_t ties = need - std::count_if(keys.begin(), keys.end(), [&](K x) { return x > kth; });

  // Ties at the k-th key go to the lowest indices: hand them out in chunk (= index) order.
  std::vector<int64_t> ties_in(chunks.count), offset(chunks.count + 1, 0);
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t equal = 0, greater = 0;
    for (int64_t j : candidates[c]) {
      const K x = key(j);
      greater += x > kth;
      equal += x == kth;
    }
    ties_in[c] = std::min(equal, ties);
    ties -= ties_in[c];
    offset[c + 1] = offset[c] + int64_t(selected[c].size()) + greater + ties_in[c];
  }

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t* out = indices + offset[c];
    int64_t ties_left = ties_in[c];
    auto s = selected[c].begin();
    for (int64_t j : candidates[c]) {
      const K x = key(j);
      const bool take = x > kth || (x == kth && ties_left > 0);
      if (!take) continue;
      ties_left -= x == kth;
      while (s != selected[c].end() && *s < j) *out++ = *s++;
      *out++ = j;
    }
    while (s != selected[c].end()) *out++ = *s++;
  }
}

// Pass 1 of topk_ef_step: the error-feedback update, in place, in the arithmetic type.
template <typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE void ef_update_body(const T* u, T* error, T* momentum, A* error_acc, int64_t len, A rho,
                                     bool use_momentum) {
  for (int64_t j = 0; j < len; ++j) {
    A e = static_cast<A>(error[j]), m = static_cast<A>(momentum[j]);
    ef_update<A>(static_cast<A>(u[j]), rho, use_momentum, e, m);
    error[j] = static_cast<T>(e);
    momentum[j] = static_cast<T>(m);
    if (error_acc) error_acc[j] = e;
  }
}
template <typename T, typename A = acc_t<T>>
RA_TARGET_AVX512 void ef_update_avx512(const T* u, T* e, T* m, A* ea, int64_t len, A rho, bool mom) {
  ef_update_body<T>(u, e, m, ea, len, rho, mom);
}
template <typename T, typename A = acc_t<T>>
RA_TARGET_AVX2 void ef_update_avx2(const T* u, T* e, T* m, A* ea, int64_t len, A rho, bool mom) {
  ef_update_body<T>(u, e, m, ea, len, rho, mom);
}
template <typename T, typename A = acc_t<T>>
void ef_update_base(const T* u, T* e, T* m, A* ea, int64_t len, A rho, bool mom) {
  ef_update_body<T>(u, e, m, ea, len, rho, mom);
}

// Pass 1 of topk_ef_step: the update, block by block, with the histogram of the new error's keys
// taken while the block is still in L1.
template <typename T, typename A = acc_t<T>>
std::vector<int64_t> ef_update_all(const T* u, T* error, T* momentum, A* error_acc, int64_t d, A rho,
                                   bool use_momentum) {
  constexpr int64_t kBlock = 2048;
  const int bits = first_bits<A>();
  const Chunks chunks = make_chunks(d);
  const Isa isa = cpu_isa();
  std::vector<int64_t> hist(size_t(1) << bits, 0);
#pragma omp parallel
  {
    std::vector<int64_t> local(hist.size(), 0);
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks.count; ++c) {
      for (int64_t j = chunks.begin(c); j < chunks.end(c); j += kBlock) {
        const int64_t len = std::min(kBlock, chunks.end(c) - j);
        A* ea = error_acc ? error_acc + j : nullptr;
        if (isa == Isa::kAvx512)
          ef_update_avx512<T>(u + j, error + j, momentum + j, ea, len, rho, use_momentum);
        else if (isa == Isa::kAvx2)
          ef_update_avx2<T>(u + j, error + j, momentum + j, ea, len, rho, use_momentum);
        else
          ef_update_base<T>(u + j, error + j, momentum + j, ea, len, rho, use_momentum);
        const A* e = ea ? ea : reinterpret_cast<const A*>(error + j);
        for (int64_t i = 0; i < len; ++i) local[key_bucket<A>(abs_key(e[i]), bits)] += 1;
      }
    }
#pragma omp critical
    for (size_t b = 0; b < hist.size(); ++b) hist[b] += local[b];
  }
  return hist;
}

}  // namespace

template <typename T>
bool topk_ef_step(const T* u, T* error, T* momentum, int64_t d, int64_t k, double rho, int64_t* indices,
                  T* values) {
  using A = acc_t<T>;
  if (!all_finite(u, d)) return false;
  // 16-bit state is stored rounded, but SPEC selects on the error before rounding: keep it in A.
  constexpr bool kScratch = !std::is_same<T, A>::value;
  std::vector<A> scratch(kScratch ? d : 0);
  A* error_acc = kScratch ? scratch.data() : nullptr;
  const std::vector<int64_t> hist =
      ef_update_all<T>(u, error, momentum, error_acc, d, static_cast<A>(rho), rho != 0.0);
  k = std::min(k, d);
  if (k == 0) return true;
  const A* keys = kScratch ? error_acc : reinterpret_cast<const A*>(error);
  select_topk<A>(d, k, [keys](int64_t j) { return abs_key(keys[j]); }, hist, indices);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = indices[i];
    values[i] = error[j];
    error[j] = T(0);
    momentum[j] = T(0);  // momentum factor masking (SparseFed, Rothchild et al. 2020, Alg. 1)
  }
  return true;
}

template <typename T> bool topk_abs(const T* x, int64_t d, int64_t k, int64_t* indices, T* values) {
  using A = acc_t<T>;
  const bool finite = all_finite(x, d);
  k = std::min(k, d);
  if (k == 0) return finite;
  auto key = [x](int64_t j) { return abs_key(static_cast<A>(x[j])); };
  select_topk<A>(d, k, key, histogram<A>(d, key), indices);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < k; ++i) values[i] = x[indices[i]];
  return finite;
}

#define RA_INSTANTIATE(T)                                                                                    \
  template bool topk_ef_step<T>(const T*, T*, T*, int64_t, int64_t, double, int64_t*, T*);                  \
  template bool topk_abs<T>(const T*, int64_t, int64_t, int64_t*, T*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace cpu
}  // namespace robustagg
