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
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// The magnitude key of +Inf: the keys at or above it are exactly those of Inf and NaN. Its bits
// below the exponent are zero, so every histogram bucket at or above key_bucket(inf) holds only
// non-finite keys.
template <typename A> constexpr key_t<A> nonfinite_key() {
  return std::is_same<A, double>::value ? key_t<A>(0x7ff0000000000000ull) : key_t<A>(0x7f800000u);
}

// The largest key is at or above nonfinite_key() exactly when x holds NaN/Inf: a max reduction
// that vectorizes, where a short-circuit test would not.
template <typename T> bool all_finite(const T* x, int64_t d) {
  using A = acc_t<T>;
  key_t<A> top = 0;
#pragma omp parallel for reduction(max : top) schedule(static)
  for (int64_t j = 0; j < d; ++j) top = std::max(top, abs_key(static_cast<A>(x[j])));
  return top < nonfinite_key<A>();
}

// Keys whose bucket is computed per block before any count is added, so that the key arithmetic
// vectorizes apart from the increments.
constexpr int64_t kHistogramBlock = 2048;

// One thread's histogram, in kBanks interleaved copies where they fit in L2 (12 bits or fewer):
// with one copy, a run of keys in one bucket (ties) would chain every increment on the previous
// one's store. Each copy has one spare bucket past the last, for keys outside the counted prefix.
class LocalHistogram {
 public:
  explicit LocalHistogram(int bits)
      : buckets_(size_t(1) << bits), banks_(bits <= 12 ? 4 : 1), counts_(banks_ * (buckets_ + 1), 0) {}

  // The spare bucket, for keys that must not be counted.
  uint32_t outside() const { return static_cast<uint32_t>(buckets_); }

  void add_block(const uint32_t* bucket, int64_t len) {
    const size_t stride = buckets_ + 1;
    int64_t i = 0;
    if (banks_ == 4) {
      for (; i + 4 <= len; i += 4) {
        counts_[bucket[i]] += 1;
        counts_[stride + bucket[i + 1]] += 1;
        counts_[2 * stride + bucket[i + 2]] += 1;
        counts_[3 * stride + bucket[i + 3]] += 1;
      }
    }
    for (; i < len; ++i) counts_[bucket[i]] += 1;
  }

  void merge_into(std::vector<int64_t>& hist) const {
    for (size_t bank = 0; bank < banks_; ++bank)
      for (size_t b = 0; b < buckets_; ++b) hist[b] += counts_[bank * (buckets_ + 1) + b];
  }

 private:
  size_t buckets_, banks_;
  std::vector<int64_t> counts_;
};

// Histogram of (key >> shift) & (2^bits - 1) over the keys whose bits above `shift + bits` equal
// `prefix` (all keys for the first level); `key(j)` gives coordinate j's magnitude key. Integer
// counts, so merging the per-thread histograms is exact in any order.
template <typename A, typename Key>
std::vector<int64_t> histogram(int64_t d, Key key, int bits, int shift, key_t<A> prefix) {
  std::vector<int64_t> hist(size_t(1) << bits, 0);
  const key_t<A> mask = (key_t<A>(1) << bits) - 1;
  const int above = shift + bits;   // at the first level no key bits lie above
  const int64_t blocks = (d + kHistogramBlock - 1) / kHistogramBlock;
#pragma omp parallel
  {
    LocalHistogram local(bits);
    std::vector<uint32_t> bucket(kHistogramBlock);
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j0 = b * kHistogramBlock, len = std::min(kHistogramBlock, d - j0);
      for (int64_t i = 0; i < len; ++i) {
        const key_t<A> x = key(j0 + i);
        const bool in_prefix = above >= key_bits<A>::value || (x >> above) == prefix;
        bucket[i] = in_prefix ? static_cast<uint32_t>((x >> shift) & mask) : local.outside();
      }
      local.add_block(bucket.data(), len);
    }
#pragma omp critical
    local.merge_into(hist);
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

// One chunk's positions into the scratch lists, scalar: every position is written to both lists
// and kept by advancing the count, without a branch on data that a predictor cannot guess.
template <typename A, typename Key>
void classify_chunk(Key key, int64_t begin, int64_t len, const Threshold<A>& th, uint16_t* selected,
                    int64_t& above, uint16_t* candidates, int64_t& sharing) {
  for (int64_t i = 0; i < len; ++i) {
    const key_t<A> p = key(begin + i) >> th.shift;
    selected[above] = static_cast<uint16_t>(i);
    candidates[sharing] = static_cast<uint16_t>(i);
    above += p > th.prefix;
    sharing += p == th.prefix;
  }
}

#if defined(__x86_64__)
// The same for float values on AVX-512: 16 keys per step, their positions compressed into the
// lists (vpcompressd, then narrowed to 16 bits and stored 16 at a time, so the scratch lists
// hold 16 spare entries). The lists come out identical to the scalar ones. (GCC 12's
// _mm512_maskz_compress_epi32 and _mm512_cvtepi32_epi16 start from an undefined vector they fully
// overwrite: a false warning.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline void classify_chunk_avx512(
    const float* v, int64_t len, int shift, uint32_t prefix, uint16_t* selected, int64_t& above,
    uint16_t* candidates, int64_t& sharing) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), top = _mm512_set1_epi32(static_cast<int>(prefix));
  const __m128i count = _mm_cvtsi32_si128(shift);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16, at = _mm512_add_epi32(at, step)) {
    const __m512i p = _mm512_srl_epi32(_mm512_and_si512(_mm512_loadu_si512(v + i), magnitude), count);
    const __mmask16 gt = _mm512_cmpgt_epu32_mask(p, top), eq = _mm512_cmpeq_epu32_mask(p, top);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(selected + above),
                        _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(gt, at)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(candidates + sharing),
                        _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(eq, at)));
    above += __builtin_popcount(gt);
    sharing += __builtin_popcount(eq);
  }
  for (; i < len; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof(bits));
    const uint32_t p = (bits & 0x7fffffffu) >> shift;
    selected[above] = static_cast<uint16_t>(i);
    candidates[sharing] = static_cast<uint16_t>(i);
    above += p > prefix;
    sharing += p == prefix;
  }
}
#pragma GCC diagnostic pop
#endif

