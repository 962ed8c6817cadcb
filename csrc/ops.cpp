// robustagg operator schemas (docs/ops.md) and the CPU dispatch.
//
// This is the only file (with csrc/cuda/bindings.cpp) where torch tensors meet raw pointers.
// Every op returns, beside its result, `nonfinite`: bool[n], true for each row of G that holds a
// NaN or Inf, found in the same pass (docs/nonfinite.md). robustagg/ops.py turns that into the
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
  // sign votes: sums int32[d]
  m.def("sign_sum(Tensor G) -> (Tensor sums, Tensor nonfinite)");
  // order statistics: mean of sorted positions lo..hi-1 per coordinate
  m.def("order_mean(Tensor G, int lo, int hi) -> (Tensor out, Tensor nonfinite)");
  // fused invariant: mask = |sign_sum| >= min_votes; out = mask ? order_mean(lo, hi) : 0.
  // ops.invariant turns tau/strict into the exact integer vote threshold min_votes.
  m.def("invariant(Tensor G, int lo, int hi, int min_votes) -> (Tensor out, Tensor mask, Tensor nonfinite)");
  // fused robust learning rate; weights float[n] in the compute dtype, or None for all-ones.
  m.def("rlr(Tensor G, Tensor? weights, int theta, float server_lr) -> (Tensor out, Tensor nonfinite)");
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
  // max-pool amplification. segments: int64[S, 5] rows of
  // (in_offset, rows, cols, pooled, out_offset); out_width is the output row length.
  m.def("maxpool_amplify(Tensor G, Tensor segments, int kernel, bool restore, int out_width) -> "
        "(Tensor out, Tensor nonfinite)");
  // pairwise geometry, [n, n] in float64.
  m.def("pairwise_sqdist(Tensor G) -> (Tensor out, Tensor nonfinite)");
  m.def("pairwise_cosine(Tensor G) -> (Tensor out, Tensor nonfinite)");
}

// ---- CPU: sign votes, order statistics, invariant, rlr (csrc/cpu/sign_votes.cpp, order_stats.cpp)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "checks.h"
#include "core/common.h"

// The CPU registrations below take CPU tensors; the checks are shared with the CUDA ones.
namespace checks = robustagg::checks;
inline at::Tensor cpu_matrix(const at::Tensor& G, const char* op) { return checks::matrix_arg(G, op, at::kCPU); }
inline at::Tensor cpu_vector(const at::Tensor& x, const char* op, const char* name) {
  return checks::vector_arg(x, op, name, at::kCPU);
}

namespace robustagg::cpu {
template <typename T> void sign_sum(const T* G, int64_t n, int64_t d, int32_t* sums, bool* nonfinite);
template <typename T> void rlr(const T* G, int64_t n, int64_t d, const acc_t<T>* weights, int64_t theta,
                               double server_lr, T* out, bool* nonfinite);
template <typename T> void order_mean(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out,
                                      bool* nonfinite);
template <typename T> void invariant(const T* G, int64_t n, int64_t d, int64_t lo, int64_t hi, int64_t min_votes,
                                     T* out, bool* mask, bool* nonfinite);
}  // namespace robustagg::cpu

namespace votes_cpu {

std::tuple<at::Tensor, at::Tensor> sign_sum_cpu(const at::Tensor& G) {
  const at::Tensor X = cpu_matrix(G, "sign_sum");
  at::Tensor sums = at::empty({X.size(1)}, X.options().dtype(at::kInt));
  at::Tensor nonfinite = checks::row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "sign_sum", [&] {
    robustagg::cpu::sign_sum<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1),
                                       sums.mutable_data_ptr<int32_t>(), nonfinite.mutable_data_ptr<bool>());
  });
  return {sums, nonfinite};
}

std::tuple<at::Tensor, at::Tensor> order_mean_cpu(const at::Tensor& G, int64_t lo, int64_t hi) {
  const at::Tensor X = cpu_matrix(G, "order_mean");
  checks::check_ranks(lo, hi, X.size(0), "order_mean");
  at::Tensor out = at::empty({X.size(1)}, X.options());
  at::Tensor nonfinite = checks::row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "order_mean", [&] {
    robustagg::cpu::order_mean<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1), lo, hi,
                                         out.mutable_data_ptr<scalar_t>(), nonfinite.mutable_data_ptr<bool>());
  });
  return {out, nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> invariant_cpu(const at::Tensor& G, int64_t lo, int64_t hi,
                                                             int64_t min_votes) {
  const at::Tensor X = cpu_matrix(G, "invariant");
  checks::check_ranks(lo, hi, X.size(0), "invariant");
  checks::check_count(min_votes, 0, X.size(0) + 1, "invariant", "min_votes");
  at::Tensor out = at::empty({X.size(1)}, X.options());
  at::Tensor mask = at::empty({X.size(1)}, X.options().dtype(at::kBool));
  at::Tensor nonfinite = checks::row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "invariant", [&] {
    robustagg::cpu::invariant<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1), lo, hi, min_votes,
                                        out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(),
                                        nonfinite.mutable_data_ptr<bool>());
  });
  return {out, mask, nonfinite};
}

