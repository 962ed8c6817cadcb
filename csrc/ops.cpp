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

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "core/common.h"

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

// G as the kernels read it: a 2-D CPU float tensor with at least one row and column, contiguous.
at::Tensor votes_input(const at::Tensor& G, const char* op) {
  TORCH_CHECK(G.device().is_cpu(), op, ": G must be a CPU tensor, got ", G.device());
  TORCH_CHECK(G.dim() == 2, op, ": G must be 2-D (n, d), got shape ", G.sizes());
  TORCH_CHECK(G.size(0) >= 1 && G.size(1) >= 1, op, ": G must have n >= 1 rows and d >= 1 columns, got shape ",
              G.sizes());
  const auto t = G.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op,
              ": G has dtype ", t, "; supported dtypes are float16, bfloat16, float32, float64");
  return G.contiguous();
}

void check_ranks(const char* op, int64_t n, int64_t lo, int64_t hi) {
  TORCH_CHECK(0 <= lo && lo < hi && hi <= n, op, ": need 0 <= lo < hi <= n, got lo=", lo, " hi=", hi, " n=", n);
}

at::Tensor row_flags(const at::Tensor& X) {
  return at::empty({X.size(0)}, X.options().dtype(at::kBool));
}

std::tuple<at::Tensor, at::Tensor> sign_sum_cpu(const at::Tensor& G) {
  const at::Tensor X = votes_input(G, "sign_sum");
  at::Tensor sums = at::empty({X.size(1)}, X.options().dtype(at::kInt));
  at::Tensor nonfinite = row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "sign_sum", [&] {
    robustagg::cpu::sign_sum<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1),
                                       sums.mutable_data_ptr<int32_t>(), nonfinite.mutable_data_ptr<bool>());
  });
  return {sums, nonfinite};
}

std::tuple<at::Tensor, at::Tensor> order_mean_cpu(const at::Tensor& G, int64_t lo, int64_t hi) {
  const at::Tensor X = votes_input(G, "order_mean");
  check_ranks("order_mean", X.size(0), lo, hi);
  at::Tensor out = at::empty({X.size(1)}, X.options());
  at::Tensor nonfinite = row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "order_mean", [&] {
    robustagg::cpu::order_mean<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1), lo, hi,
                                         out.mutable_data_ptr<scalar_t>(), nonfinite.mutable_data_ptr<bool>());
  });
  return {out, nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> invariant_cpu(const at::Tensor& G, int64_t lo, int64_t hi,
                                                             int64_t min_votes) {
  const at::Tensor X = votes_input(G, "invariant");
  check_ranks("invariant", X.size(0), lo, hi);
  TORCH_CHECK(0 <= min_votes && min_votes <= X.size(0) + 1, "invariant: need 0 <= min_votes <= n + 1, got min_votes=",
              min_votes, " n=", X.size(0));
  at::Tensor out = at::empty({X.size(1)}, X.options());
  at::Tensor mask = at::empty({X.size(1)}, X.options().dtype(at::kBool));
  at::Tensor nonfinite = row_flags(X);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "invariant", [&] {
    robustagg::cpu::invariant<scalar_t>(X.const_data_ptr<scalar_t>(), X.size(0), X.size(1), lo, hi, min_votes,
                                        out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(),
                                        nonfinite.mutable_data_ptr<bool>());
  });
  return {out, mask, nonfinite};
}

std::tuple<at::Tensor, at::Tensor> rlr_cpu(const at::Tensor& G, const std::optional<at::Tensor>& weights,
                                           int64_t theta, double server_lr) {
  const at::Tensor X = votes_input(G, "rlr");
  const auto acc = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w;
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == X.size(0), "rlr: weights must have shape (",
                X.size(0), ",), got ", weights->sizes());
    TORCH_CHECK(weights->device().is_cpu(), "rlr: weights must be a CPU tensor, got ", weights->device());
    w = weights->to(acc).contiguous();
  }
  at::Tensor out = at::empty({X.size(1)}, X.options());
  at::Tensor nonfinite = row_flags(X);
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

