// CPU dispatch of the robustagg ops (schemas in csrc/ops.cpp), mirroring csrc/cuda/bindings.cpp:
// each wrapper checks its CPU tensors, allocates the outputs, dispatches on dtype and calls the
// raw-pointer kernels declared in csrc/cpu/kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/kernels.h"

namespace robustagg {
namespace cpu_bindings {

// Storage dtypes of docs/backends.md; the body is instantiated once per dtype with scalar_t bound
// to it, and any other dtype fails with a message naming the op and the dtype.
#define RA_CPU_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

using checks::row_flags;

at::Tensor matrix_arg(const at::Tensor& G, const char* op) { return checks::matrix_arg(G, op, at::kCPU); }

at::Tensor vector_arg(const at::Tensor& x, const char* op, const char* name) {
  return checks::vector_arg(x, op, name, at::kCPU);
}

// ---- sign votes (csrc/cpu/sign_votes.cpp)
//
// The coordinate-wise ops read the rows `rows` selects (checks::rows_arg), n of them, in place.

const int64_t* rows_ptr(const at::Tensor& rows) { return rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> sign_sum(const at::Tensor& G_in, const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "sign_sum"), rows = checks::rows_arg(rows_in, G, "sign_sum");
  at::Tensor sums = at::empty({G.size(1)}, G.options().dtype(at::kInt)), bad = row_flags(G, rows);
  RA_CPU_DISPATCH(G.scalar_type(), "sign_sum", [&] {
    cpu::sign_sum<scalar_t>(G.const_data_ptr<scalar_t>(), rows_ptr(rows), bad.size(0), G.size(1),
                            sums.mutable_data_ptr<int32_t>(), bad.mutable_data_ptr<bool>());
  });
  return {sums, bad};
}

std::tuple<at::Tensor, at::Tensor> rlr(const at::Tensor& G_in, const std::optional<at::Tensor>& weights_in,
                                       int64_t theta, double server_lr, const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "rlr"), rows = checks::rows_arg(rows_in, G, "rlr");
  at::Tensor out = at::empty({G.size(1)}, G.options()), bad = row_flags(G, rows);
  const int64_t n = bad.size(0);
  checks::check_count(theta, 0, n, "rlr", "theta");
  checks::check_real(server_lr, -checks::arithmetic_max(G), checks::arithmetic_max(G), "rlr", "server_lr");
  at::Tensor weights;
  if (weights_in.has_value()) weights = checks::weights_arg(*weights_in, G, n, "rlr");
  RA_CPU_DISPATCH(G.scalar_type(), "rlr", [&] {
    using A = acc_t<scalar_t>;
    cpu::rlr<scalar_t>(G.const_data_ptr<scalar_t>(), rows_ptr(rows), n, G.size(1),
                       weights.defined() ? weights.const_data_ptr<A>() : nullptr, theta, server_lr,
                       out.mutable_data_ptr<scalar_t>(), bad.mutable_data_ptr<bool>());
  });
  return {out, bad};
}

// ---- order statistics (csrc/cpu/order_stats.cpp)

std::tuple<at::Tensor, at::Tensor> order_mean(const at::Tensor& G_in, int64_t lo, int64_t hi,
                                              const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "order_mean"), rows = checks::rows_arg(rows_in, G, "order_mean");
  at::Tensor out = at::empty({G.size(1)}, G.options()), bad = row_flags(G, rows);
  checks::check_ranks(lo, hi, bad.size(0), "order_mean");
  RA_CPU_DISPATCH(G.scalar_type(), "order_mean", [&] {
    cpu::order_mean<scalar_t>(G.const_data_ptr<scalar_t>(), rows_ptr(rows), bad.size(0), G.size(1), lo, hi,
                              out.mutable_data_ptr<scalar_t>(), bad.mutable_data_ptr<bool>());
  });
  return {out, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> invariant(const at::Tensor& G_in, int64_t lo, int64_t hi,
                                                         int64_t min_votes, const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "invariant"), rows = checks::rows_arg(rows_in, G, "invariant");
  at::Tensor out = at::empty({G.size(1)}, G.options()), bad = row_flags(G, rows);
  at::Tensor mask = at::empty({G.size(1)}, G.options().dtype(at::kBool));
  const int64_t n = bad.size(0);
  checks::check_ranks(lo, hi, n, "invariant");
  checks::check_count(min_votes, 0, n + 1, "invariant", "min_votes");
  RA_CPU_DISPATCH(G.scalar_type(), "invariant", [&] {
    cpu::invariant<scalar_t>(G.const_data_ptr<scalar_t>(), rows_ptr(rows), n, G.size(1), lo, hi, min_votes,
                             out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(),
                             bad.mutable_data_ptr<bool>());
  });
  return {out, mask, bad};
}

std::tuple<at::Tensor, at::Tensor> closest_to_median_mean(const at::Tensor& G_in, int64_t beta,
                                                          const std::optional<at::Tensor>& rows_in) {
  constexpr const char* op = "closest_to_median_mean";
  const at::Tensor G = matrix_arg(G_in, op), rows = checks::rows_arg(rows_in, G, op);
  at::Tensor out = at::empty({G.size(1)}, G.options()), bad = row_flags(G, rows);
  checks::check_count(beta, 1, bad.size(0), op, "beta");
  RA_CPU_DISPATCH(G.scalar_type(), "closest_to_median_mean", [&] {
    cpu::closest_to_median_mean<scalar_t>(G.const_data_ptr<scalar_t>(), rows_ptr(rows), bad.size(0), G.size(1),
                                          beta, out.mutable_data_ptr<scalar_t>(), bad.mutable_data_ptr<bool>());
  });
  return {out, bad};
}

// ---- client statistics (csrc/cpu/client_stats.cpp)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> client_stats(
    const at::Tensor& G_in, int64_t window_start, int64_t window_length, const std::optional<at::Tensor>& ref_in) {
  const at::Tensor G = matrix_arg(G_in, "client_stats");
  const int64_t n = G.size(0), d = G.size(1);
  checks::check_window(window_start, window_length, d);
  at::Tensor ref;
  if (ref_in.has_value()) ref = checks::reference_arg(*ref_in, G);
  const bool with_ref = ref.defined();
  const auto f64 = G.options().dtype(at::kDouble);
  at::Tensor norm = at::empty({n}, f64), frac = at::empty({n, 3}, f64);
  at::Tensor dot = at::empty({with_ref ? n : 0}, f64), ref_norm = at::empty({with_ref ? 1 : 0}, f64);
  at::Tensor ref_dist = at::empty({with_ref ? n : 0}, f64);
  at::Tensor bad = row_flags(G);
  RA_CPU_DISPATCH(G.scalar_type(), "client_stats", [&] {
    cpu::client_stats<scalar_t>(G.data_ptr<scalar_t>(), n, d, window_start, window_length,
                                with_ref ? ref.data_ptr<scalar_t>() : nullptr, norm.data_ptr<double>(),
                                frac.data_ptr<double>(), with_ref ? dot.data_ptr<double>() : nullptr,
                                with_ref ? ref_norm.data_ptr<double>() : nullptr,
                                with_ref ? ref_dist.data_ptr<double>() : nullptr, bad.data_ptr<bool>());
  });
  return {norm, frac, dot, ref_norm, ref_dist, bad};
}

