// CUDA kernels of topk_ef_step and topk_abs (docs/ops.md): a deterministic radix select over the
// magnitude keys of core/topk.h, in the spirit of AIR top-k (Zhang et al., SC'23), followed by an
// ordered compaction.
//
// Keys are |x| as unsigned integers (31 bits for float, 63 for double), taken 11 bits at a time
// from the top: 3 digits for 16/32-bit data, 6 for float64. Digit pass p histograms digit p of the
// keys that match the digits already chosen, per block in shared memory (integer atomics, so the
// counts do not depend on their order), and a one-block kernel picks the bucket holding the k-th
// largest key. After the last digit the k-th key T is exact and every block knows how many of its
// keys are > T and == T; a block scan turns those into output offsets and per-block tie quotas,
// and the compaction pass emits, in index order, every key > T and the first `quota` keys == T of
// each block: ties go to the lower index and indices come out ascending, on every run and GPU.
//
// Only the first two digit passes read the data. The second one also writes the keys still in the
// running (those matching the first digit) to a candidate buffer, each block into its own index
// range in index order; every later digit pass reads only that buffer and filters it in place. So
// every dtype reads the data three times (two digit passes and the compaction), float64's six
// digits included, and the buffer passes shrink with the candidates. Keys that leave the running
// above the chosen prefix are counted per block as they leave; with the last digit's per-block
// histogram that gives each block's keys > T.
//
// topk_ef_step never writes state before the selection is settled: each data pass recomputes the
// new error and momentum from (u, error, momentum) with core's ef_update (saturating at the largest
// finite value of the storage dtype, docs/nonfinite.md), and the compaction pass writes them back with zeros
// at the selected coordinates. The first pass also checks u for NaN/Inf; the launcher reads that
// flag back (one stream synchronization) and, when u is not finite, stops with the state untouched.
#include "core/topk.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace robustagg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int64_t kMaxBlocks = 1024;
constexpr int64_t kMinBlockElements = 16 * kThreads;
constexpr int kSelectThreads = 1024;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kBinsPerWarp = kBins / kSelectWarps;

// Where the element values come from.
enum class Source { kAbs, kErrorFeedback, kErrorFeedbackNoMomentum };

template <typename T>
struct Inputs {
  const T* x;         // topk_abs: x; topk_ef_step: u
  const T* error;     // topk_ef_step only
  const T* momentum;  // topk_ef_step with rho != 0 only
  acc_t<T> rho;
};

// The value whose magnitude is ranked at coordinate j, with the new momentum for error feedback.
template <Source kSource, typename T>
__device__ __forceinline__ acc_t<T> element(const Inputs<T>& in, int64_t j, acc_t<T>& momentum, bool& bad) {
  using A = acc_t<T>;
  const A x = load_acc(in.x + j);
  bad = is_nonfinite(x);
  if (kSource == Source::kAbs) return x;
  // error and momentum are rewritten in place by the compaction pass: plain loads, not __ldg.
  A error = to_acc(in.error[j]);
  momentum = kSource == Source::kErrorFeedback ? to_acc(in.momentum[j]) : A(0);
  ef_update(x, in.rho, kSource == Source::kErrorFeedback, storage_max<T>(), error, momentum);
  return error;
}

struct Digit {
  int shift;       // lowest key bit of this digit
  int width;       // bits in this digit
  int prev_shift;  // lowest key bit of the digits already chosen; -1 in the first pass
};

template <typename A>
Digit digit(int pass) {
  const int bits = key_bits<A>::value;
  const int top = bits - kDigitBits * pass;
  const int shift = top > kDigitBits ? top - kDigitBits : 0;
  return Digit{shift, top - shift, pass == 0 ? -1 : top};
}

template <typename A>
constexpr int digit_passes() {
  return (key_bits<A>::value + kDigitBits - 1) / kDigitBits;
}

// Selection state shared by the kernels of one call.
struct SelectState {
  unsigned long long prefix;     // the digits chosen so far (after the last pass: the k-th key T)
  unsigned long long remaining;  // keys still to take among those matching prefix
};

template <typename A>
struct Workspace {
  key_t<A>* keys;                 // [d] candidate keys: block b's at [begin_b, begin_b + kept[b])
  unsigned int* total;            // [passes][kBins] histogram of each digit over all blocks
  unsigned int* last_hist;        // [blocks][kBins] per-block histogram of the last digit
  unsigned long long* above;      // [blocks] keys that left the running above the chosen prefix
  unsigned long long* kept;       // [blocks] candidate keys of the block in `keys`
  unsigned long long* greater;    // [blocks] keys > T
  unsigned long long* equal;      // [blocks] keys == T
  unsigned long long* offset;     // [blocks] first output slot of the block
  unsigned long long* quota;      // [blocks] keys == T the block emits
  SelectState* state;
};

