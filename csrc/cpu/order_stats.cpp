// CPU loops for order_mean (so trimmed_mean and median), the fused invariant and Bulyan's
// closest_to_median_mean (docs/ops.md).
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
// non-finite rows, so nothing reads G twice. closest_to_median_mean sorts every position and then
// finds the window of the beta values nearest the median (closest_lanes: all lanes at once under
// AVX-512, core's window search lane by lane otherwise).
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types
#include "cpu/kernels.h"

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

// What a tile computes from its sorted values.
enum class OrderKind { kMean, kInvariant, kClosest };

template <typename T>
struct OrderJob {
  const T* G;
  const int64_t* rows;  // the selected rows of G, nullptr: every row
  int64_t n, d, lo, hi;  // n: the number of rows read
  const CompareExchange* net;  // nullptr: selection path
  int steps;
  int64_t min_votes;  // invariant only
  int64_t beta;       // closest_to_median_mean only
  T* out;
  bool* mask;  // invariant only

  const T* row(int64_t i) const { return selected_row(G, rows, i, d); }
};

template <typename T>
struct OrderScratch {
  using A = acc_t<T>;
  AlignedBuffer<typename Lanes<A>::V> wires;
  std::vector<A> columns;      // selection path: W columns of n values
  std::vector<A> lane;         // network paths: one lane's sorted values, for kept_mean_rescaled
  std::vector<A> kept;         // closest_to_median_mean's tied coordinates: the beta kept values
  std::vector<uint8_t> bad;    // rows seen holding NaN/Inf

  explicit OrderScratch(const OrderJob<T>& job)
      : wires(job.n), columns(job.net ? 0 : job.n * Lanes<A>::W), lane(job.n), kept(job.beta), bad(job.n, 0) {}
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
    for (int64_t l = 0; l < width; ++l) bad[i] |= is_nonfinite(static_cast<acc_t<T>>(job.row(i)[j + l]));
  }
}

// closest_to_median_mean of coordinate j from its n sorted values (core/order_stats.h). The median
// is rounded to T first, as ops.median returns it.
template <typename T>
inline acc_t<T> closest_coordinate(const OrderJob<T>& job, int64_t j, const acc_t<T>* sorted, OrderScratch<T>& s) {
  using A = acc_t<T>;
  const A center = static_cast<A>(static_cast<T>(sorted_median(sorted, job.n)));
  const NearestWindow window = nearest_window(sorted, job.n, job.beta, center);
  if (!window.tied) return kept_mean_finite(sorted, window.begin, window.end);
  return nearest_by_index([&](int64_t i) { return static_cast<A>(job.row(i)[j]); }, job.n, job.beta, center,
                          window, sorted, s.kept.data());
}

// closest_coordinate of lane l of a sorted tile whose first coordinate is j.
template <typename T>
inline acc_t<T> closest_lane(const OrderJob<T>& job, int64_t j, int64_t l, const typename Lanes<acc_t<T>>::V* wires,
                             OrderScratch<T>& s) {
  for (int64_t i = 0; i < job.n; ++i) s.lane[i] = wires[i][l];
  return closest_coordinate(job, j + l, s.lane.data(), s);
}

