// Per-coordinate order statistics (docs/ops.md): the mean of the sorted values at positions
// lo..hi-1, shared by the CPU and CUDA kernels.
//
// API (stable; the CUDA kernels call these):
//
//   Sorting networks, generic over the wire type V. V is a scalar (CUDA: one thread per
//   coordinate) or a SIMD lane array (CPU: one lane per coordinate, e.g. a GCC vector type); V
//   needs `<`, `?:` on the comparison, `+` and division by an A.
//     struct CompareExchange { uint16_t low, high; }   one step: wire low gets the min, high the max
//     int  batcher_network_capacity(int n)             pairs batcher_network(n, ...) may write
//     int  batcher_network(int n, CompareExchange* out)
//                                                      Batcher's odd-even merge sort for n wires
//                                                      (n <= 65536); returns the number of steps
//     int  prune_network(CompareExchange* net, int count, int n, int lo, int hi, unsigned char* live)
//                                                      keeps only the steps that positions lo..hi-1
//                                                      depend on (in place, order kept; live: n
//                                                      bytes of scratch); returns the new count
//     void compare_exchange(V& a, V& b)
//     void run_network(V* wires, const CompareExchange* net, int count)
//     V    kept_mean<A>(const V* sorted, int64_t lo, int64_t hi)
//                                                      the mean of sorted[lo..hi-1] (A: the
//                                                      accumulator type of one lane)
//     A    kept_mean_rescaled(const A* sorted, int64_t lo, int64_t hi)
//     A    kept_mean_finite(const A* sorted, int64_t lo, int64_t hi)
//                                                      one coordinate (scalar A): the redo where
//                                                      kept_mean overflowed, and kept_mean with it
//
//   General selection for any n, on one coordinate's values (scalar A):
//     void select_nth(A* v, int64_t begin, int64_t end, int64_t nth)
//     void heap_sort(A* v, int64_t count)
//     A    order_mean_select(A* v, int64_t n, int64_t lo, int64_t hi)   reorders v
//
//   Bulyan's coordinate step (closest_to_median_mean), on one coordinate's sorted values:
//     A             sorted_median(const A* sorted, int64_t n)   numpy-style, like order_mean
//     NearestWindow nearest_window(const A* sorted, int64_t n, int64_t beta, A center)
//     A             nearest_by_index(Value value_of, int64_t n, int64_t beta, A center,
//                                    NearestWindow w, const A* sorted, A* kept)
//
// Bitwise agreement between backends: every path ends in kept_mean, which adds the kept values in
// ascending sorted order (sorted[lo] + sorted[lo+1] + ... + sorted[hi-1]) and divides once by
// hi - lo. Any exact selection method yields the same sorted kept values, so the network path,
// the selection path and the CUDA kernels give the same bits. Only the kept values are added,
// never "total minus the trimmed ones", so a ±3e38 outlier that is trimmed cannot cost the honest
// values any precision (docs/nonfinite.md). Where that sum overflows although the values are finite, every
// path redoes it with kept_mean_rescaled.
//
// NaN: the kernels never crash or loop forever on NaN (it only breaks the ordering, and the caller
// reports the row as non-finite); the results for such coordinates are unspecified.
#pragma once
#include "core/common.h"

