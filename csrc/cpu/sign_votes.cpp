// CPU loops for sign_sum and the fused robust learning rate (docs/ops.md).
//
// Both are one streaming read of G: each thread takes a chunk of kChunkVectors vectors of
// coordinates, keeps the chunk's vote counts (and for rlr the weighted sums) in L1, and walks the
// n rows over it, each row a long contiguous run. Non-finite rows are found in the same pass. A
// coordinate whose weighted sum overflowed is redone from its column (core/sign_votes.h).
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types
#include "cpu/kernels.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "core/sign_votes.h"

namespace robustagg::cpu {
namespace {

// 256 vectors = 4096 floats: each row is read in 16 KiB runs (4 KiB runs restart the hardware
// prefetcher at every page; benchmarks/NOTES.md), the votes and sums stay in L1/L2.
constexpr int64_t kChunkVectors = 256;
// Rows added per visit of the accumulators.
constexpr int kRowsPerPass = 4;

template <typename T>
struct VoteJob {
  using A = acc_t<T>;
  const T* G;
  const int64_t* rows;  // the selected rows of G, nullptr: every row
  int64_t n, d;         // n: the number of rows read
  const A* weights;     // rlr, one per row read; nullptr: all ones
  A weight_total;
  int64_t theta;
  A server_lr;
  int32_t* sums;  // sign_sum
  T* out;         // rlr

  const T* row(int64_t i) const { return selected_row(G, rows, i, d); }
};

// Adds R consecutive rows (from row i) into the chunk's votes and sums. Each accumulator takes the
// R rows in ascending order within one visit, so the result is bitwise that of one row at a time,
// with a quarter of the accumulator loads and stores.
template <int R, typename T, bool kRlr, bool kWeighted>
inline void add_rows(const VoteJob<T>& job, int64_t i, int64_t j0, int64_t width, typename Lanes<acc_t<T>>::Mask* votes,
                     typename Lanes<acc_t<T>>::V* sums, uint8_t* bad) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  const T* starts[R];
  V w[R], check[R];
  for (int r = 0; r < R; ++r) {
    starts[r] = job.row(i + r) + j0;
    w[r] = broadcast<V>(kWeighted ? job.weights[i + r] : A(1));
    check[r] = V{};
  }
  const int64_t vectors = (width + L::W - 1) / L::W;
  for (int64_t v = 0; v < vectors; ++v) {
    const int64_t left = width - v * L::W;
    typename L::Mask vote = votes[v];
    V sum = sums[v];
    for (int r = 0; r < R; ++r) {
      const T* p = starts[r] + v * L::W;
      V x = left >= L::W ? load_lanes(p) : load_lanes_partial(p, left);
      check[r] += x - x;           // stays 0 unless some value is NaN or Inf
      vote += (x < 0) - (x > 0);   // a true comparison is -1
      if constexpr (kRlr) sum = kWeighted ? rlr_accumulate(sum, w[r], x) : sum + x;
    }
    votes[v] = vote;
    sums[v] = sum;
  }
  for (int r = 0; r < R; ++r) bad[i + r] |= any_nonzero(check[r]);
}

// rlr's mean of coordinate j where the weighted sum overflowed (core's RescuedMean); ±Inf stays
// when the column itself holds NaN/Inf. Rare: only huge finite values get here.
template <typename T>
inline acc_t<T> rescued_rlr_mean(const VoteJob<T>& job, int64_t j, acc_t<T> overflowed) {
  using A = acc_t<T>;
  RescuedMean m{};
  for (int64_t i = 0; i < job.n; ++i) {
    const A x = static_cast<A>(job.row(i)[j]);
    if (is_nonfinite(x)) return overflowed;
    const double w = job.weights ? static_cast<double>(job.weights[i]) : 1.0;
    rescued_mean_add(m, i, w / static_cast<double>(job.weight_total), static_cast<double>(x));
  }
  return static_cast<A>(rescued_mean_value(m));
}

template <Isa, typename T, bool kRlr, bool kWeighted>
inline void vote_chunks_body(const VoteJob<T>& job, int64_t begin, int64_t end, uint8_t* bad) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int64_t C = kChunkVectors * L::W;
  typename L::Mask votes[kChunkVectors];
  V sums[kChunkVectors];
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t j0 = chunk * C;
    const int64_t width = std::min(C, job.d - j0);
    const int64_t vectors = (width + L::W - 1) / L::W;
    for (int64_t v = 0; v < vectors; ++v) {
      votes[v] = typename L::Mask{};
      sums[v] = V{};
    }
    int64_t i = 0;
    for (; i + kRowsPerPass <= job.n; i += kRowsPerPass) {
      add_rows<kRowsPerPass, T, kRlr, kWeighted>(job, i, j0, width, votes, sums, bad);
    }
    for (; i < job.n; ++i) add_rows<1, T, kRlr, kWeighted>(job, i, j0, width, votes, sums, bad);
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t j = j0 + v * L::W;
      const int64_t count = std::min<int64_t>(L::W, job.d - j);
      if constexpr (kRlr) {
        V out;
        const bool overflowed = any_nonzero(sums[v] - sums[v]);  // rare: one vector test
        for (int l = 0; l < L::W; ++l) {
          const int lane_votes = static_cast<int>(votes[v][l]), theta = static_cast<int>(job.theta);
          out[l] = rlr_finish(lane_votes, theta, sums[v][l], job.weight_total, job.server_lr);
          if (overflowed && l < count && is_infinite(sums[v][l])) {
            const A mean = rescued_rlr_mean(job, j + l, sums[v][l] / job.weight_total);
            out[l] = rlr_apply(lane_votes, theta, mean, job.server_lr);
          }
        }
        store_lanes(job.out + j, out, count);
      } else {
        for (int64_t l = 0; l < count; ++l) job.sums[j + l] = static_cast<int32_t>(votes[v][l]);
      }
    }
  }
}