// The storage dtypes of SPEC §2: the lambda is instantiated once per dtype, with scalar_t bound to
// it; any other dtype fails with a message naming the op and the dtype.
#define RA_STATS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::ScalarType arithmetic_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// G as a contiguous, non-empty [n, d] matrix (the dtype is checked by the dispatch).
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
namespace robustagg_topk {

at::Tensor vector_arg(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) > 0, op, ": ", name, " must be 1-D with at least 1 element, got shape ",
              x.sizes());
  return x.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_ef_step(const at::Tensor& u_in, at::Tensor& error,
                                                            at::Tensor& momentum, int64_t k, double rho) {
  const at::Tensor u = vector_arg(u_in, "topk_ef_step", "u");
  const int64_t d = u.size(0);
  TORCH_CHECK(k >= 0, "topk_ef_step: k=", k, " is out of range; allowed >= 0");
  for (const at::Tensor* t : {&error, &momentum}) {
    TORCH_CHECK(t->sizes() == u.sizes() && t->scalar_type() == u.scalar_type(), "topk_ef_step: error and momentum ",
                "must match u's shape ", u.sizes(), " and dtype ", u.scalar_type(), ", got ", t->sizes(), " ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "topk_ef_step: error and momentum are updated in place and must be contiguous");
  }
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
  const at::Tensor x = vector_arg(x_in, "topk_abs", "x");
  const int64_t d = x.size(0);
  TORCH_CHECK(k >= 0, "topk_abs: k=", k, " is out of range; allowed >= 0");
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

// The segment table must describe values inside a row of G and outputs inside a row of the result.
void check_segments(const at::Tensor& table, int64_t d, int64_t kernel, bool restore, int64_t out_width) {
  const int64_t S = table.size(0);
  const int64_t* t = table.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t off = t[5 * s], rows = t[5 * s + 1], cols = t[5 * s + 2], out = t[5 * s + 4];
    const bool pooled = t[5 * s + 3] != 0;
    TORCH_CHECK(off >= 0 && rows >= 0 && cols >= 0 && rows * cols <= d - off, "maxpool_amplify: segment ", s,
                " (offset ", off, ", rows ", rows, ", cols ", cols, ") does not fit in d=", d);
    const int64_t produced = restore ? rows * cols : (pooled ? (rows / kernel) * (cols / kernel) : rows * cols);
    TORCH_CHECK(out >= 0 && produced <= out_width - out, "maxpool_amplify: segment ", s, " writes ", produced,
                " values at output offset ", out, ", past out_width=", out_width);
    TORCH_CHECK(!restore || out == off, "maxpool_amplify: with restore=True segment ", s,
                " must write where it reads (out_offset ", out, " != in_offset ", off, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> maxpool_amplify(const at::Tensor& G_in, const at::Tensor& segments_in,
                                                   int64_t kernel, bool restore, int64_t out_width) {
  const at::Tensor G = robustagg_stats::matrix_arg(G_in, "maxpool_amplify");
  const int64_t n = G.size(0), d = G.size(1);
  TORCH_CHECK(kernel >= 1, "maxpool_amplify: kernel=", kernel, " is out of range; allowed >= 1");
  TORCH_CHECK(segments_in.dim() == 2 && segments_in.size(1) == 5 && segments_in.scalar_type() == at::kLong,
              "maxpool_amplify: segments must be int64[S, 5], got ", segments_in.scalar_type(), " ", segments_in.sizes());
  TORCH_CHECK(restore ? out_width == d : out_width >= 0, "maxpool_amplify: out_width=", out_width,
              restore ? " must equal d with restore=True" : " must be >= 0");
  const at::Tensor table = segments_in.to(at::kCPU).contiguous();
  check_segments(table, d, kernel, restore, out_width);
  at::Tensor out = at::empty({n, out_width}, G.options()), bad = robustagg_stats::row_flags(G);
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
  const at::Tensor G = robustagg_stats::matrix_arg(G_in, op);
  const int64_t n = G.size(0), d = G.size(1);
  at::Tensor out = at::empty({n, n}, G.options().dtype(robustagg_stats::arithmetic_dtype(G)));
  at::Tensor bad = robustagg_stats::row_flags(G);
  RA_STATS_DISPATCH(G.scalar_type(), "pairwise", [&] {
    robustagg::cpu::pairwise<scalar_t>(G.data_ptr<scalar_t>(), n, d, cosine,
                                       out.data_ptr<robustagg::acc_t<scalar_t>>(), bad.data_ptr<bool>());
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
