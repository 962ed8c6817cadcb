// CPU loops for order_mean (so trimmed_mean and median) and the fused invariant (docs/ops.md).
//
// G is read once, in tiles of W coordinates (one 64-byte vector per row): the n row-vectors of a
// tile are loaded into `wires` (n x W), then a network runs across the lanes (each
// compare-exchange is one vector min and max):
//   * float/double inputs with n <= 32: Batcher's network for 20 or 32 wires, compiled and fully
//     unrolled, the missing rows padded with +Inf, so the tile stays in vector registers;
//   * other n <= kNetworkMaxRows (and 16-bit inputs): Batcher's network for n wires, pruned to the
//     steps that the kept positions lo..hi-1 depend on (partial selection), read from memory,
//     with the wires in L1;
//   * larger n: the tile is transposed and each coordinate goes through select_nth (two
//     selections isolate the kept window, only the window is sorted).
// Both end in the core's ascending sum of the kept values (core/order_stats.h), redone scaled in
// the rare lanes where it overflowed. The loads also count sign votes (invariant) and detect
// non-finite rows, so nothing reads G twice.
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/order_stats.h"
#include "core/sign_votes.h"

namespace robustagg::cpu {
namespace {

// Up to this many rows the pruned network (O(n log^2 n) vector steps per tile, n x 64 bytes of
// wires in L2) beats per-coordinate selection, whose branches mispredict and whose window sort is
// scalar: median of 512 rows 4x, trimmed mean 14x faster (benchmarks/NOTES.md).
constexpr int64_t kNetworkMaxRows = 2048;
// Tiles handed to a thread at a time: small enough to balance two busy cores, large enough that
// each row is read in long runs.
constexpr int64_t kTilesPerTask = 64;
// Tiles ahead that the register-network loop prefetches.
constexpr int64_t kPrefetchTiles = 4;

template <typename T>
struct OrderJob {
  const T* G;
  int64_t n, d, lo, hi;
  const CompareExchange* net;  // nullptr: selection path
  int steps;
  int64_t min_votes;  // invariant only
  T* out;
  bool* mask;  // invariant only
};

template <typename T>
struct OrderScratch {
  using A = acc_t<T>;
  AlignedBuffer<typename Lanes<A>::V> wires;
  std::vector<A> columns;      // selection path: W columns of n values
  std::vector<A> lane;         // network paths: one lane's sorted values, for kept_mean_rescaled
  std::vector<uint8_t> bad;    // rows seen holding NaN/Inf

