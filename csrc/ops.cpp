// robustagg operator schemas (SPEC §4) and the CPU dispatch.
//
// This is the only file (with csrc/cuda/bindings.cpp) where torch tensors meet raw pointers.
// Every op returns, beside its result, `nonfinite`: bool[n], true for each row of G that holds a
// NaN or Inf, found in the same pass (SPEC §3). robustagg/ops.py turns that into the
// raise / drop / propagate policy; the kernels themselves never raise on non-finite data.
//
// Argument checking for users lives in robustagg/ops.py; the checks here (TORCH_CHECK) guard the
// raw pointers against direct torch.ops.robustagg.* calls.
#include <Python.h>
#include <torch/library.h>

// `import robustagg._C` loads this library, whose static initializers register the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(robustagg, m) {
  // §4.1 sign votes: sums int32[d]
  m.def("sign_sum(Tensor G) -> (Tensor sums, Tensor nonfinite)");
  // §4.2 order statistics: mean of sorted positions lo..hi-1 per coordinate
  m.def("order_mean(Tensor G, int lo, int hi) -> (Tensor out, Tensor nonfinite)");
  // §4.3 fused invariant: mask = |sign_sum| >= min_votes; out = mask ? order_mean(lo, hi) : 0.
  // ops.invariant turns tau/strict into the exact integer vote threshold min_votes.
  m.def("invariant(Tensor G, int lo, int hi, int min_votes) -> (Tensor out, Tensor mask, Tensor nonfinite)");
  // §4.4 fused robust learning rate; weights float[n] in the compute dtype, or None for all-ones.
  m.def("rlr(Tensor G, Tensor? weights, int theta, float server_lr) -> (Tensor out, Tensor nonfinite)");
  // §4.5 client statistics; dot and ref_norm are empty tensors when ref is None.
  m.def("client_stats(Tensor G, int window_start, int window_length, Tensor? ref) -> "
        "(Tensor norm, Tensor sign_frac, Tensor dot, Tensor ref_norm, Tensor nonfinite)");
  // max_norm: float[n] in the compute dtype (ops.clip_rows expands a scalar).
  m.def("clip_rows(Tensor G, Tensor max_norm) -> (Tensor out, Tensor nonfinite)");
  // §4.6 top-k with error feedback. nonfinite is bool[1]: u holds NaN/Inf; then error and momentum
  // are left untouched and the outputs are empty.
  m.def("topk_ef_step(Tensor u, Tensor(a!) error, Tensor(b!) momentum, int k, float rho) -> "
        "(Tensor indices, Tensor values, Tensor nonfinite)");
  m.def("topk_abs(Tensor x, int k) -> (Tensor indices, Tensor values, Tensor nonfinite)");
  // §4.7 max-pool amplification. segments: int64[S, 5] rows of
  // (in_offset, rows, cols, pooled, out_offset); out_width is the output row length.
  m.def("maxpool_amplify(Tensor G, Tensor segments, int kernel, bool restore, int out_width) -> "
        "(Tensor out, Tensor nonfinite)");
  // §4.8 pairwise geometry, [n, n] in the compute dtype.
  m.def("pairwise_sqdist(Tensor G) -> (Tensor out, Tensor nonfinite)");
  m.def("pairwise_cosine(Tensor G) -> (Tensor out, Tensor nonfinite)");
}

// ---- CPU: sign votes, order statistics, invariant, rlr (csrc/cpu/sign_votes.cpp, order_stats.cpp)

// ---- CPU: client_stats, clip_rows (csrc/cpu/client_stats.cpp)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/kernels.h"

