// CUDA dispatch of the robustagg ops (schemas in csrc/ops.cpp): the only CUDA-side file that sees
// torch. Each wrapper checks its tensors, allocates outputs and workspace with the caching
// allocator, dispatches on dtype, launches on the current stream of G's device (csrc/cuda/launch.h)
// and turns a failed CUDA call into an error that names the op.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/launch.h"

// `import robustagg._C_cuda` loads this library, whose static initializers register the kernels.
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace robustagg {
namespace cuda_bindings {

// torch's 16-bit types and CUDA's share their bit layout.
template <typename T> struct device_type { using type = T; };
template <> struct device_type<at::Half> { using type = __half; };
template <> struct device_type<at::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using device_t = typename device_type<T>::type;

template <typename T> device_t<T>* ptr(const at::Tensor& t) {
  return reinterpret_cast<device_t<T>*>(t.data_ptr<T>());
}

// Storage dtypes of docs/backends.md; the body is instantiated once per dtype with scalar_t bound to it.
#define RA_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The current stream of the device the CUDAGuard selected (the one torch's own kernels use).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

using checks::arithmetic_dtype;
using checks::row_flags;
using checks::row_vector_arg;

at::Tensor matrix_arg(const at::Tensor& G, const char* op) { return checks::matrix_arg(G, op, at::kCUDA); }

at::Tensor vector_arg(const at::Tensor& x, const char* op, const char* name) {
  return checks::vector_arg(x, op, name, at::kCUDA);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// Vote counts and thresholds are int in core/sign_votes.h.
void check_rows_fit_int(int64_t n, const char* op) {
  TORCH_CHECK(n < INT_MAX, op, ": n=", n, " rows is too many for the cuda backend; allowed < ", INT_MAX);
}

// The coordinate-wise ops (sign votes, order statistics) read the n rows `rows` selects
// (checks::rows_arg) where they lie in G, or every row when it is undefined (nullptr for the
// launcher); each count, rank, weight vector, flag vector and workspace is sized by that n.
const int64_t* rows_ptr(const at::Tensor& rows) { return rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr; }

// ---- sign votes

std::tuple<at::Tensor, at::Tensor> sign_sum(const at::Tensor& G_in, const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "sign_sum");
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor rows = checks::rows_arg(rows_in, G, "sign_sum");
  const int64_t n = checks::selected_count(rows, G), d = G.size(1);
  check_rows_fit_int(n, "sign_sum");
  at::Tensor sums = at::empty({d}, G.options().dtype(at::kInt)), bad = row_flags(G, rows);
  RA_CUDA_DISPATCH(G.scalar_type(), "sign_sum", [&] {
    check_launch(cuda::sign_sum(ptr<scalar_t>(G), rows_ptr(rows), n, d, sums.data_ptr<int32_t>(),
                                bad.data_ptr<bool>(), current_stream()),
                 "sign_sum");
  });
  return {sums, bad};
}

std::tuple<at::Tensor, at::Tensor> rlr(const at::Tensor& G_in, const std::optional<at::Tensor>& weights_in,
                                       int64_t theta, double server_lr, const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "rlr");
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor rows = checks::rows_arg(rows_in, G, "rlr");
  const int64_t n = checks::selected_count(rows, G), d = G.size(1);
  check_rows_fit_int(n, "rlr");
  checks::check_count(theta, 0, n, "rlr", "theta");
  checks::check_real(server_lr, -checks::arithmetic_max(G), checks::arithmetic_max(G), "rlr", "server_lr");
  at::Tensor weights;
  if (weights_in.has_value()) weights = checks::weights_arg(*weights_in, G, n, "rlr");
  at::Tensor out = at::empty({d}, G.options()), bad = row_flags(G, rows);
  RA_CUDA_DISPATCH(G.scalar_type(), "rlr", [&] {
    using A = acc_t<scalar_t>;
    check_launch(cuda::rlr(ptr<scalar_t>(G), rows_ptr(rows), weights.defined() ? weights.data_ptr<A>() : nullptr, n,
                           d, static_cast<int>(theta), static_cast<A>(server_lr), ptr<scalar_t>(out),
                           bad.data_ptr<bool>(), current_stream()),
                 "rlr");
  });
  return {out, bad};
}

// ---- order statistics

std::tuple<at::Tensor, at::Tensor> order_mean(const at::Tensor& G_in, int64_t lo, int64_t hi,
                                              const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "order_mean");
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor rows = checks::rows_arg(rows_in, G, "order_mean");
  const int64_t n = checks::selected_count(rows, G), d = G.size(1);
  check_rows_fit_int(n, "order_mean");
  checks::check_ranks(lo, hi, n, "order_mean");
  at::Tensor out = at::empty({d}, G.options()), bad = row_flags(G, rows);
  const at::Tensor ws = workspace(cuda::order_stats_workspace_bytes(n, d, at::elementSize(arithmetic_dtype(G))), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "order_mean", [&] {
    check_launch(cuda::order_mean(ptr<scalar_t>(G), rows_ptr(rows), n, d, lo, hi, ptr<scalar_t>(out),
                                  bad.data_ptr<bool>(), ws.data_ptr(), current_stream()),
                 "order_mean");
  });
  return {out, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> invariant(const at::Tensor& G_in, int64_t lo, int64_t hi,
                                                         int64_t min_votes, const std::optional<at::Tensor>& rows_in) {
  const at::Tensor G = matrix_arg(G_in, "invariant");
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor rows = checks::rows_arg(rows_in, G, "invariant");
  const int64_t n = checks::selected_count(rows, G), d = G.size(1);
  check_rows_fit_int(n, "invariant");
  checks::check_ranks(lo, hi, n, "invariant");
  checks::check_count(min_votes, 0, n + 1, "invariant", "min_votes");
  at::Tensor out = at::empty({d}, G.options()), mask = at::empty({d}, G.options().dtype(at::kBool));
  at::Tensor bad = row_flags(G, rows);
  const at::Tensor ws = workspace(cuda::order_stats_workspace_bytes(n, d, at::elementSize(arithmetic_dtype(G))), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "invariant", [&] {
    check_launch(cuda::invariant(ptr<scalar_t>(G), rows_ptr(rows), n, d, lo, hi, static_cast<int>(min_votes),
                                 ptr<scalar_t>(out), mask.data_ptr<bool>(), bad.data_ptr<bool>(), ws.data_ptr(),
                                 current_stream()),
                 "invariant");
  });
  return {out, mask, bad};
}

std::tuple<at::Tensor, at::Tensor> closest_to_median_mean(const at::Tensor& G_in, int64_t beta,
                                                          const std::optional<at::Tensor>& rows_in) {
  constexpr const char* op = "closest_to_median_mean";
  const at::Tensor G = matrix_arg(G_in, op);
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor rows = checks::rows_arg(rows_in, G, op);
  const int64_t n = checks::selected_count(rows, G), d = G.size(1);
  checks::check_count(beta, 1, n, op, "beta");
  at::Tensor out = at::empty({d}, G.options()), bad = row_flags(G, rows);
  const at::Tensor ws = workspace(cuda::closest_workspace_bytes(n, beta, d, at::elementSize(arithmetic_dtype(G))), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "closest_to_median_mean", [&] {
    check_launch(cuda::closest_to_median_mean(ptr<scalar_t>(G), rows_ptr(rows), n, d, beta, ptr<scalar_t>(out),
                                              bad.data_ptr<bool>(), ws.data_ptr(), current_stream()),
                 op);
  });
  return {out, bad};
}

// ---- client statistics: float64 statistics for every input dtype, as on the CPU

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> client_stats(
    const at::Tensor& G_in, int64_t window_start, int64_t window_length, const std::optional<at::Tensor>& ref_in) {
  const at::Tensor G = matrix_arg(G_in, "client_stats");
  const int64_t n = G.size(0), d = G.size(1);
  check_rows_fit_int(n, "client_stats");
  checks::check_window(window_start, window_length, d);
  const c10::cuda::CUDAGuard guard(G.device());
  at::Tensor ref;
  if (ref_in.has_value()) ref = checks::reference_arg(*ref_in, G);
  const bool with_ref = ref.defined();
  const auto f64 = G.options().dtype(at::kDouble);
  at::Tensor norm = at::empty({n}, f64), frac = at::empty({n, 3}, f64);
  at::Tensor dot = at::empty({with_ref ? n : 0}, f64), ref_norm = at::empty({with_ref ? 1 : 0}, f64);
  at::Tensor ref_dist = at::empty({with_ref ? n : 0}, f64);
  at::Tensor bad = row_flags(G);
  const at::Tensor ws = workspace(cuda::client_stats_workspace_bytes(n, d), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "client_stats", [&] {
    check_launch(cuda::client_stats(ptr<scalar_t>(G), n, d, window_start, window_length,
                                    with_ref ? ptr<scalar_t>(ref) : nullptr, norm.data_ptr<double>(),
                                    frac.data_ptr<double>(), with_ref ? dot.data_ptr<double>() : nullptr,
                                    with_ref ? ref_norm.data_ptr<double>() : nullptr,
                                    with_ref ? ref_dist.data_ptr<double>() : nullptr, bad.data_ptr<bool>(),
                                    ws.data_ptr(), current_stream()),
                 "client_stats");
  });
  return {norm, frac, dot, ref_norm, ref_dist, bad};
}

std::tuple<at::Tensor, at::Tensor> clip_rows(const at::Tensor& G_in, const at::Tensor& max_norm_in) {
  const at::Tensor G = matrix_arg(G_in, "clip_rows");
  const int64_t n = G.size(0), d = G.size(1);
  check_rows_fit_int(n, "clip_rows");
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor max_norm = row_vector_arg(max_norm_in, G, n, "clip_rows", "max_norm");
  checks::check_nonnegative(max_norm, "clip_rows", "max_norm");
  at::Tensor out = at::empty_like(G), bad = row_flags(G);
  const at::Tensor ws = workspace(cuda::client_stats_workspace_bytes(n, d), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "clip_rows", [&] {
    using A = acc_t<scalar_t>;
    check_launch(cuda::clip_rows(ptr<scalar_t>(G), n, d, max_norm.data_ptr<A>(), ptr<scalar_t>(out),
                                 bad.data_ptr<bool>(), ws.data_ptr(), current_stream()),
                 "clip_rows");
  });
  return {out, bad};
}

// ---- top-k

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_ef_step(const at::Tensor& u_in, at::Tensor& error,
                                                            at::Tensor& momentum, int64_t k, double rho) {
  const at::Tensor u = vector_arg(u_in, "topk_ef_step", "u");
  const int64_t d = u.size(0);
  checks::check_topk_ef_step(u, error, momentum, k, rho);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor indices, values;
  std::tie(indices, values) = checks::topk_outputs(u, k);
  at::Tensor bad = at::empty({1}, u.options().dtype(at::kBool));
  const at::Tensor ws = workspace(cuda::topk_workspace_bytes(d, at::elementSize(arithmetic_dtype(u))), u);
  bool host_bad = false;
  RA_CUDA_DISPATCH(u.scalar_type(), "topk_ef_step", [&] {
    check_launch(cuda::topk_ef_step(ptr<scalar_t>(u), ptr<scalar_t>(error), ptr<scalar_t>(momentum), d, k, rho,
                                    indices.data_ptr<int64_t>(), ptr<scalar_t>(values),
                                    bad.data_ptr<bool>(), &host_bad, ws.data_ptr(), current_stream()),
                 "topk_ef_step");
  });
  if (host_bad) return {indices.narrow(0, 0, 0), values.narrow(0, 0, 0), bad};
  return {indices, values, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_abs(const at::Tensor& x_in, int64_t k) {
  const at::Tensor x = vector_arg(x_in, "topk_abs", "x");
  const int64_t d = x.size(0);
  checks::check_k(k, "topk_abs");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor indices, values;
  std::tie(indices, values) = checks::topk_outputs(x, k);
  at::Tensor bad = at::empty({1}, x.options().dtype(at::kBool));
  const at::Tensor ws = workspace(cuda::topk_workspace_bytes(d, at::elementSize(arithmetic_dtype(x))), x);
  RA_CUDA_DISPATCH(x.scalar_type(), "topk_abs", [&] {
    check_launch(cuda::topk_abs(ptr<scalar_t>(x), d, k, indices.data_ptr<int64_t>(), ptr<scalar_t>(values),
                                bad.data_ptr<bool>(), ws.data_ptr(), current_stream()),
                 "topk_abs");
  });
  return {indices, values, bad};
}

// ---- max-pool amplification

std::tuple<at::Tensor, at::Tensor> maxpool_amplify(const at::Tensor& G_in, c10::IntArrayRef table, int64_t kernel,
                                                   bool restore, int64_t out_width) {
  const at::Tensor G = matrix_arg(G_in, "maxpool_amplify");
  const int64_t n = G.size(0), d = G.size(1);
  const int64_t S = checks::segment_table(table, d, kernel, restore, out_width);
  const c10::cuda::CUDAGuard guard(G.device());
  // the checked host table's one copy to the device
  const at::Tensor segments = at::tensor(table, at::TensorOptions().dtype(at::kLong)).to(G.device());
  at::Tensor out = at::empty({n, out_width}, G.options()), bad = row_flags(G);
  const at::Tensor ws = workspace(cuda::maxpool_workspace_bytes(S), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "maxpool_amplify", [&] {
    check_launch(cuda::maxpool_amplify(ptr<scalar_t>(G), n, d, segments.data_ptr<int64_t>(), S, kernel, restore,
                                       out_width, ptr<scalar_t>(out), bad.data_ptr<bool>(), ws.data_ptr(),
                                       current_stream()),
                 "maxpool_amplify");
  });
  return {out, bad};
}

// ---- pairwise geometry: float64 [n, n] for every input dtype, as on the CPU

template <bool kCosine>
std::tuple<at::Tensor, at::Tensor> pairwise(const at::Tensor& G_in) {
  const char* op = kCosine ? "pairwise_cosine" : "pairwise_sqdist";
  const at::Tensor G = matrix_arg(G_in, op);
  const int64_t n = G.size(0), d = G.size(1);
  TORCH_CHECK(n <= (int64_t(1) << 20), op, ": n=", n, " rows is too many for an [n, n] result; allowed <= 2^20");
  const c10::cuda::CUDAGuard guard(G.device());
  at::Tensor out = at::empty({n, n}, G.options().dtype(at::kDouble)), bad = row_flags(G);
  const at::Tensor ws = workspace(cuda::pairwise_workspace_bytes(n, d), G);
  RA_CUDA_DISPATCH(G.scalar_type(), "pairwise", [&] {
    const auto stream = current_stream();
    double* result = out.data_ptr<double>();
    const cudaError_t err =
        kCosine ? cuda::pairwise_cosine(ptr<scalar_t>(G), n, d, result, bad.data_ptr<bool>(), ws.data_ptr(), stream)
                : cuda::pairwise_sqdist(ptr<scalar_t>(G), n, d, result, bad.data_ptr<bool>(), ws.data_ptr(), stream);
    check_launch(err, op);
  });
  return {out, bad};
}

}  // namespace cuda_bindings
}  // namespace robustagg

TORCH_LIBRARY_IMPL(robustagg, CUDA, m) {
  namespace b = robustagg::cuda_bindings;
  m.impl("sign_sum", &b::sign_sum);
  m.impl("order_mean", &b::order_mean);
  m.impl("invariant", &b::invariant);
  m.impl("closest_to_median_mean", &b::closest_to_median_mean);
  m.impl("rlr", &b::rlr);
  m.impl("client_stats", &b::client_stats);
  m.impl("clip_rows", &b::clip_rows);
  m.impl("topk_ef_step", &b::topk_ef_step);
  m.impl("topk_abs", &b::topk_abs);
  m.impl("maxpool_amplify", &b::maxpool_amplify);
  m.impl("pairwise_sqdist", &b::pairwise<false>);
  m.impl("pairwise_cosine", &b::pairwise<true>);
}