std::tuple<at::Tensor, at::Tensor> rlr_cpu(const at::Tensor& G, const std::optional<at::Tensor>& weights,
                                           int64_t theta, double server_lr) {
  const at::Tensor X = cpu_matrix(G, "rlr");
  checks::check_count(theta, 0, X.size(0), "rlr", "theta");
  checks::check_real(server_lr, -checks::arithmetic_max(X), checks::arithmetic_max(X), "rlr", "server_lr");
  at::Tensor w;
  if (weights.has_value()) w = checks::weights_arg(*weights, X, "rlr");
  at::Tensor out = at::empty({X.size(1)}, X.options());
  at::Tensor nonfinite = checks::row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "rlr", [&] {
    using A = robustagg::acc_t<scalar_t>;
    robustagg::cpu::rlr<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1),
                                  w.defined() ? w.const_data_ptr<A>() : nullptr, theta, server_lr,
                                  out.mutable_data_ptr<scalar_t>(), nonfinite.mutable_data_ptr<bool>());
  });
  return {out, nonfinite};
}

}  // namespace votes_cpu

TORCH_LIBRARY_IMPL(robustagg, CPU, m) {
  m.impl("sign_sum", &votes_cpu::sign_sum_cpu);
  m.impl("order_mean", &votes_cpu::order_mean_cpu);
  m.impl("invariant", &votes_cpu::invariant_cpu);
  m.impl("rlr", &votes_cpu::rlr_cpu);
}

// ---- CPU: client_stats, clip_rows (csrc/cpu/client_stats.cpp)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/kernels.h"

namespace robustagg_stats {

// The storage dtypes of docs/backends.md: the lambda is instantiated once per dtype, with scalar_t bound to
// it; any other dtype fails with a message naming the op and the dtype.
#define RA_STATS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> client_stats(
    const at::Tensor& G_in, int64_t window_start, int64_t window_length, const std::optional<at::Tensor>& ref_in) {
  const at::Tensor G = cpu_matrix(G_in, "client_stats");
  const int64_t n = G.size(0), d = G.size(1);
  checks::check_window(window_start, window_length, d);
  at::Tensor ref;
  if (ref_in.has_value()) ref = checks::reference_arg(*ref_in, G);
  const bool with_ref = ref.defined();
  const auto f64 = G.options().dtype(at::kDouble);
  at::Tensor norm = at::empty({n}, f64), frac = at::empty({n, 3}, f64);
  at::Tensor dot = at::empty({with_ref ? n : 0}, f64), ref_norm = at::empty({with_ref ? 1 : 0}, f64);
  at::Tensor ref_dist = at::empty({with_ref ? n : 0}, f64);
  at::Tensor bad = checks::row_flags(G);
  RA_STATS_DISPATCH(G.scalar_type(), "client_stats", [&] {
    robustagg::cpu::client_stats<scalar_t>(G.data_ptr<scalar_t>(), n, d, window_start, window_length,
                                           with_ref ? ref.data_ptr<scalar_t>() : nullptr, norm.data_ptr<double>(),
                                           frac.data_ptr<double>(), with_ref ? dot.data_ptr<double>() : nullptr,
                                           with_ref ? ref_norm.data_ptr<double>() : nullptr,
                                           with_ref ? ref_dist.data_ptr<double>() : nullptr, bad.data_ptr<bool>());
  });
  return {norm, frac, dot, ref_norm, ref_dist, bad};
}