constexpr int kMaxPasses = (63 + kDigitBits - 1) / kDigitBits;
constexpr int kBlockCounters = 6;  // above, kept, greater, equal, offset, quota

int64_t block_count(int64_t d) {
  const int64_t blocks = ceil_div(d, kMinBlockElements);
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}
static_assert(kMaxBlocks <= kSelectThreads, "the offsets kernel scans one block entry per thread");

// The key buffer comes first and its size is rounded up to 8 bytes, so every part stays aligned.
size_t key_buffer_bytes(int64_t d, size_t key_size) { return static_cast<size_t>(ceil_div(d * key_size, 8)) * 8; }

template <typename A>
Workspace<A> carve(void* base, int64_t d, int64_t blocks) {
  unsigned char* p = static_cast<unsigned char*>(base);
  Workspace<A> w;
  w.keys = reinterpret_cast<key_t<A>*>(p);
  p += key_buffer_bytes(d, sizeof(key_t<A>));
  w.total = reinterpret_cast<unsigned int*>(p);
  p += kMaxPasses * kBins * sizeof(unsigned int);
  w.last_hist = reinterpret_cast<unsigned int*>(p);
  p += blocks * kBins * sizeof(unsigned int);
  w.above = reinterpret_cast<unsigned long long*>(p);
  w.kept = w.above + blocks;
  w.greater = w.kept + blocks;
  w.equal = w.greater + blocks;
  w.offset = w.equal + blocks;
  w.quota = w.offset + blocks;
  w.state = reinterpret_cast<SelectState*>(w.quota + blocks);
  return w;
}

size_t workspace_bytes(int64_t d, int64_t blocks, size_t key_size) {
  return key_buffer_bytes(d, key_size) + kMaxPasses * kBins * sizeof(unsigned int) +
         blocks * kBins * sizeof(unsigned int) + kBlockCounters * blocks * sizeof(unsigned long long) +
         sizeof(SelectState);
}

// Block b owns the contiguous range [b * chunk, (b + 1) * chunk) of the coordinates, so the
// compaction can emit blocks in order; its candidate keys live in the same range of the buffer.
__device__ __forceinline__ void block_range(int64_t d, int64_t& begin, int64_t& end) {
  const int64_t chunk = ceil_div(d, gridDim.x);
  begin = blockIdx.x * chunk;
  end = begin + chunk < d ? begin + chunk : d;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Exclusive rank of `flag` among the block's threads and the block's total, in thread order.
// Every thread of the block calls it; it synchronizes the block.
__device__ __forceinline__ unsigned int block_rank(bool flag, unsigned int* warp_counts, unsigned int& total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const unsigned int ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  unsigned int before = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_counts[w] : 0;
    total += warp_counts[w];
  }
  __syncthreads();
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// ---- digit pass p: histogram of digit p over the keys matching the chosen prefix

// Where a digit pass reads its keys: the data (the first two passes) or the candidate buffer.
enum class Read { kData, kCandidates };

// Adds the block's histogram of digit `dig` into total (integer atomics: the sums do not depend on
// their order), adds the block's keys above the prefix to above[b], and with `keep` writes the
// keys matching the prefix to the block's range of the buffer, in index order. Reading and
// rewriting the buffer in place is safe: a key is written at or below the position it was read
// from, after the whole block has read its chunk (block_rank synchronizes). The last pass also
// keeps the block's own histogram, which gives its keys == T and > T once T is chosen.
template <Source kSource, typename T, Read kRead>
__global__ void __launch_bounds__(kThreads)
    digit_pass_kernel(Inputs<T> in, int64_t d, Digit dig, bool keep, bool last, const SelectState* __restrict__ state,
                      key_t<acc_t<T>>* keys, unsigned long long* __restrict__ kept,
                      unsigned int* __restrict__ total, unsigned int* __restrict__ last_hist,
                      unsigned long long* __restrict__ above_prefix, bool* __restrict__ nonfinite) {
  using A = acc_t<T>;
  // One spare bin takes the keys outside the prefix, so every lane joins the warp vote below.
  __shared__ unsigned int counts[kBins + 1];
  __shared__ unsigned long long warp_above[kWarps];
  __shared__ unsigned int warp_counts[kWarps];
  for (int b = threadIdx.x; b <= kBins; b += kThreads) counts[b] = 0;
  __syncthreads();
  const bool first = dig.prev_shift < 0;
  const unsigned long long prefix = first ? 0 : state->prefix;
  const unsigned int digit_mask = (1u << dig.width) - 1u;
  int64_t begin, end;
  block_range(d, begin, end);
  const int64_t length = kRead == Read::kData ? end - begin : static_cast<int64_t>(kept[blockIdx.x]);
  bool any_bad = false;
  unsigned long long above = 0;
  int64_t slot = 0;
  for (int64_t base = 0; base < length; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    unsigned int bin = kBins;
    key_t<A> key = 0;
    bool match = false;
    if (i < length) {
      if (kRead == Read::kData) {
        A momentum;
        bool bad;
        key = abs_key(element<kSource>(in, begin + i, momentum, bad));
        any_bad |= bad;
      } else {
        key = keys[begin + i];
      }
      const unsigned long long high = first ? 0ull : static_cast<unsigned long long>(key >> dig.prev_shift);
      match = high == prefix;
      if (match) bin = static_cast<unsigned int>(key >> dig.shift) & digit_mask;
      above += high > prefix;
    }
    if (keep) {
      unsigned int taken;
      const unsigned int rank = block_rank(match, warp_counts, taken);
      if (match) keys[begin + slot + rank] = key;
      slot += taken;
    }
    // Lanes with equal bins add once (skewed magnitudes share few bins; this avoids serializing).
    const unsigned int peers = __match_any_sync(0xffffffffu, bin);
    if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&counts[bin], __popc(peers));
  }
  if (any_bad && first) nonfinite[0] = true;
  above = warp_sum(above);
  if ((threadIdx.x & 31) == 0) warp_above[threadIdx.x / 32] = above;
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    const unsigned int c = counts[b];
    if (c != 0) atomicAdd(total + b, c);
    if (last) last_hist[static_cast<int64_t>(blockIdx.x) * kBins + b] = c;
  }
  if (threadIdx.x == 0) {
    unsigned long long sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += warp_above[w];
    above_prefix[blockIdx.x] += sum;
    if (keep) kept[blockIdx.x] = static_cast<unsigned long long>(slot);
  }
}

