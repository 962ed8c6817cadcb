// CPU kernels of topk_ef_step and topk_abs (docs/ops.md): exact, deterministic global top-k by a
// radix select over the magnitude keys of csrc/core/topk.h, without sorting.
//
// Pass 1 (topk_ef_step only) applies the error-feedback update and builds a histogram of the top
// key bits in the same sweep. Where ties or a narrow range leave too many keys in the threshold
// bucket, further histogram passes narrow it (select_topk). Pass 2 reads the keys once more and
// sorts every coordinate into "above the threshold prefix" (selected) or "sharing it"
// (candidate), per fixed column chunk so the lists come out in index order. The k-th key is then
// found among the candidates alone, ties at it go to the lowest indices, and the outputs are
// written chunk by chunk, already ascending.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/topk.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace robustagg {
namespace cpu {
namespace {

// Chunks of at most 2^16 coordinates, so that a position inside a chunk fits a uint16_t.
constexpr int64_t kChunkSize = 1 << 16;
// Key bits resolved by each histogram pass after the first.
constexpr int kRefineBits = 11;

// First-level histogram: 12 key bits for float (exponent + 3 mantissa bits), 16 for double.
template <typename A> constexpr int first_bits() { return std::is_same<A, double>::value ? 16 : 12; }

struct Chunks {
  int64_t count, d;
  int64_t begin(int64_t c) const { return c * kChunkSize; }
  int64_t end(int64_t c) const { return std::min(d, (c + 1) * kChunkSize); }
};

Chunks make_chunks(int64_t d) { return Chunks{std::max<int64_t>(1, (d + kChunkSize - 1) / kChunkSize), d}; }

template <typename T> bool all_finite(const T* x, int64_t d) {
  using A = acc_t<T>;
  bool bad = false;
#pragma omp parallel for reduction(|| : bad) schedule(static)
  for (int64_t j = 0; j < d; ++j) bad = bad || is_nonfinite(static_cast<A>(x[j]));
  return !bad;
}

// Histogram of (key >> shift) & (2^bits - 1) over the keys whose bits above `shift + bits` equal
// `prefix` (all keys for the first level); `key(j)` gives coordinate j's magnitude key. Integer
// counts, so merging the per-thread histograms is exact in any order.
template <typename A, typename Key>
std::vector<int64_t> histogram(int64_t d, Key key, int bits, int shift, key_t<A> prefix) {
  std::vector<int64_t> hist(size_t(1) << bits, 0);
  const key_t<A> mask = (key_t<A>(1) << bits) - 1;
#pragma omp parallel
  {
    std::vector<int64_t> local(hist.size(), 0);
#pragma omp for schedule(static) nowait
    for (int64_t j = 0; j < d; ++j) {
      const key_t<A> x = key(j);
      if ((x >> (shift + bits)) == prefix) local[(x >> shift) & mask] += 1;
    }
#pragma omp critical
    for (size_t b = 0; b < hist.size(); ++b) hist[b] += local[b];
  }
  return hist;
}

// The key prefix (the key's bits from `shift` up) shared by the k-th largest key, how many keys
// lie above it (above < k) and how many share it (in_prefix >= k - above).
template <typename A> struct Threshold {
  key_t<A> prefix;
  int shift;
  int64_t above, in_prefix;
};

// Narrows `th` by the next `bits` bits, given their histogram among the keys with th's prefix.
template <typename A> void narrow(Threshold<A>& th, const std::vector<int64_t>& hist, int bits, int64_t k) {
  for (size_t b = hist.size(); b-- > 0;) {
    if (th.above + hist[b] >= k || b == 0) {
      th.prefix = (th.prefix << bits) | static_cast<key_t<A>>(b);
      th.shift -= bits;
      th.in_prefix = hist[b];
      return;
    }
    th.above += hist[b];
  }
}

// Pass 2: per chunk, the positions (inside the chunk, ascending) of the keys above the threshold
// prefix and of those sharing it.
struct ChunkLists {
  std::vector<std::vector<uint16_t>> selected, candidates;
};

template <typename A, typename Key>
ChunkLists classify(const Chunks& chunks, const Threshold<A>& th, Key key) {
  ChunkLists lists;
  lists.selected.assign(chunks.count, {});
  lists.candidates.assign(chunks.count, {});
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks.count; ++c) {
    for (int64_t j = chunks.begin(c); j < chunks.end(c); ++j) {
      const key_t<A> p = key(j) >> th.shift;
      const auto at = static_cast<uint16_t>(j - chunks.begin(c));
      if (p > th.prefix)
        lists.selected[c].push_back(at);
      else if (p == th.prefix)
        lists.candidates[c].push_back(at);
    }
    // growth leaves up to twice the capacity needed; give it back while the chunk is small
    lists.selected[c].shrink_to_fit();
    lists.candidates[c].shrink_to_fit();
  }
  return lists;
}

// Selects exactly k coordinates (1 <= k <= d) and writes their indices ascending. `first` is the
// histogram of the top first_bits<A>() key bits.
//
// Extra memory is at most 4 bytes per coordinate for every input (ties included): the lists
// hold 2-byte positions, and the k-th key is found among the candidates' keys only once they are
// at most d / 8; until then every further histogram pass narrows the prefix by kRefineBits bits,
// and once all bits are resolved the candidates are all equal to the k-th key.
template <typename A, typename Key>
void select_topk(int64_t d, int64_t k, Key key, const std::vector<int64_t>& first, int64_t* indices) {
  using K = key_t<A>;
  const Chunks chunks = make_chunks(d);
  Threshold<A> th{0, key_bits<A>::value, 0, 0};
  narrow(th, first, first_bits<A>(), k);
  while (th.shift > 0 && th.in_prefix > d / 8) {
    const int bits = std::min(kRefineBits, th.shift);
    narrow(th, histogram<A>(d, key, bits, th.shift - bits, th.prefix), bits, k);
  }
  const ChunkLists lists = classify(chunks, th, key);

  // The need-th largest key among the candidates is the exact k-th key overall.
  const int64_t need = k - th.above;
  K kth = th.prefix;  // all bits resolved: every candidate is the k-th key
  if (th.shift > 0) {
    std::vector<K> keys;
    keys.reserve(th.in_prefix);
    for (int64_t c = 0; c < chunks.count; ++c)
      for (uint16_t at : lists.candidates[c]) keys.push_back(key(chunks.begin(c) + at));
    std::nth_element(keys.begin(), keys.begin() + (need - 1), keys.end(), std::greater<K>());
    kth = keys[need - 1];
  }

  // Ties at the k-th key go to the lowest indices: hand them out in chunk (= index) order.
  std::vector<int64_t> greater_in(chunks.count), equal_in(chunks.count);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t equal = 0, greater = 0;
    for (uint16_t at : lists.candidates[c]) {
      const K x = key(chunks.begin(c) + at);
      greater += x > kth;
      equal += x == kth;
    }
    greater_in[c] = greater;
    equal_in[c] = equal;
  }
  int64_t ties = need - std::accumulate(greater_in.begin(), greater_in.end(), int64_t(0));
  std::vector<int64_t> ties_in(chunks.count), offset(chunks.count + 1, 0);
  for (int64_t c = 0; c < chunks.count; ++c) {
    ties_in[c] = std::min(equal_in[c], ties);
    ties -= ties_in[c];
    offset[c + 1] = offset[c] + int64_t(lists.selected[c].size()) + greater_in[c] + ties_in[c];
  }

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks.count; ++c) {
    const int64_t base = chunks.begin(c);
    int64_t* out = indices + offset[c];
    int64_t ties_left = ties_in[c];
    auto s = lists.selected[c].begin();
    for (uint16_t at : lists.candidates[c]) {
      const K x = key(base + at);
      const bool take = x > kth || (x == kth && ties_left > 0);
      if (!take) continue;
      ties_left -= x == kth;
      while (s != lists.selected[c].end() && *s < at) *out++ = base + *s++;
      *out++ = base + at;
    }
    while (s != lists.selected[c].end()) *out++ = base + *s++;
  }
}