namespace robustagg_stats {

// Storage dtypes of SPEC §2; `body` is instantiated once per dtype with scalar_t bound to it.
#define RA_STATS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::ScalarType arithmetic_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// G as a contiguous, non-empty [n, d] matrix of a supported dtype.
at::Tensor matrix_arg(const at::Tensor& G, const char* op) {
  TORCH_CHECK(G.dim() == 2, op, ": G must be 2-D (n, d), got shape ", G.sizes());
  TORCH_CHECK(G.size(0) > 0 && G.size(1) > 0, op, ": G must have n >= 1 rows and d >= 1 columns, got ", G.sizes());
  return G.contiguous();
}

at::Tensor row_flags(const at::Tensor& G) { return at::empty({G.size(0)}, G.options().dtype(at::kBool)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> client_stats(
    const at::Tensor& G_in, int64_t window_start, int64_t window_length, const std::optional<at::Tensor>& ref_in) {
  const at::Tensor G = matrix_arg(G_in, "client_stats");
  const int64_t n = G.size(0), d = G.size(1);
  TORCH_CHECK(window_start >= 0 && window_start < d, "client_stats: window_start=", window_start,
              " is out of range; allowed [0, ", d - 1, "]");
  TORCH_CHECK(window_length >= 1 && window_length <= d - window_start, "client_stats: window_length=",
              window_length, " is out of range; allowed [1, ", d - window_start, "]");
  at::Tensor ref;
  if (ref_in.has_value()) {
    ref = ref_in->contiguous();
    TORCH_CHECK(ref.dim() == 1 && ref.size(0) == d, "client_stats: ref must have shape (", d, ",), got ", ref.sizes());
    TORCH_CHECK(ref.scalar_type() == G.scalar_type(), "client_stats: ref has dtype ", ref.scalar_type(),
                "; it must match G's ", G.scalar_type());
  }
  const bool with_ref = ref.defined();
  const auto acc = G.options().dtype(arithmetic_dtype(G));
  at::Tensor norm = at::empty({n}, acc), frac = at::empty({n, 3}, acc);
  at::Tensor dot = at::empty({with_ref ? n : 0}, acc), ref_norm = at::empty({with_ref ? 1 : 0}, acc);
  at::Tensor bad = row_flags(G);
  RA_STATS_DISPATCH(G.scalar_type(), "client_stats", [&] {
    using A = robustagg::acc_t<scalar_t>;
    robustagg::cpu::client_stats<scalar_t>(G.data_ptr<scalar_t>(), n, d, window_start, window_length,
                                           with_ref ? ref.data_ptr<scalar_t>() : nullptr, norm.data_ptr<A>(),
                                           frac.data_ptr<A>(), with_ref ? dot.data_ptr<A>() : nullptr,
                                           with_ref ? ref_norm.data_ptr<A>() : nullptr, bad.data_ptr<bool>());
  });
  return {norm, frac, dot, ref_norm, bad};
}

std::tuple<at::Tensor, at::Tensor> clip_rows(const at::Tensor& G_in, const at::Tensor& max_norm_in) {
  const at::Tensor G = matrix_arg(G_in, "clip_rows");
  const int64_t n = G.size(0), d = G.size(1);
  TORCH_CHECK(max_norm_in.dim() == 1 && max_norm_in.size(0) == n, "clip_rows: max_norm must have shape (", n,
              ",), one bound per row, got ", max_norm_in.sizes());
  const at::Tensor max_norm = max_norm_in.to(arithmetic_dtype(G)).contiguous();
  at::Tensor out = at::empty_like(G), bad = row_flags(G);
  RA_STATS_DISPATCH(G.scalar_type(), "clip_rows", [&] {
    using A = robustagg::acc_t<scalar_t>;
    robustagg::cpu::clip_rows<scalar_t>(G.data_ptr<scalar_t>(), n, d, max_norm.data_ptr<A>(),
                                        out.data_ptr<scalar_t>(), bad.data_ptr<bool>());
  });
  return {out, bad};
}

}  // namespace robustagg_stats

TORCH_LIBRARY_IMPL(robustagg, CPU, m) {
  m.impl("client_stats", &robustagg_stats::client_stats);
  m.impl("clip_rows", &robustagg_stats::clip_rows);
}

// ---- CPU: topk_ef_step, topk_abs (csrc/cpu/topk.cpp)

// ---- CPU: maxpool_amplify (csrc/cpu/maxpool.cpp)

// ---- CPU: pairwise_sqdist, pairwise_cosine (csrc/cpu/pairwise.cpp)