// ---- one block picks the bin holding the remaining-th largest key, scanning from the top

__global__ void __launch_bounds__(kSelectThreads)
    select_digit_kernel(const unsigned int* __restrict__ total, Digit dig, SelectState* __restrict__ state) {
  __shared__ unsigned long long warp_totals[kSelectWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  // Warp w sums bins [w * kBinsPerWarp, (w + 1) * kBinsPerWarp).
  unsigned long long mine = 0;
  for (int b = lane; b < kBinsPerWarp; b += 32) mine += total[warp * kBinsPerWarp + b];
  mine = warp_sum(mine);
  if (lane == 0) warp_totals[warp] = mine;
  __syncthreads();
  if (threadIdx.x != 0) return;
  const unsigned long long remaining = state->remaining;
  unsigned long long above = 0;
  int w = kSelectWarps - 1;
  while (w > 0 && above + warp_totals[w] < remaining) above += warp_totals[w--];
  int b = (w + 1) * kBinsPerWarp - 1;
  while (b > w * kBinsPerWarp && above + total[b] < remaining) above += total[b--];
  state->remaining = remaining - above;
  state->prefix = (dig.prev_shift < 0 ? 0ull : state->prefix << dig.width) | static_cast<unsigned int>(b);
}

// Block b of the data: its keys > T and == T, from its last-digit histogram.
__global__ void __launch_bounds__(kThreads)
    block_counts_kernel(const unsigned int* __restrict__ last_hist, const unsigned long long* __restrict__ above_prefix,
                        Digit dig, const SelectState* __restrict__ state, unsigned long long* __restrict__ greater,
                        unsigned long long* __restrict__ equal) {
  __shared__ unsigned long long warp_above[kWarps];
  const unsigned int t = static_cast<unsigned int>(state->prefix) & ((1u << dig.width) - 1u);
  const unsigned int* h = last_hist + static_cast<int64_t>(blockIdx.x) * kBins;
  unsigned long long above = 0;
  for (int b = t + 1 + threadIdx.x; b < kBins; b += kThreads) above += h[b];
  above = warp_sum(above);
  if ((threadIdx.x & 31) == 0) warp_above[threadIdx.x / 32] = above;
  __syncthreads();
  if (threadIdx.x != 0) return;
  unsigned long long sum = above_prefix[blockIdx.x];
  for (int w = 0; w < kWarps; ++w) sum += warp_above[w];
  greater[blockIdx.x] = sum;
  equal[blockIdx.x] = h[t];
}

__device__ __forceinline__ unsigned long long warp_inclusive_scan(unsigned long long x) {
  const int lane = threadIdx.x & 31;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, x, offset);
    if (lane >= offset) x += y;
  }
  return x;
}