namespace robustagg {

struct CompareExchange {
  uint16_t low, high;
};

// Written as `b < a ? ... : ...` (not fmin/fmax), so that scalars and vector lanes make the same
// choice for ±0 and NaN on every backend.
template <typename V>
RA_HD void compare_exchange(V& a, V& b) {
  V smaller = b < a ? b : a;
  V larger = b < a ? a : b;
  a = smaller;
  b = larger;
}

template <typename V>
RA_HD void run_network(V* wires, const CompareExchange* net, int count) {
  for (int s = 0; s < count; ++s) compare_exchange(wires[net[s].low], wires[net[s].high]);
}

template <typename A, typename V>
RA_HD V kept_mean(const V* sorted, int64_t lo, int64_t hi) {
  V sum = sorted[lo];
  for (int64_t r = lo + 1; r < hi; ++r) sum = sum + sorted[r];
  return sum / static_cast<A>(hi - lo);
}

// The mean of finite values is finite, but their running sum can overflow (two 3e38 values in
// float32), and then kept_mean is ±Inf. This redo adds the kept values scaled by 2^-m with
// 2^m >= 2 (hi - lo), so no partial sum can overflow, in the same ascending order; the scaling is
// exact, and the mean is clamped to [sorted[lo], sorted[hi-1]], which rounding could otherwise
// leave by an ulp (reference.kept_mean, docs/nonfinite.md). One coordinate, scalar A.
template <typename A>
RA_HD A kept_mean_rescaled(const A* sorted, int64_t lo, int64_t hi) {
  A down = A(1), up = A(1);
  for (int64_t c = 2 * (hi - lo) - 1; c > 0; c >>= 1) {
    down = down * A(0.5);
    up = up * A(2);
  }
  A sum = sorted[lo] * down;
  for (int64_t r = lo + 1; r < hi; ++r) sum = sum + sorted[r] * down;
  const A mean = sum / static_cast<A>(hi - lo) * up;
  return mean < sorted[lo] ? sorted[lo] : (sorted[hi - 1] < mean ? sorted[hi - 1] : mean);
}

// kept_mean of one coordinate whose values were all finite, with the overflow redo.
template <typename A>
RA_HD A kept_mean_finite(const A* sorted, int64_t lo, int64_t hi) {
  const A mean = kept_mean<A>(sorted, lo, hi);
  return is_infinite(mean) ? kept_mean_rescaled(sorted, lo, hi) : mean;
}

RA_HD constexpr int ceil_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Knuth TAOCP vol. 3, 5.3.4 Eq. (7): Batcher's network on N = 2^t wires has
// (t^2 - t + 4) 2^(t-2) - 1 comparators. Dropping the wires >= n only removes steps.
RA_HD constexpr int batcher_network_capacity(int n) {
  int t = 0;
  while ((1 << t) < n) ++t;
  if (t < 2) return t;  // 1 wire: none; 2 wires: one step
  return (t * t - t + 4) * (1 << (t - 2)) - 1;
}

// Batcher's odd-even merge sort (Knuth 5.3.4, Algorithm M) on the next power of two N >= n. Think
// of the wires >= n as holding +Inf: a step (a, b) has a < b, so a step touching such a wire only
// moves +Inf onto the higher wire and leaves wire a as it was; leaving those steps out sorts the
// first n wires.
RA_HD constexpr int batcher_network(int n, CompareExchange* out) {
  const int N = ceil_pow2(n);
  int count = 0;
  for (int p = 1; p < N; p <<= 1) {
    for (int k = p; k >= 1; k >>= 1) {
      for (int j = k % p; j + k < N; j += 2 * k) {
        for (int i = 0; i < k && i + j + k < N; ++i) {
          int a = i + j, b = i + j + k;
          if (a / (2 * p) != b / (2 * p) || b >= n) continue;
          out[count].low = static_cast<uint16_t>(a);
          out[count].high = static_cast<uint16_t>(b);
          ++count;
        }
      }
    }
  }
  return count;
}

// Backward liveness: a step is needed when one of its outputs is needed later, and then both its
// inputs are. Positions lo..hi-1 are needed at the end. For a median most of the network goes.
RA_HD int prune_network(CompareExchange* net, int count, int n, int lo, int hi, unsigned char* live) {
  for (int w = 0; w < n; ++w) live[w] = (w >= lo && w < hi) ? 1 : 0;
  int kept = 0;
  for (int s = count - 1; s >= 0; --s) {
    if (!(live[net[s].low] | live[net[s].high])) continue;
    live[net[s].low] = live[net[s].high] = 1;
    net[count - 1 - kept] = net[s];
    ++kept;
  }
  for (int s = 0; s < kept; ++s) net[s] = net[count - kept + s];
  return kept;
}

// ---- general selection (any n)

template <typename A>
RA_HD void swap_values(A& a, A& b) {
  A t = a;
  a = b;
  b = t;
}

template <typename A>
RA_HD void sift_down(A* v, int64_t root, int64_t count) {
  for (int64_t child = 2 * root + 1; child < count; child = 2 * root + 1) {
    if (child + 1 < count && v[child] < v[child + 1]) ++child;
    if (!(v[root] < v[child])) return;
    swap_values(v[root], v[child]);
    root = child;
  }
}

// Heapsort (Williams 1964): O(m log m) for every input, no recursion, no extra memory.
template <typename A>
RA_HD void heap_sort(A* v, int64_t count) {
  for (int64_t root = count / 2 - 1; root >= 0; --root) sift_down(v, root, count);
  for (int64_t end = count - 1; end > 0; --end) {
    swap_values(v[0], v[end]);
    sift_down(v, 0, end);
  }
}

// Hoare's FIND with a median-of-three pivot and a three-way partition (Dijkstra): values below the
// pivot go left, above go right, the rest (equal, or NaN) stay in the middle, which always holds
// the pivot itself, so every round shrinks the range. A client-chosen worst case cannot make it
// quadratic: after 2 log2(m) rounds the rest of the range is heap-sorted. Afterwards v[nth] holds
// the rank-nth value of v[begin..end), with no larger value before it and no smaller one after.
template <typename A>
RA_HD void select_nth(A* v, int64_t begin, int64_t end, int64_t nth) {
  int rounds_left = 2;
  for (int64_t m = end - begin; m > 1; m >>= 1) rounds_left += 2;
  while (end - begin > 1) {
    if (--rounds_left < 0) {
      heap_sort(v + begin, end - begin);
      return;
    }
    A x = v[begin], y = v[begin + (end - begin) / 2], z = v[end - 1];
    compare_exchange(x, y);
    compare_exchange(y, z);
    compare_exchange(x, y);
    const A pivot = y;
    int64_t below = begin, i = begin, above = end;
    while (i < above) {
      if (v[i] < pivot) {
        swap_values(v[i++], v[below++]);
      } else if (pivot < v[i]) {
        swap_values(v[i], v[--above]);
      } else {
        ++i;
      }
    }
    if (nth < below) {
      end = below;
    } else if (nth >= above) {
      begin = above;
    } else {
      return;
    }
  }
}

// The mean of sorted positions lo..hi-1 of v[0..n): isolate the kept window with two selections,
// sort only the window, then add it up in ascending order like kept_mean (with its overflow redo;
// for a coordinate holding NaN/Inf the result is unspecified anyway).
template <typename A>
RA_HD A order_mean_select(A* v, int64_t n, int64_t lo, int64_t hi) {
  select_nth(v, 0, n, lo);
  if (hi - 1 > lo) {
    select_nth(v, lo + 1, n, hi - 1);
    heap_sort(v + lo + 1, hi - 1 - (lo + 1));
  }
  return kept_mean_finite(v, lo, hi);
}

// ---- Bulyan's coordinate step (El Mhamdi et al. 2018): the mean of the beta values nearest the median
//
// The exact rule: take the beta values with the smallest |x - center| (computed in A and rounded
// once, like the reference), ties in distance to the lower client row. In sorted order the
// distances fall and then rise, so the nearest values form a window grown outwards from the
// middle. Only when the beta-th distance is shared by a value inside and a different value
// outside the window does the client order decide; then nearest_by_index redoes the coordinate
// from its column. Either way the kept values are added in ascending order by kept_mean_finite.

template <typename A>
RA_HD A distance_to(A x, A center) {
  const A gap = x - center;
  return gap < A(0) ? -gap : gap;
}

// The median of sorted[0..n): order_mean's kept mean of the middle one or two values.
template <typename A>
RA_HD A sorted_median(const A* sorted, int64_t n) {
  return kept_mean_finite(sorted, (n - 1) / 2, n / 2 + 1);
}

struct NearestWindow {
  int64_t begin, end;  // the beta nearest values are sorted[begin..end)
  bool tied;           // unless the client order must break a tie (nearest_by_index)
};

// center must lie in [sorted[(n-1)/2], sorted[n/2]] (the median rounded to the storage type
// does), so each side's distances grow outwards from there. 1 <= beta <= n. NaN only makes the
// window meaningless; the loops stay bounded by n.
template <typename A>
RA_HD NearestWindow nearest_window(const A* sorted, int64_t n, int64_t beta, A center) {
  int64_t left = (n - 1) / 2, right = left + 1;  // the next candidate on each side
  for (int64_t taken = 0; taken < beta; ++taken) {
    const bool take_left =
        right >= n || (left >= 0 && !(distance_to(sorted[right], center) < distance_to(sorted[left], center)));
    if (take_left) {
      --left;
    } else {
      ++right;
    }
  }
  const A edge_left = distance_to(sorted[left + 1], center), edge_right = distance_to(sorted[right - 1], center);
  const A farthest = edge_left < edge_right ? edge_right : edge_left;
  const bool tie_left = left >= 0 && distance_to(sorted[left], center) == farthest;
  const bool tie_right = right < n && distance_to(sorted[right], center) == farthest;
  if (!tie_left && !tie_right) return {left + 1, right, false};
  // A tie matters only if the values at the farthest distance differ (distinct values can share a
  // rounded distance; equal values are interchangeable).
  int64_t first = left + 1, last = right;
  while (first > 0 && distance_to(sorted[first - 1], center) == farthest) --first;
  while (last < n && distance_to(sorted[last], center) == farthest) ++last;
  bool seen = false, differ = false;
  A value = A(0);
  for (int64_t x = first; x < last; ++x) {
    if (!(distance_to(sorted[x], center) == farthest)) continue;
    differ = differ || (seen && !(sorted[x] == value));
    value = sorted[x];
    seen = true;
  }
  return {left + 1, right, differ};
}

// The tied case of nearest_window, from the column in client order: every value nearer than the
// window's farthest distance, then the values at that distance from the lowest client rows up, are
// copied to kept (beta slots) and averaged in ascending order. value_of(i) is row i's value.
template <typename A, typename Value>
RA_HD A nearest_by_index(Value value_of, int64_t n, int64_t beta, A center, NearestWindow w, const A* sorted,
                         A* kept) {
  const A edge_left = distance_to(sorted[w.begin], center), edge_right = distance_to(sorted[w.end - 1], center);
  const A farthest = edge_left < edge_right ? edge_right : edge_left;
  int64_t nearer = 0;
  for (int64_t x = w.begin; x < w.end; ++x) nearer += distance_to(sorted[x], center) < farthest;
  int64_t ties_left = beta - nearer, count = 0;
  for (int64_t i = 0; i < n && count < beta; ++i) {
    const A x = value_of(i);
    const A gap = distance_to(x, center);
    const bool at_edge = gap == farthest && ties_left > 0;
    if (gap < farthest || at_edge) kept[count++] = x;
    ties_left -= at_edge;
  }
  if (count < beta) return (farthest - farthest) / (farthest - farthest);  // only NaN gets here: NaN
  heap_sort(kept, count);
  return kept_mean_finite(kept, 0, count);
}

}  // namespace robustagg