std::tuple<at::Tensor, at::Tensor> clip_rows(const at::Tensor& G_in, const at::Tensor& max_norm_in) {
  const at::Tensor G = matrix_arg(G_in, "clip_rows");
  const at::Tensor max_norm = checks::row_vector_arg(max_norm_in, G, G.size(0), "clip_rows", "max_norm");
  checks::check_nonnegative(max_norm, "clip_rows", "max_norm");
  at::Tensor out = at::empty_like(G), bad = row_flags(G);
  RA_CPU_DISPATCH(G.scalar_type(), "clip_rows", [&] {
    using A = acc_t<scalar_t>;
    cpu::clip_rows<scalar_t>(G.data_ptr<scalar_t>(), G.size(0), G.size(1), max_norm.data_ptr<A>(),
                             out.data_ptr<scalar_t>(), bad.data_ptr<bool>());
  });
  return {out, bad};
}

// ---- top-k (csrc/cpu/topk.cpp)

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_ef_step(const at::Tensor& u_in, at::Tensor& error,
                                                            at::Tensor& momentum, int64_t k, double rho) {
  const at::Tensor u = vector_arg(u_in, "topk_ef_step", "u");
  const int64_t d = u.size(0);
  checks::check_topk_ef_step(u, error, momentum, k, rho);
  at::Tensor indices, values;
  std::tie(indices, values) = checks::topk_outputs(u, k);
  bool finite = true;
  RA_CPU_DISPATCH(u.scalar_type(), "topk_ef_step", [&] {
    finite = cpu::topk_ef_step<scalar_t>(u.data_ptr<scalar_t>(), error.data_ptr<scalar_t>(),
                                         momentum.data_ptr<scalar_t>(), d, k, rho, indices.data_ptr<int64_t>(),
                                         values.data_ptr<scalar_t>());
  });
  at::Tensor bad = at::full({1}, !finite, u.options().dtype(at::kBool));
  if (!finite) return {indices.narrow(0, 0, 0), values.narrow(0, 0, 0), bad};
  return {indices, values, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_abs(const at::Tensor& x_in, int64_t k) {
  const at::Tensor x = vector_arg(x_in, "topk_abs", "x");
  const int64_t d = x.size(0);
  checks::check_k(k, "topk_abs");
  at::Tensor indices, values;
  std::tie(indices, values) = checks::topk_outputs(x, k);
  bool finite = true;
  RA_CPU_DISPATCH(x.scalar_type(), "topk_abs", [&] {
    finite = cpu::topk_abs<scalar_t>(x.data_ptr<scalar_t>(), d, k, indices.data_ptr<int64_t>(),
                                     values.data_ptr<scalar_t>());
  });
  return {indices, values, at::full({1}, !finite, x.options().dtype(at::kBool))};
}

// ---- max-pool amplification (csrc/cpu/maxpool.cpp)

std::tuple<at::Tensor, at::Tensor> maxpool_amplify(const at::Tensor& G_in, c10::IntArrayRef segments, int64_t kernel,
                                                   bool restore, int64_t out_width) {
  const at::Tensor G = matrix_arg(G_in, "maxpool_amplify");
  const int64_t n = G.size(0), d = G.size(1);
  const int64_t count = checks::segment_table(segments, d, kernel, restore, out_width);
  at::Tensor out = at::empty({n, out_width}, G.options()), bad = row_flags(G);
  RA_CPU_DISPATCH(G.scalar_type(), "maxpool_amplify", [&] {
    cpu::maxpool_amplify<scalar_t>(G.data_ptr<scalar_t>(), n, d, segments.data(), count, kernel, restore, out_width,
                                   out.data_ptr<scalar_t>(), bad.data_ptr<bool>());
  });
  return {out, bad};
}

// ---- pairwise geometry (csrc/cpu/pairwise.cpp)

std::tuple<at::Tensor, at::Tensor> pairwise(const at::Tensor& G_in, bool cosine, const char* op) {
  const at::Tensor G = matrix_arg(G_in, op);
  const int64_t n = G.size(0);
  at::Tensor out = at::empty({n, n}, G.options().dtype(at::kDouble)), bad = row_flags(G);
  RA_CPU_DISPATCH(G.scalar_type(), "pairwise", [&] {
    cpu::pairwise<scalar_t>(G.data_ptr<scalar_t>(), n, G.size(1), cosine, out.data_ptr<double>(),
                            bad.data_ptr<bool>());
  });
  return {out, bad};
}

std::tuple<at::Tensor, at::Tensor> pairwise_sqdist(const at::Tensor& G) { return pairwise(G, false, "pairwise_sqdist"); }
std::tuple<at::Tensor, at::Tensor> pairwise_cosine(const at::Tensor& G) { return pairwise(G, true, "pairwise_cosine"); }

}  // namespace cpu_bindings
}  // namespace robustagg

TORCH_LIBRARY_IMPL(robustagg, CPU, m) {
  namespace b = robustagg::cpu_bindings;
  m.impl("sign_sum", &b::sign_sum);
  m.impl("rlr", &b::rlr);
  m.impl("order_mean", &b::order_mean);
  m.impl("invariant", &b::invariant);
  m.impl("closest_to_median_mean", &b::closest_to_median_mean);
  m.impl("client_stats", &b::client_stats);
  m.impl("clip_rows", &b::clip_rows);
  m.impl("topk_ef_step", &b::topk_ef_step);
  m.impl("topk_abs", &b::topk_abs);
  m.impl("maxpool_amplify", &b::maxpool_amplify);
  m.impl("pairwise_sqdist", &b::pairwise_sqdist);
  m.impl("pairwise_cosine", &b::pairwise_cosine);
}
