// Batcher's odd-even merge sort unrolled at compile time, for one thread's values in registers.
//
// core/order_stats.h builds the same network at run time as a list of (low, high) steps; here the
// steps are template constants, so after unrolling every wire index is known to the compiler and
// the wires stay in registers. tests/test_cuda_compile.py checks, on the host, that the steps equal
// core's batcher_network and that sort_wires + kept_mean_wires give core's bits.
#pragma once
#include <cstddef>
#include <utility>

#include "core/order_stats.h"

namespace robustagg {
namespace cuda {

struct Wires {
  int low, high;
};

__host__ __device__ constexpr int network_steps(int N) {
  int t = 0;
  while ((1 << t) < N) ++t;
  return t < 2 ? t : (t * t - t + 4) * (1 << (t - 2)) - 1;
}

// Step s of Batcher's odd-even merge sort on N = 2^t wires, in the order of core's batcher_network
// (Knuth 5.3.4, Algorithm M).
template <int N>
struct BatcherNetwork {
  Wires steps[network_steps(N) > 0 ? network_steps(N) : 1];
  __host__ __device__ constexpr BatcherNetwork() : steps() {
    int count = 0;
    for (int p = 1; p < N; p <<= 1)
      for (int k = p; k >= 1; k >>= 1)
        for (int j = k % p; j + k < N; j += 2 * k)
          for (int i = 0; i < k && i + j + k < N; ++i) {
            const int a = i + j, b = i + j + k;
            if (a / (2 * p) != b / (2 * p)) continue;
            steps[count].low = a;
            steps[count].high = b;
            ++count;
          }
  }
};

template <int N>
struct Network {
  static constexpr BatcherNetwork<N> value{};
};

template <int N, int S>
struct Step {
  static constexpr int low = Network<N>::value.steps[S].low;
  static constexpr int high = Network<N>::value.steps[S].high;
};

template <int N, typename A, size_t... S>
__host__ __device__ __forceinline__ void run_steps(A (&v)[N], std::index_sequence<S...>) {
  (compare_exchange(v[Step<N, S>::low], v[Step<N, S>::high]), ...);
}

// Sorts N = 2^t wires ascending with core's compare_exchange.
template <int N, typename A>
__host__ __device__ __forceinline__ void sort_wires(A (&v)[N]) {
  run_steps(v, std::make_index_sequence<network_steps(N)>{});
}

// core's kept_mean with every wire index a compile-time constant. -0 is the exact identity of
// IEEE addition (x + -0 == x for every x, -0 included), so adding it for the wires outside lo..hi-1
// leaves the sum bit for bit equal to sorted[lo] + ... + sorted[hi-1], without a branch the
// compiler could turn back into a loop with a run-time wire index.
template <int N, typename A>
__host__ __device__ __forceinline__ A kept_mean_wires(const A (&v)[N], int lo, int hi) {
  A sum = -A(0);
#pragma unroll
  for (int r = 0; r < N; ++r) sum = sum + ((r >= lo && r < hi) ? v[r] : -A(0));
  return sum / static_cast<A>(hi - lo);
}

}  // namespace cuda
}  // namespace robustagg
