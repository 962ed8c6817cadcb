// robustagg operator schemas (docs/ops.md); the kernels are registered by csrc/cpu/bindings.cpp
// and csrc/cuda/bindings.cpp, the only files where torch tensors meet raw pointers.
//
// Every op returns, beside its result, `nonfinite`: bool[n], true for each row of G that holds a
// NaN or Inf, found in the same pass (docs/nonfinite.md). robustagg/ops.py turns that into the
// raise / drop / propagate policy; the kernels themselves never raise on non-finite data.
//
// The coordinate-wise ops take an optional `rows`: int64[m] row numbers of G, 1 <= m <= n. The op
// then computes what it computes on G.index_select(0, rows), without copying G: every count,
// rank and vote threshold refers to the m selected rows, rlr's weights are one per selected row,
// and `nonfinite` is bool[m], in the selection's order.
//
// Argument checking for users lives in robustagg/ops.py; the bindings' checks (TORCH_CHECK) guard
// the raw pointers against direct torch.ops.robustagg.* calls.
#include <Python.h>
#include <torch/library.h>

// `import robustagg._C` loads this library, whose static initializers register the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(robustagg, m) {
  // sign votes: sums int32[d]
  m.def("sign_sum(Tensor G, Tensor? rows=None) -> (Tensor sums, Tensor nonfinite)");
  // order statistics: mean of sorted positions lo..hi-1 per coordinate
  m.def("order_mean(Tensor G, int lo, int hi, Tensor? rows=None) -> (Tensor out, Tensor nonfinite)");
  // fused invariant: mask = |sign_sum| >= min_votes; out = mask ? order_mean(lo, hi) : 0.
  // ops.invariant turns tau/strict into the exact integer vote threshold min_votes.
  m.def("invariant(Tensor G, int lo, int hi, int min_votes, Tensor? rows=None) -> (Tensor out, Tensor mask, Tensor nonfinite)");
  // fused robust learning rate; weights float[n] in the compute dtype, or None for all-ones.
  m.def("rlr(Tensor G, Tensor? weights, int theta, float server_lr, Tensor? rows=None) -> (Tensor out, Tensor nonfinite)");
  // client statistics, float64; dot, ref_norm and ref_dist (||G_i - ref||) are empty
  // tensors when ref is None.
  m.def("client_stats(Tensor G, int window_start, int window_length, Tensor? ref) -> "
        "(Tensor norm, Tensor sign_frac, Tensor dot, Tensor ref_norm, Tensor ref_dist, Tensor nonfinite)");
  // max_norm: float[n] in the compute dtype (ops.clip_rows expands a scalar).
  m.def("clip_rows(Tensor G, Tensor max_norm) -> (Tensor out, Tensor nonfinite)");
  // top-k with error feedback. nonfinite is bool[1]: u holds NaN/Inf; then error and momentum
  // are left untouched and the outputs are empty.
  m.def("topk_ef_step(Tensor u, Tensor(a!) error, Tensor(b!) momentum, int k, float rho) -> "
        "(Tensor indices, Tensor values, Tensor nonfinite)");
  m.def("topk_abs(Tensor x, int k) -> (Tensor indices, Tensor values, Tensor nonfinite)");
  // max-pool amplification. segments: the host table of S segments, five ints each
  // (in_offset, rows, cols, pooled, out_offset); out_width is the output row length.
  m.def("maxpool_amplify(Tensor G, int[] segments, int kernel, bool restore, int out_width) -> "
        "(Tensor out, Tensor nonfinite)");
  // pairwise geometry, [n, n] in float64.
  m.def("pairwise_sqdist(Tensor G) -> (Tensor out, Tensor nonfinite)");
  m.def("pairwise_cosine(Tensor G) -> (Tensor out, Tensor nonfinite)");
  // Bulyan's coordinate step: per coordinate, the mean of the beta values nearest the median.
  m.def("closest_to_median_mean(Tensor G, int beta, Tensor? rows=None) -> (Tensor out, Tensor nonfinite)");
}
