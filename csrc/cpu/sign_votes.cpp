// CPU loops for sign_sum and the fused robust learning rate (SPEC §4.1, §4.4).
//
// Both are one streaming read of G: each thread takes a chunk of kChunkVectors vectors of
// coordinates, keeps the chunk's vote counts (and for rlr the weighted sums) in L1, and walks the
// n rows over it, each row a long contiguous run. Non-finite rows are found in the same pass.
#include "cpu/lanes.h"  // first: it silences -Wpsabi for the vector types

#include <omp.h>

#include <algorithm>
#include <vector>

#include "core/sign_votes.h"

namespace robustagg::cpu {
namespace {

// 64 vectors = 1024 floats: 4 KiB of votes and 4 KiB of sums stay in L1 while each row adds in.
constexpr int64_t kChunkVectors = 64;

template <typename T>
struct VoteJob {
  using A = acc_t<T>;
  const T* G;
  int64_t n, d;
  const A* weights;  // rlr, nullptr: all ones
  A weight_total;
  int64_t theta;
  A server_lr;
  int32_t* sums;  // sign_sum
  T* out;         // rlr
};

template <typename T, bool kRlr, bool kWeighted>
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
    for (int64_t i = 0; i < job.n; ++i) {
      const T* row = job.G + i * job.d + j0;
      const V w = broadcast<V>(kWeighted ? job.weights[i] : A(1));
      V check{};
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t left = width - v * L::W;
        V x = left >= L::W ? load_lanes(row + v * L::W) : load_lanes_partial(row + v * L::W, left);
        check += x - x;                        // stays 0 unless some value is NaN or Inf
        votes[v] += (x < 0) - (x > 0);         // a true comparison is -1
        if constexpr (kRlr) sums[v] = kWeighted ? rlr_accumulate(sums[v], w, x) : sums[v] + x;
      }
      bad[i] |= any_nonzero(check);
    }
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t j = j0 + v * L::W;
      const int64_t count = std::min<int64_t>(L::W, job.d - j);
      if constexpr (kRlr) {
        V out;
        for (int l = 0; l < L::W; ++l) {
          out[l] = rlr_finish(static_cast<int>(votes[v][l]), static_cast<int>(job.theta), sums[v][l],
                              job.weight_total, job.server_lr);
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
void sign_sum(const T* G, int64_t n, int64_t d, int32_t* sums, bool* nonfinite) {
  vote_run<T, false, false>({G, n, d, nullptr, acc_t<T>(0), 0, acc_t<T>(0), sums, nullptr}, nonfinite);
}

// weights: n values in the accumulator type, or nullptr for all ones. The total is added in
// ascending row order, as the CUDA kernels do (core/sign_votes.h).
template <typename T>
void rlr(const T* G, int64_t n, int64_t d, const acc_t<T>* weights, int64_t theta, double server_lr, T* out,
         bool* nonfinite) {
  using A = acc_t<T>;
  A total = A(0);
  for (int64_t i = 0; i < n; ++i) total = total + (weights ? weights[i] : A(1));
  const VoteJob<T> job{G, n, d, weights, total, theta, static_cast<A>(server_lr), nullptr, out};
  if (weights) {
    vote_run<T, true, true>(job, nonfinite);
  } else {
    vote_run<T, true, false>(job, nonfinite);
  }
}

#define RA_INSTANTIATE(T)                                                                        \
  template void sign_sum<T>(const T*, int64_t, int64_t, int32_t*, bool*);                       \
  template void rlr<T>(const T*, int64_t, int64_t, const acc_t<T>*, int64_t, double, T*, bool*);
RA_INSTANTIATE(c10::Half)
RA_INSTANTIATE(c10::BFloat16)
RA_INSTANTIATE(float)
RA_INSTANTIATE(double)
#undef RA_INSTANTIATE

}  // namespace robustagg::cpu