// closest_to_median_mean of one sorted tile, all lanes at once. The window of the beta nearest
// values starts at a = #{a : |s_a - c| > |s_(a+beta) - c|}: without a tie at its edges, the
// window [a, a + beta) moves right exactly while its left end is farther than the next value on
// the right. Its values are added in ascending order like kept_mean. A lane goes through
// closest_coordinate instead (the exact rule: ties by client row, core's overflow redo) when an
// excluded neighbour of the window is not strictly farther than its farthest value, or when its
// median or mean is not finite (NaN/Inf input, or a sum that overflowed).
//
// Compiled for AVX-512 only, and with the target on this function itself: GCC lowers the vector
// operations of a function for its own target before `flatten` inlines it, and for the baseline
// it lowers these comparisons and selects lane by lane (10x the network's time,
// benchmarks/NOTES.md). The other copies take every lane through closest_coordinate.
template <typename T>
RA_TARGET_AVX512 inline typename Lanes<acc_t<T>>::V closest_lanes(const OrderJob<T>& job, int64_t j, int64_t width,
                                                 const typename Lanes<acc_t<T>>::V* wires, OrderScratch<T>& s) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  using Mask = typename L::Mask;
  using Count = typename L::Count;
  const int64_t n = job.n, beta = job.beta;
  V center = kept_mean<A>(wires, (n - 1) / 2, n / 2 + 1);
  if constexpr (!std::is_same_v<T, A>) {
    for (int l = 0; l < L::W; ++l) center[l] = static_cast<A>(static_cast<T>(center[l]));  // as median returns it
  }
  const auto distance = [&](const V& x) {
    const V gap = x - center;
    return gap < V{} ? -gap : gap;
  };
  Mask begin{};
  for (int64_t a = 0; a + beta < n; ++a) begin -= distance(wires[a]) > distance(wires[a + beta]);  // true is -1
  const Mask end = begin + static_cast<Count>(beta);
  V sum{}, first{}, last{}, before{}, after{};
  Mask at{};  // r in every lane (a broadcast per step would be built lane by lane)
  for (int64_t r = 0; r < n; ++r, at += 1) {
    const V x = wires[r];
    sum = at == begin ? x : ((at > begin) & (at < end) ? sum + x : sum);
    first = at == begin ? x : first;
    last = at == end - 1 ? x : last;
    before = at == begin - 1 ? x : before;
    after = at == end ? x : after;
  }
  const V mean = sum / static_cast<A>(beta);
  const V far_left = distance(first), far_right = distance(last);
  const V farthest = far_left < far_right ? far_right : far_left;
  const Mask unclear = ((begin > 0) & (distance(before) <= farthest)) |
                       ((end < static_cast<Count>(n)) & (distance(after) <= farthest)) |
                       ((center - center) != V{}) | ((mean - mean) != V{});
  if (!any_nonzero(unclear)) return mean;
  V out = mean;
  for (int64_t l = 0; l < width; ++l) {
    if (unclear[l] != 0) out[l] = closest_lane(job, j, l, wires, s);
  }
  return out;
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
template <Isa isa, typename T, OrderKind kKind, int S>
inline void order_tile(const OrderJob<T>& job, int64_t j, typename Lanes<acc_t<T>>::V* wires, OrderScratch<T>& s) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  const int64_t width = std::min<int64_t>(L::W, job.d - j);
  V check{};
  typename L::Mask votes{};
  for (int64_t i = 0; i < job.n; ++i) {
    const T* p = job.row(i) + j;
    V x = width == L::W ? load_lanes(p) : load_lanes_partial(p, width);
    check += x - x;  // stays 0 unless some value is NaN or Inf
    if constexpr (kKind == OrderKind::kInvariant) votes += (x < 0) - (x > 0);  // a true comparison is -1
    wires[i] = x;
  }
  V mean{};
  const bool network = S > 0 || job.net;
  if constexpr (S > 0) {
    for (int64_t i = job.n; i < S; ++i) wires[i] = broadcast<V>(A(INFINITY));
    run_static_network<S>(wires);
  } else if (job.net) {
    run_network(wires, job.net, job.steps);
  }
  if (network && kKind != OrderKind::kClosest) {
    mean = kept_mean<A>(wires, job.lo, job.hi);
  } else if (network) {
    if constexpr (isa == Isa::avx512) {
      mean = closest_lanes(job, j, width, wires, s);
    } else {
      for (int64_t l = 0; l < width; ++l) mean[l] = closest_lane(job, j, l, wires, s);
    }
  } else {
    A* columns = s.columns.data();
    for (int64_t i = 0; i < job.n; ++i) {
      for (int l = 0; l < L::W; ++l) columns[l * job.n + i] = wires[i][l];
    }
    for (int64_t l = 0; l < width; ++l) {
      A* column = columns + l * job.n;
      if constexpr (kKind == OrderKind::kClosest) {
        heap_sort(column, job.n);
        mean[l] = closest_coordinate(job, j + l, column, s);
      } else {
        mean[l] = order_mean_select(column, job.n, job.lo, job.hi);  // redoes an overflowed mean itself
      }
    }
  }
  // One test per tile for both rare cases: a NaN/Inf value (flag its rows) and a kept mean that
  // overflowed although its values were finite (redo those lanes; closest_coordinate did).
  if (any_nonzero(check + (mean - mean))) {
    if (any_nonzero(check)) flag_nonfinite_rows(job, j, width, s.bad.data());
    if (network && kKind != OrderKind::kClosest) rescue_overflowed_lanes(job, wires, check, width, mean, s);
  }
  if constexpr (kKind == OrderKind::kInvariant) {
    using Mask = typename L::Mask;
    const Mask keep = invariant_keeps_lanes(votes, broadcast<Mask>(static_cast<typename L::Count>(job.min_votes)));
    mean = keep ? mean : V{};
    const typename L::Bytes keep_bytes = __builtin_convertvector(keep & 1, typename L::Bytes);
    std::memcpy(job.mask + j, &keep_bytes, width);  // bool is one byte, 0 or 1
  }
  store_lanes(job.out + j, mean, width);
}