// Pass 1 of topk_ef_step: the error-feedback update, in place, in the arithmetic type.
template <Isa, typename T, typename A = acc_t<T>>
RA_ALWAYS_INLINE void ef_update_block_body(const T* u, T* error, T* momentum, A* error_acc, int64_t len, A rho,
                                     bool use_momentum) {
  const A limit = static_cast<A>(std::numeric_limits<T>::max());
  for (int64_t j = 0; j < len; ++j) {
    A e = static_cast<A>(error[j]), m = static_cast<A>(momentum[j]);
    ef_update<A>(static_cast<A>(u[j]), rho, use_momentum, limit, e, m);
    error[j] = static_cast<T>(e);
    momentum[j] = static_cast<T>(m);
    if (error_acc) error_acc[j] = e;
  }
}
RA_CPU_KERNEL(ef_update_block, (typename T), (T),
              (const T* u, T* e, T* m, acc_t<T>* ea, int64_t len, acc_t<T> rho, bool mom), (u, e, m, ea, len, rho, mom))

// Pass 1 of topk_ef_step: the update, block by block, with the histogram of the new error's keys
// taken while the block is still in L1.
template <typename T, typename A = acc_t<T>>
std::vector<int64_t> ef_update_all(const T* u, T* error, T* momentum, A* error_acc, int64_t d, A rho,
                                   bool use_momentum) {
  constexpr int64_t kBlock = 2048;
  const int bits = first_bits<A>();
  const Chunks chunks = make_chunks(d);
  const Isa isa = best_isa();
  std::vector<int64_t> hist(size_t(1) << bits, 0);
#pragma omp parallel
  {
    std::vector<int64_t> local(hist.size(), 0);
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks.count; ++c) {
      for (int64_t j = chunks.begin(c); j < chunks.end(c); j += kBlock) {
        const int64_t len = std::min(kBlock, chunks.end(c) - j);
        A* ea = error_acc ? error_acc + j : nullptr;
        ef_update_block<T>(isa, u + j, error + j, momentum + j, ea, len, rho, use_momentum);
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
  // 16-bit state is stored rounded, but the op selects on the error before rounding: keep it in A.
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
  select_topk<A>(d, k, key, histogram<A>(d, key, first_bits<A>(), key_bits<A>::value - first_bits<A>(), 0), indices);
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