RA_CPU_KERNEL(vote_chunks, (typename T, bool kRlr, bool kWeighted), (T, kRlr, kWeighted),
              (const VoteJob<T>& job, int64_t begin, int64_t end, uint8_t* bad), (job, begin, end, bad))

template <typename T, bool kRlr, bool kWeighted>
void vote_run(const VoteJob<T>& job, bool* nonfinite) {
  std::fill(nonfinite, nonfinite + job.n, false);
  const int64_t chunks = (job.d + kChunkVectors * Lanes<acc_t<T>>::W - 1) / (kChunkVectors * Lanes<acc_t<T>>::W);
  const Isa isa = best_isa();
#pragma omp parallel
  {
    std::vector<uint8_t> bad(job.n, 0);
#pragma omp for schedule(dynamic, 4)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      vote_chunks<T, kRlr, kWeighted>(isa, job, chunk, chunk + 1, bad.data());
    }
#pragma omp critical(robustagg_vote_nonfinite)
    for (int64_t i = 0; i < job.n; ++i) nonfinite[i] |= bad[i] != 0;
  }
}

}  // namespace

template <typename T>
void sign_sum(const T* G, const int64_t* rows, int64_t n, int64_t d, int32_t* sums, bool* nonfinite) {
  vote_run<T, false, false>({G, rows, n, d, nullptr, acc_t<T>(0), 0, acc_t<T>(0), sums, nullptr}, nonfinite);
}

// weights: n values in the accumulator type, or nullptr for all ones. The total is added in
// ascending row order, as the CUDA kernels do (core/sign_votes.h).
template <typename T>
void rlr(const T* G, const int64_t* rows, int64_t n, int64_t d, const acc_t<T>* weights, int64_t theta,
         double server_lr, T* out, bool* nonfinite) {
  using A = acc_t<T>;
  A total = A(0);
  for (int64_t i = 0; i < n; ++i) total = total + (weights ? weights[i] : A(1));
  const VoteJob<T> job{G, rows, n, d, weights, total, theta, static_cast<A>(server_lr), nullptr, out};
  if (weights) {
    vote_run<T, true, true>(job, nonfinite);
  } else {
    vote_run<T, true, false>(job, nonfinite);
  }
}

#define RA_INSTANTIATE(T)                                                                        \
  template void sign_sum<T>(const T*, const int64_t*, int64_t, int64_t, int32_t*, bool*);       \
  template void rlr<T>(const T*, const int64_t*, int64_t, int64_t, const acc_t<T>*, int64_t, double, T*, bool*);
RA_FOR_EACH_DTYPE(RA_INSTANTIATE, c10::Half, c10::BFloat16)
#undef RA_INSTANTIATE

}  // namespace robustagg::cpu