// Exclusive prefix sum over the kSelectThreads threads of the block, in thread order.
__device__ unsigned long long block_exclusive_scan(unsigned long long x, unsigned long long* warp_totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const unsigned long long inclusive = warp_inclusive_scan(x);
  __syncthreads();
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  unsigned long long before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  return before + inclusive - x;
}

// Block b emits its keys > T at offset[b] and then its first quota[b] keys == T: the ties taken
// are the lowest-indexed ones overall.
__global__ void __launch_bounds__(kSelectThreads)
    offsets_kernel(int64_t blocks, const SelectState* __restrict__ state, const unsigned long long* __restrict__ greater,
                   const unsigned long long* __restrict__ equal, unsigned long long* __restrict__ offset,
                   unsigned long long* __restrict__ quota) {
  __shared__ unsigned long long warp_totals[kSelectWarps];
  const int64_t blk = threadIdx.x;
  const unsigned long long ties = state->remaining;
  const unsigned long long g = blk < blocks ? greater[blk] : 0, e = blk < blocks ? equal[blk] : 0;
  const unsigned long long g_before = block_exclusive_scan(g, warp_totals);
  const unsigned long long e_before = block_exclusive_scan(e, warp_totals);
  if (blk >= blocks) return;
  const unsigned long long taken_before = e_before < ties ? e_before : ties;
  const unsigned long long left = ties - taken_before;
  offset[blk] = g_before + taken_before;
  quota[blk] = e < left ? e : left;
}

__global__ void init_state_kernel(SelectState* state, unsigned long long k) {
  state->prefix = 0;
  state->remaining = k;
}

// ---- compaction in index order

template <Source kSource, typename T>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(Inputs<T> in, int64_t d, bool select_none, const SelectState* __restrict__ state,
                   const unsigned long long* __restrict__ offset, const unsigned long long* __restrict__ quota,
                   int64_t* __restrict__ indices, T* __restrict__ values, T* error_out, T* momentum_out) {
  using A = acc_t<T>;
  constexpr bool kFeedback = kSource != Source::kAbs;
  __shared__ unsigned int warp_counts[kWarps];
  const key_t<A> threshold = select_none ? key_t<A>(0) : static_cast<key_t<A>>(state->prefix);
  const unsigned long long my_quota = select_none ? 0 : quota[blockIdx.x];
  unsigned long long slot = select_none ? 0 : offset[blockIdx.x];
  unsigned long long ties_seen = 0;
  int64_t begin, end;
  block_range(d, begin, end);
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const bool valid = j < end;
    A value = A(0), momentum = A(0);
    bool bad = false;
    if (valid) value = element<kSource>(in, j, momentum, bad);
    const key_t<A> key = abs_key(value);
    const bool above = valid && !select_none && key > threshold;
    const bool tie = valid && !select_none && key == threshold;
    unsigned int tie_total, taken_total;
    const unsigned int tie_rank = block_rank(tie, warp_counts, tie_total);
    const bool take = above || (tie && ties_seen + tie_rank < my_quota);
    const unsigned int rank = block_rank(take, warp_counts, taken_total);
    if (take) {
      indices[slot + rank] = j;
      values[slot + rank] = kFeedback ? from_acc<T>(value) : in.x[j];
    }
    if (kFeedback && valid) {
      error_out[j] = from_acc<T>(take ? A(0) : value);
      momentum_out[j] = from_acc<T>(take ? A(0) : momentum);  // momentum factor masking
    }
    ties_seen += tie_total;
    slot += taken_total;
  }
}

// ---- the launcher shared by both ops