template <Isa isa, typename T, OrderKind kKind, int S>
inline void order_tiles_body(const OrderJob<T>& job, int64_t begin, int64_t end, OrderScratch<T>& s) {
  using L = Lanes<acc_t<T>>;
  if constexpr (S > 0) {
    typename L::V wires[S];  // a local array, so the unrolled network can keep it in registers
    for (int64_t tile = begin; tile < end; ++tile) {
      // while the network of this tile runs, the rows of a later tile are on their way
      if (tile + kPrefetchTiles < end) {
        for (int64_t i = 0; i < job.n; ++i) __builtin_prefetch(job.row(i) + (tile + kPrefetchTiles) * L::W);
      }
      order_tile<isa, T, kKind, S>(job, tile * L::W, wires, s);
    }
  } else {
    for (int64_t tile = begin; tile < end; ++tile) order_tile<isa, T, kKind, S>(job, tile * L::W, s.wires.data(), s);
  }
}

RA_CPU_KERNEL(order_tiles, (typename T, OrderKind kKind, int S), (T, kKind, S),
              (const OrderJob<T>& job, int64_t begin, int64_t end, OrderScratch<T>& s), (job, begin, end, s))

template <typename T, OrderKind kKind, int S>
void order_tiles_parallel(const OrderJob<T>& job, bool* nonfinite) {
  const int64_t tiles = (job.d + Lanes<acc_t<T>>::W - 1) / Lanes<acc_t<T>>::W;
  const Isa isa = best_isa();
#pragma omp parallel
  {
    OrderScratch<T> scratch(job);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tiles; task += kTilesPerTask) {
      order_tiles<T, kKind, S>(isa, job, task, std::min(tiles, task + kTilesPerTask), scratch);
    }
#pragma omp critical(robustagg_order_nonfinite)
    for (int64_t i = 0; i < job.n; ++i) nonfinite[i] |= scratch.bad[i] != 0;
  }
}

template <typename T, OrderKind kKind>
void order_mean_run(OrderJob<T> job, bool* nonfinite) {
  std::fill(nonfinite, nonfinite + job.n, false);
  // Compiled networks for float inputs only: the 16-bit types share the memory-resident network,
  // which keeps the build small.
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (job.n <= 20) return order_tiles_parallel<T, kKind, 20>(job, nonfinite);
    if (job.n <= 32) return order_tiles_parallel<T, kKind, 32>(job, nonfinite);
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
  order_tiles_parallel<T, kKind, 0>(job, nonfinite);
}

}  // namespace

template <typename T>
void order_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out,
                bool* nonfinite) {
  order_mean_run<T, OrderKind::kMean>({G, rows, n, d, lo, hi, nullptr, 0, 0, 0, out, nullptr}, nonfinite);
}

template <typename T>
void invariant(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t lo, int64_t hi, int64_t min_votes,
               T* out, bool* mask, bool* nonfinite) {
  order_mean_run<T, OrderKind::kInvariant>({G, rows, n, d, lo, hi, nullptr, 0, min_votes, 0, out, mask},
                                           nonfinite);
}

template <typename T>
void closest_to_median_mean(const T* G, const int64_t* rows, int64_t n, int64_t d, int64_t beta, T* out,
                            bool* nonfinite) {
  order_mean_run<T, OrderKind::kClosest>({G, rows, n, d, 0, n, nullptr, 0, 0, beta, out, nullptr}, nonfinite);
}

#define RA_INSTANTIATE(T)                                                                        \
  template void order_mean<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, T*, bool*);        \
  template void invariant<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, T*, bool*, \
                             bool*);                                                                           \
  template void closest_to_median_mean<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, T*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace robustagg::cpu