// `values`: the A values whose magnitudes `key` gives, where they lie in one array (else null).
template <typename A, typename Key>
ChunkLists classify(const Chunks& chunks, const Threshold<A>& th, Key key, const A* values) {
  ChunkLists lists;
  lists.selected.assign(chunks.count, {});
  lists.candidates.assign(chunks.count, {});
#if defined(__x86_64__)
  const bool vectorized = std::is_same<A, float>::value && values != nullptr && best_isa() == Isa::avx512;
#else
  const bool vectorized = false;
#endif
#pragma omp parallel
  {
    std::vector<uint16_t> selected(kChunkSize + 16), candidates(kChunkSize + 16);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks.count; ++c) {
      const int64_t begin = chunks.begin(c), len = chunks.end(c) - begin;
      int64_t above = 0, sharing = 0;
#if defined(__x86_64__)
      if constexpr (std::is_same<A, float>::value) {
        if (vectorized)
          classify_chunk_avx512(values + begin, len, th.shift, th.prefix, selected.data(), above, candidates.data(),
                                sharing);
      }
#endif
      if (!vectorized) classify_chunk<A>(key, begin, len, th, selected.data(), above, candidates.data(), sharing);
      lists.selected[c].assign(selected.begin(), selected.begin() + above);
      lists.candidates[c].assign(candidates.begin(), candidates.begin() + sharing);
    }
  }
  return lists;
}

// Selects exactly k coordinates (1 <= k <= d) and writes their indices ascending. `first` is the
// histogram of the top first_bits<A>() key bits; `values` the A values behind the keys where they
// lie in one array (null otherwise), for the vectorized classify.
//
// Extra memory is at most 4 bytes per coordinate for every input (ties included): the lists
// hold 2-byte positions, and the k-th key is found among the candidates' keys only once they are
// at most d / 8; until then every further histogram pass narrows the prefix by kRefineBits bits,
// and once all bits are resolved the candidates are all equal to the k-th key.
template <typename A, typename Key>
void select_topk(int64_t d, int64_t k, Key key, const A* values, const std::vector<int64_t>& first,
                 int64_t* indices) {
  using K = key_t<A>;
  const Chunks chunks = make_chunks(d);
  Threshold<A> th{0, key_bits<A>::value, 0, 0};
  narrow(th, first, first_bits<A>(), k);
  while (th.shift > 0 && th.in_prefix > d / 8) {
    const int bits = std::min(kRefineBits, th.shift);
    narrow(th, histogram<A>(d, key, bits, th.shift - bits, th.prefix), bits, k);
  }
  const ChunkLists lists = classify(chunks, th, key, values);

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
  const int bits = first_bits<A>();
  const Chunks chunks = make_chunks(d);
  const Isa isa = best_isa();
  std::vector<int64_t> hist(size_t(1) << bits, 0);
#pragma omp parallel
  {
    LocalHistogram local(bits);
    std::vector<uint32_t> bucket(kHistogramBlock);
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks.count; ++c) {
      for (int64_t j = chunks.begin(c); j < chunks.end(c); j += kHistogramBlock) {
        const int64_t len = std::min(kHistogramBlock, chunks.end(c) - j);
        A* ea = error_acc ? error_acc + j : nullptr;
        ef_update_block<T>(isa, u + j, error + j, momentum + j, ea, len, rho, use_momentum);
        const A* e = ea ? ea : reinterpret_cast<const A*>(error + j);
        for (int64_t i = 0; i < len; ++i) bucket[i] = key_bucket<A>(abs_key(e[i]), bits);
        local.add_block(bucket.data(), len);
      }
    }
#pragma omp critical
    local.merge_into(hist);
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
  select_topk<A>(d, k, [keys](int64_t j) { return abs_key(keys[j]); }, keys, hist, indices);
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
  auto key = [x](int64_t j) { return abs_key(static_cast<A>(x[j])); };
  constexpr int bits = first_bits<A>();
  const std::vector<int64_t> first = histogram<A>(d, key, bits, key_bits<A>::value - bits, 0);
  // NaN and Inf keys fill exactly the buckets from Inf's up: the histogram pass is the finite check
  const auto from = first.begin() + key_bucket<A>(nonfinite_key<A>(), bits);
  const bool finite = std::accumulate(from, first.end(), int64_t(0)) == 0;
  k = std::min(k, d);
  if (k == 0) return finite;
  const A* stored = std::is_same<T, A>::value ? reinterpret_cast<const A*>(x) : nullptr;
  select_topk<A>(d, k, key, stored, first, indices);
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