  explicit OrderScratch(const OrderJob<T>& job)
      : wires(job.n), columns(job.net ? 0 : job.n * Lanes<A>::W), lane(job.n), bad(job.n, 0) {}
};

// kept_mean overflowed (is ±Inf) in some lanes whose values were all finite (check == 0): redo
// those lanes with core's kept_mean_rescaled. Rare: only huge finite values get here.
template <typename T>
inline void rescue_overflowed_lanes(const OrderJob<T>& job, const typename Lanes<acc_t<T>>::V* sorted,
                                    const typename Lanes<acc_t<T>>::V& check, int64_t width,
                                    typename Lanes<acc_t<T>>::V& mean, OrderScratch<T>& s) {
  for (int64_t l = 0; l < width; ++l) {
    if (check[l] != 0 || !is_infinite(mean[l])) continue;
    for (int64_t r = job.lo; r < job.hi; ++r) s.lane[r] = sorted[r][l];
    mean[l] = kept_mean_rescaled(s.lane.data(), job.lo, job.hi);
  }
}

// A tile held a NaN/Inf somewhere (rare): find the rows, from G (the wires are sorted by now).
template <typename T>
inline void flag_nonfinite_rows(const OrderJob<T>& job, int64_t j, int64_t width, uint8_t* bad) {
  for (int64_t i = 0; i < job.n; ++i) {
    for (int64_t l = 0; l < width; ++l) bad[i] |= is_nonfinite(static_cast<acc_t<T>>(job.G[i * job.d + j + l]));
  }
}

// A sorting network fixed at compile time, for n <= S rows padded with +Inf (which sorts last, so
// positions lo..hi-1 < n are unchanged). Fully unrolled, the S wires of a tile stay in vector
// registers; a network read from memory runs through the L1 buffer instead, where every step
// waits on the stores of the step before (benchmarks/NOTES.md).
template <int S>
struct StaticNetwork {
  CompareExchange steps[batcher_network_capacity(S)];
  int count;
};

template <int S>
constexpr StaticNetwork<S> make_static_network() {
  StaticNetwork<S> net{};
  net.count = batcher_network(S, net.steps);
  return net;
}

template <int S>
inline constexpr StaticNetwork<S> kStaticNetwork = make_static_network<S>();

template <int S, typename V>
inline void run_static_network(V* wires) {
#pragma GCC unroll 1024
  for (int s = 0; s < kStaticNetwork<S>.count; ++s) {
    compare_exchange(wires[kStaticNetwork<S>.steps[s].low], wires[kStaticNetwork<S>.steps[s].high]);
  }
}

// One tile: the order mean of W coordinates, their votes (invariant) and the non-finite check.
template <typename T, bool kVotes, int S>
inline void order_tile(const OrderJob<T>& job, int64_t j, typename Lanes<acc_t<T>>::V* wires, OrderScratch<T>& s) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  const int64_t width = std::min<int64_t>(L::W, job.d - j);
  V check{};
  typename L::Mask votes{};
  for (int64_t i = 0; i < job.n; ++i) {
    const T* p = job.G + i * job.d + j;
    V x = width == L::W ? load_lanes(p) : load_lanes_partial(p, width);
    check += x - x;  // stays 0 unless some value is NaN or Inf
    if constexpr (kVotes) votes += (x < 0) - (x > 0);  // a true comparison is -1
    wires[i] = x;
  }
  V mean;
  if constexpr (S > 0) {
    for (int64_t i = job.n; i < S; ++i) wires[i] = broadcast<V>(A(INFINITY));
    run_static_network<S>(wires);
    mean = kept_mean<A>(wires, job.lo, job.hi);
  } else if (job.net) {
    run_network(wires, job.net, job.steps);
    mean = kept_mean<A>(wires, job.lo, job.hi);
  } else {
    A* columns = s.columns.data();
    for (int64_t i = 0; i < job.n; ++i) {
      for (int l = 0; l < L::W; ++l) columns[l * job.n + i] = wires[i][l];
    }
    mean = V{};
    // core's order_mean_select redoes an overflowed mean itself
    for (int64_t l = 0; l < width; ++l) mean[l] = order_mean_select(columns + l * job.n, job.n, job.lo, job.hi);
  }
  // One test per tile for both rare cases: a NaN/Inf value (flag its rows) and a kept mean that
  // overflowed although its values were finite (redo those lanes).
  if (any_nonzero(check + (mean - mean))) {
    if (any_nonzero(check)) flag_nonfinite_rows(job, j, width, s.bad.data());
    if (S > 0 || job.net) rescue_overflowed_lanes(job, wires, check, width, mean, s);
  }
  if constexpr (kVotes) {
    using Mask = typename L::Mask;
    const Mask keep = invariant_keeps_lanes(votes, broadcast<Mask>(static_cast<typename L::Count>(job.min_votes)));
    mean = keep ? mean : V{};
    const typename L::Bytes keep_bytes = __builtin_convertvector(keep & 1, typename L::Bytes);
    std::memcpy(job.mask + j, &keep_bytes, width);  // bool is one byte, 0 or 1
  }
  store_lanes(job.out + j, mean, width);
}

template <typename T, bool kVotes, int S>
inline void order_tiles_body(const OrderJob<T>& job, int64_t begin, int64_t end, OrderScratch<T>& s) {
  using L = Lanes<acc_t<T>>;
  if constexpr (S > 0) {
    typename L::V wires[S];  // a local array, so the unrolled network can keep it in registers
    for (int64_t tile = begin; tile < end; ++tile) {
      // while the network of this tile runs, the rows of a later tile are on their way
      if (tile + kPrefetchTiles < end) {
        for (int64_t i = 0; i < job.n; ++i) __builtin_prefetch(job.G + i * job.d + (tile + kPrefetchTiles) * L::W);
      }
      order_tile<T, kVotes, S>(job, tile * L::W, wires, s);
    }
  } else {
    for (int64_t tile = begin; tile < end; ++tile) order_tile<T, kVotes, S>(job, tile * L::W, s.wires.data(), s);
  }
}

RA_CPU_KERNEL(order_tiles, (typename T, bool kVotes, int S), (T, kVotes, S),
              (const OrderJob<T>& job, int64_t begin, int64_t end, OrderScratch<T>& s), (job, begin, end, s))

template <typename T, bool kVotes, int S>
void order_tiles_parallel(const OrderJob<T>& job, bool* nonfinite) {
  const int64_t tiles = (job.d + Lanes<acc_t<T>>::W - 1) / Lanes<acc_t<T>>::W;
  const Isa isa = best_isa();
#pragma omp parallel
  {
    OrderScratch<T> scratch(job);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tiles; task += kTilesPerTask) {
      order_tiles<T, kVotes, S>(isa, job, task, std::min(tiles, task + kTilesPerTask), scratch);
    }
#pragma omp critical(robustagg_order_nonfinite)
    for (int64_t i = 0; i < job.n; ++i) nonfinite[i] |= scratch.bad[i] != 0;
  }
}

template <typename T, bool kVotes>
void order_mean_run(OrderJob<T> job, bool* nonfinite) {
  std::fill(nonfinite, nonfinite + job.n, false);
  // Compiled networks for float inputs only: the 16-bit types share the memory-resident network,
  // which keeps the build small.
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (job.n <= 20) return order_tiles_parallel<T, kVotes, 20>(job, nonfinite);
    if (job.n <= 32) return order_tiles_parallel<T, kVotes, 32>(job, nonfinite);
  }
  std::vector<CompareExchange> net;
  if (job.n <= kNetworkMaxRows) {
    const int n = static_cast<int>(job.n);
    net.resize(batcher_network_capacity(n));
    std::vector<unsigned char> live(n);
    job.steps = prune_network(net.data(), batcher_network(n, net.data()), n, static_cast<int>(job.lo),
                              static_cast<int>(job.hi), live.data());
    job.net = net.data();
  }
  order_tiles_parallel<T, kVotes, 0>(job, nonfinite);
}

}  // namespace

template <typename T>
void order_mean(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out, bool* nonfinite) {
  order_mean_run<T, false>({G, n, d, lo, hi, nullptr, 0, 0, out, nullptr}, nonfinite);
}

template <typename T>
void invariant(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, int64_t min_votes, T* out, bool* mask,
               bool* nonfinite) {
  order_mean_run<T, true>({G, n, d, lo, hi, nullptr, 0, min_votes, out, mask}, nonfinite);
}

#define RA_INSTANTIATE(T)                                                                        \
  template void order_mean<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*, bool*);         \
  template void invariant<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*, bool*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace robustagg::cpu