std::tuple<at::Tensor, at::Tensor> clip_rows(const at::Tensor& G_in, const at::Tensor& max_norm_in) {
  const at::Tensor G = cpu_matrix(G_in, "clip_rows");
  const int64_t n = G.size(0), d = G.size(1);
  const at::Tensor max_norm = checks::row_vector_arg(max_norm_in, G, "clip_rows", "max_norm");
  checks::check_nonnegative(max_norm, "clip_rows", "max_norm");
  at::Tensor out = at::empty_like(G), bad = checks::row_flags(G);
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
namespace robustagg_topk {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_ef_step(const at::Tensor& u_in, at::Tensor& error,
                                                            at::Tensor& momentum, int64_t k, double rho) {
  const at::Tensor u = cpu_vector(u_in, "topk_ef_step", "u");
  const int64_t d = u.size(0);
  checks::check_k(k, "topk_ef_step");
  checks::check_real(rho, 0.0, checks::arithmetic_max(u), "topk_ef_step", "rho");
  checks::check_topk_state(u, error, momentum);
  const int64_t kk = std::min(k, d);
  at::Tensor indices = at::empty({kk}, u.options().dtype(at::kLong)), values = at::empty({kk}, u.options());
  bool finite = true;
  RA_STATS_DISPATCH(u.scalar_type(), "topk_ef_step", [&] {
    finite = robustagg::cpu::topk_ef_step<scalar_t>(u.data_ptr<scalar_t>(), error.data_ptr<scalar_t>(),
                                                    momentum.data_ptr<scalar_t>(), d, k, rho,
                                                    indices.data_ptr<int64_t>(), values.data_ptr<scalar_t>());
  });
  at::Tensor bad = at::full({1}, !finite, u.options().dtype(at::kBool));
  if (!finite) return {indices.narrow(0, 0, 0), values.narrow(0, 0, 0), bad};
  return {indices, values, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_abs(const at::Tensor& x_in, int64_t k) {
  const at::Tensor x = cpu_vector(x_in, "topk_abs", "x");
  const int64_t d = x.size(0);
  checks::check_k(k, "topk_abs");
  const int64_t kk = std::min(k, d);
  at::Tensor indices = at::empty({kk}, x.options().dtype(at::kLong)), values = at::empty({kk}, x.options());
  bool finite = true;
  RA_STATS_DISPATCH(x.scalar_type(), "topk_abs", [&] {
    finite = robustagg::cpu::topk_abs<scalar_t>(x.data_ptr<scalar_t>(), d, k, indices.data_ptr<int64_t>(),
                                                values.data_ptr<scalar_t>());
  });
  return {indices, values, at::full({1}, !finite, x.options().dtype(at::kBool))};
}

}  // namespace robustagg_topk

TORCH_LIBRARY_IMPL(robustagg, CPU, m) {
  m.impl("topk_ef_step", &robustagg_topk::topk_ef_step);
  m.impl("topk_abs", &robustagg_topk::topk_abs);
}

// ---- CPU: maxpool_amplify (csrc/cpu/maxpool.cpp)
namespace robustagg_maxpool {

std::tuple<at::Tensor, at::Tensor> maxpool_amplify(const at::Tensor& G_in, const at::Tensor& segments_in,
                                                   int64_t kernel, bool restore, int64_t out_width) {
  const at::Tensor G = cpu_matrix(G_in, "maxpool_amplify");
  const int64_t n = G.size(0), d = G.size(1);
  const at::Tensor table = checks::segment_table(segments_in, d, kernel, restore, out_width);
  at::Tensor out = at::empty({n, out_width}, G.options()), bad = checks::row_flags(G);
  RA_STATS_DISPATCH(G.scalar_type(), "maxpool_amplify", [&] {
    robustagg::cpu::maxpool_amplify<scalar_t>(G.data_ptr<scalar_t>(), n, d, table.data_ptr<int64_t>(),
                                              table.size(0), kernel, restore, out_width, out.data_ptr<scalar_t>(),
                                              bad.data_ptr<bool>());
  });
  return {out, bad};
}

}  // namespace robustagg_maxpool

TORCH_LIBRARY_IMPL(robustagg, CPU, m) { m.impl("maxpool_amplify", &robustagg_maxpool::maxpool_amplify); }

// ---- CPU: pairwise_sqdist, pairwise_cosine (csrc/cpu/pairwise.cpp)
namespace robustagg_pairwise {

std::tuple<at::Tensor, at::Tensor> pairwise(const at::Tensor& G_in, bool cosine, const char* op) {
  const at::Tensor G = cpu_matrix(G_in, op);
  const int64_t n = G.size(0), d = G.size(1);
  at::Tensor out = at::empty({n, n}, G.options().dtype(at::kDouble));
  at::Tensor bad = checks::row_flags(G);
  RA_STATS_DISPATCH(G.scalar_type(), "pairwise", [&] {
    robustagg::cpu::pairwise<scalar_t>(G.data_ptr<scalar_t>(), n, d, cosine, out.data_ptr<double>(),
                                       bad.data_ptr<bool>());
  });
  return {out, bad};
}

std::tuple<at::Tensor, at::Tensor> pairwise_sqdist(const at::Tensor& G) { return pairwise(G, false, "pairwise_sqdist"); }
std::tuple<at::Tensor, at::Tensor> pairwise_cosine(const at::Tensor& G) { return pairwise(G, true, "pairwise_cosine"); }

}  // namespace robustagg_pairwise

TORCH_LIBRARY_IMPL(robustagg, CPU, m) {
  m.impl("pairwise_sqdist", &robustagg_pairwise::pairwise_sqdist);
  m.impl("pairwise_cosine", &robustagg_pairwise::pairwise_cosine);
}