template <Source kSource, typename T>
cudaError_t radix_topk(const Inputs<T>& in, int64_t d, int64_t k, int64_t* indices, T* values, T* error_out,
                       T* momentum_out, bool* nonfinite, bool* host_nonfinite, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr bool kFeedback = kSource != Source::kAbs;
  if (d < 1 || k < 0 || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t k_sel = k < d ? k : d;
  const int64_t blocks = block_count(d);
  const Workspace<A> w = carve<A>(workspace, d, blocks);
  const unsigned int grid = static_cast<unsigned int>(blocks);
  constexpr int passes = digit_passes<A>();
  static_assert(passes >= 3, "the second digit pass fills the candidate buffer that the last one reads");
  RA_CUDA_TRY(cudaMemsetAsync(nonfinite, 0, sizeof(bool), stream));
  RA_CUDA_TRY(cudaMemsetAsync(w.total, 0, passes * kBins * sizeof(unsigned int), stream));
  RA_CUDA_TRY(cudaMemsetAsync(w.above, 0, blocks * sizeof(unsigned long long), stream));
  init_state_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(k_sel));
  RA_CUDA_TRY(cudaGetLastError());
  Digit dig{};
  for (int pass = 0; pass < passes; ++pass) {
    dig = digit<A>(pass);
    const bool last = pass == passes - 1;
    unsigned int* total = w.total + pass * kBins;
    if (pass < 2) {
      digit_pass_kernel<kSource, T, Read::kData><<<grid, kThreads, 0, stream>>>(
          in, d, dig, pass == 1, last, w.state, w.keys, w.kept, total, w.last_hist, w.above, nonfinite);
    } else {
      digit_pass_kernel<kSource, T, Read::kCandidates><<<grid, kThreads, 0, stream>>>(
          in, d, dig, !last, last, w.state, w.keys, w.kept, total, w.last_hist, w.above, nonfinite);
    }
    RA_CUDA_TRY(cudaGetLastError());
    if (pass == 0 && host_nonfinite != nullptr) {
      RA_CUDA_TRY(cudaMemcpyAsync(host_nonfinite, nonfinite, sizeof(bool), cudaMemcpyDeviceToHost, stream));
      RA_CUDA_TRY(cudaStreamSynchronize(stream));
      if (*host_nonfinite) return cudaSuccess;
    }
    if (k_sel == 0) break;
    select_digit_kernel<<<1, kSelectThreads, 0, stream>>>(total, dig, w.state);
    RA_CUDA_TRY(cudaGetLastError());
  }
  if (k_sel == 0 && !kFeedback) return cudaSuccess;
  if (k_sel > 0) {
    block_counts_kernel<<<grid, kThreads, 0, stream>>>(w.last_hist, w.above, dig, w.state, w.greater, w.equal);
    RA_CUDA_TRY(cudaGetLastError());
    offsets_kernel<<<1, kSelectThreads, 0, stream>>>(blocks, w.state, w.greater, w.equal, w.offset, w.quota);
    RA_CUDA_TRY(cudaGetLastError());
  }
  compact_kernel<kSource, T><<<grid, kThreads, 0, stream>>>(in, d, k_sel == 0, w.state, w.offset, w.quota, indices,
                                                             values, error_out, momentum_out);
  return cudaGetLastError();
}

}  // namespace

size_t topk_workspace_bytes(int64_t d, size_t acc_size) {
  if (d < 1) d = 1;
  return workspace_bytes(d, block_count(d), acc_size);
}

template <typename T>
cudaError_t topk_ef_step(const T* u, T* error, T* momentum, int64_t d, int64_t k, double rho, int64_t* indices,
                         T* values, bool* nonfinite, bool* host_nonfinite, void* workspace, cudaStream_t stream) {
  if (host_nonfinite == nullptr) return cudaErrorInvalidValue;
  *host_nonfinite = false;
  const Inputs<T> in{u, error, momentum, static_cast<acc_t<T>>(rho)};
  if (rho == 0.0) {
    return radix_topk<Source::kErrorFeedbackNoMomentum, T>(in, d, k, indices, values, error, momentum, nonfinite,
                                                           host_nonfinite, workspace, stream);
  }
  return radix_topk<Source::kErrorFeedback, T>(in, d, k, indices, values, error, momentum, nonfinite, host_nonfinite,
                                               workspace, stream);
}

template <typename T>
cudaError_t topk_abs(const T* x, int64_t d, int64_t k, int64_t* indices, T* values, bool* nonfinite, void* workspace,
                     cudaStream_t stream) {
  const Inputs<T> in{x, nullptr, nullptr, acc_t<T>(0)};
  return radix_topk<Source::kAbs, T>(in, d, k, indices, values, nullptr, nullptr, nonfinite, nullptr, workspace,
                                     stream);
}

#define RA_INSTANTIATE(T)                                                                                      \
  template cudaError_t topk_ef_step<T>(const T*, T*, T*, int64_t, int64_t, double, int64_t*, T*, bool*, bool*,   \
                                       void*, cudaStream_t);                                                     \
  template cudaError_t topk_abs<T>(const T*, int64_t, int64_t, int64_t*, T*, bool*, void*, cudaStream_t);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, __half, __nv_bfloat16)
#undef RA_INSTANTIATE

}  // namespace cuda
}  // namespace robustagg
