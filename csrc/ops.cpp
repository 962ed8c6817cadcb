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

// ---- CPU: topk_ef_step, topk_abs (csrc/cpu/topk.cpp)

// ---- CPU: maxpool_amplify (csrc/cpu/maxpool.cpp)

// ---- CPU: pairwise_sqdist, pairwise_cosine (csrc/cpu/pairwise.cpp)
