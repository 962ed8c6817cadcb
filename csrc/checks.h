// Argument checks shared by the CPU registrations (csrc/ops.cpp) and the CUDA ones
// (csrc/cuda/bindings.cpp), so that a bad argument gets the same message on every backend. Each
// message names the op, the argument, its value and the allowed range. Torch-side only: the
// kernels in csrc/cpu, csrc/cuda and csrc/core never include it.
//
// The public API (robustagg/ops.py) checks its arguments before it reaches a raw op; these guard
// the raw torch.ops.robustagg.* entry points, where a bad size would otherwise become a bad address.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace robustagg::checks {

// docs/backends.md: float32 arithmetic for 16/32-bit storage, float64 for float64.
inline at::ScalarType arithmetic_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor of a supported dtype on the backend's device type.
inline void check_tensor(const at::Tensor& t, const char* op, const char* name, c10::DeviceType device) {
  const std::string backend = c10::DeviceTypeName(device, /*lower_case=*/true);
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", backend, " tensor for the ", backend,
              " backend, got one on ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op, ": ", name,
              " has dtype ", dt, "; supported dtypes are float16, bfloat16, float32, float64");
}

// G as a contiguous, non-empty [n, d] matrix.
inline at::Tensor matrix_arg(const at::Tensor& G, const char* op, c10::DeviceType device) {
  check_tensor(G, op, "G", device);
  TORCH_CHECK(G.dim() == 2, op, ": G must be 2-D (n, d), got shape ", G.sizes());
  TORCH_CHECK(G.size(0) > 0 && G.size(1) > 0, op, ": G must have n >= 1 rows and d >= 1 columns, got shape ",
              G.sizes());
  return G.contiguous();
}

// A contiguous, non-empty vector.
inline at::Tensor vector_arg(const at::Tensor& x, const char* op, const char* name, c10::DeviceType device) {
  check_tensor(x, op, name, device);
  TORCH_CHECK(x.dim() == 1 && x.size(0) > 0, op, ": ", name, " must be 1-D with at least 1 element, got shape ",
              x.sizes());
  return x.contiguous();
}

// A per-row vector (weights, max_norm) in G's arithmetic dtype, on G's device: one entry for each
// of the `count` rows the op reads.
inline at::Tensor row_vector_arg(const at::Tensor& v, const at::Tensor& G, int64_t count, const char* op,
                                 const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == count, op, ": ", name, " must have shape (", count,
              ",), one per row the op reads, got ", v.sizes());
  return v.to(G.device(), arithmetic_dtype(G)).contiguous();
}

// The largest finite value of t's arithmetic dtype.
inline double arithmetic_max(const at::Tensor& t) { return arithmetic_dtype(t) == at::kDouble ? DBL_MAX : FLT_MAX; }

// A real scalar the kernels read (server_lr, rho): finite and in [lo, hi].
inline void check_real(double value, double lo, double hi, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(value) && value >= lo && value <= hi, op, ": ", name, "=", value,
              " is out of range; allowed [", lo, ", ", hi, "] (and finite)");
}

// The values of a per-row vector the kernels read (weights, max_norm): finite and >= 0. Reading
// them synchronizes a CUDA stream; the vector has only n entries.
inline void check_nonnegative(const at::Tensor& v, const char* op, const char* name) {
  const bool ok = at::isfinite(v).all().item<bool>() && (v >= 0).all().item<bool>();
  TORCH_CHECK(ok, op, ": ", name, " must hold finite values >= 0, got min=", v.min().item<double>(),
              " max=", v.max().item<double>());
}

// rlr's weights in G's arithmetic dtype: finite, >= 0, with a positive total that fits it.
// Returned scaled by a power of two to a largest weight in [0.5, 1): that leaves the weighted mean
// bit for bit as it is (every product and sum scales exactly), and a weight above 1 times a
// finite value near the dtype's maximum could overflow (+Inf and -Inf terms would add to NaN).
inline at::Tensor weights_arg(const at::Tensor& weights, const at::Tensor& G, int64_t count, const char* op) {
  const at::Tensor w = row_vector_arg(weights, G, count, op, "weights");
  check_nonnegative(w, op, "weights");
  const double total = w.sum(at::kDouble).item<double>();
  TORCH_CHECK(total > 0 && total <= arithmetic_max(G), op, ": weights sum to ", total, "; allowed (0, ",
              arithmetic_max(G), "]");
  int exponent = 0;
  std::frexp(w.max().item<double>(), &exponent);
  // two steps, so that neither factor leaves float64 (the exponent of 5e-324 is -1073)
  const double half = std::ldexp(1.0, -exponent / 2), rest = std::ldexp(1.0, -exponent + exponent / 2);
  return w.to(at::kDouble).mul(half).mul(rest).to(w.scalar_type()).contiguous();
}

// The per-row non-finite flags every matrix op returns.
inline at::Tensor row_flags(const at::Tensor& G) { return at::empty({G.size(0)}, G.options().dtype(at::kBool)); }

// The optional row selection of the coordinate-wise ops (sign_sum, rlr, order_mean, invariant,
// closest_to_median_mean): the op computes what it computes on G.index_select(0, rows), reading
// the selected rows where they lie, so that dropping rows never copies G. Returns the selection as
// a contiguous int64[m] on G's device, 1 <= m <= n, every entry in [0, n) (repeats are allowed),
// or an undefined tensor for "every row". The kernels trust the entries for their addresses, so
// the range is read here; that synchronizes a CUDA stream, over at most n numbers.
inline at::Tensor rows_arg(const std::optional<at::Tensor>& rows, const at::Tensor& G, const char* op) {
  if (!rows.has_value()) return at::Tensor();
  const at::Tensor& r = *rows;
  const int64_t n = G.size(0);
  TORCH_CHECK(r.device() == G.device(), op, ": rows must be on G's device ", G.device(), ", got one on ", r.device());
  TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1, op, ": rows must be a 1-D int64 tensor of row numbers, got ",
              r.scalar_type(), " of shape ", r.sizes());
  TORCH_CHECK(r.size(0) >= 1 && r.size(0) <= n, op, ": rows selects m=", r.size(0), " rows; allowed 1 <= m <= n=", n);
  const auto [low, high] = at::aminmax(r);
  const int64_t first = low.item<int64_t>(), last = high.item<int64_t>();
  TORCH_CHECK(first >= 0 && last < n, op, ": rows holds row numbers from ", first, " to ", last, "; allowed [0, ", n - 1,
              "] for n=", n);
  return r.contiguous();
}

// How many rows an op reads: the selection's, else every row of G.
inline int64_t selected_count(const at::Tensor& rows, const at::Tensor& G) {
  return rows.defined() ? rows.size(0) : G.size(0);
}

// The non-finite flags of the rows an op reads, one per selected row, in the selection's order.
inline at::Tensor row_flags(const at::Tensor& G, const at::Tensor& rows) {
  return at::empty({selected_count(rows, G)}, G.options().dtype(at::kBool));
}

inline void check_ranks(int64_t lo, int64_t hi, int64_t n, const char* op) {
  TORCH_CHECK(lo >= 0 && lo < hi && hi <= n, op, ": lo=", lo, ", hi=", hi,
              " are out of range; allowed 0 <= lo < hi <= n=", n);
}

inline void check_count(int64_t value, int64_t lo, int64_t hi, const char* op, const char* name) {
  TORCH_CHECK(value >= lo && value <= hi, op, ": ", name, "=", value, " is out of range; allowed [", lo, ", ", hi,
              "]");
}

inline void check_window(int64_t start, int64_t length, int64_t d) {
  check_count(start, 0, d - 1, "client_stats", "window_start");
  check_count(length, 1, d - start, "client_stats", "window_length");
}

// client_stats' reference vector: G's column count, dtype and device.
inline at::Tensor reference_arg(const at::Tensor& ref_in, const at::Tensor& G) {
  const at::Tensor ref = vector_arg(ref_in, "client_stats", "ref", G.device().type());
  TORCH_CHECK(ref.size(0) == G.size(1) && ref.scalar_type() == G.scalar_type() && ref.device() == G.device(),
              "client_stats: ref must be (", G.size(1), ",) ", G.scalar_type(), " on ", G.device(), ", got ",
              ref.sizes(), " ", ref.scalar_type(), " on ", ref.device());
  return ref;
}

inline void check_k(int64_t k, const char* op) {
  TORCH_CHECK(k >= 0, op, ": k=", k, " is out of range; allowed >= 0");
}

// topk_ef_step's state, updated in place: u's shape, dtype and device, contiguous.
inline void check_topk_state(const at::Tensor& u, const at::Tensor& error, const at::Tensor& momentum) {
  for (const at::Tensor* t : {&error, &momentum}) {
    TORCH_CHECK(t->sizes() == u.sizes() && t->scalar_type() == u.scalar_type() && t->device() == u.device(),
                "topk_ef_step: error and momentum must match u's shape ", u.sizes(), ", dtype ", u.scalar_type(),
                " and device ", u.device(), ", got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "topk_ef_step: error and momentum are updated in place and must be contiguous");
  }
}

// topk_ef_step's arguments besides u: k, rho and the state it updates in place.
inline void check_topk_ef_step(const at::Tensor& u, const at::Tensor& error, const at::Tensor& momentum, int64_t k,
                               double rho) {
  check_k(k, "topk_ef_step");
  check_real(rho, 0.0, arithmetic_max(u), "topk_ef_step", "rho");
  check_topk_state(u, error, momentum);
}

// The outputs of a top-k over x: min(k, d) int64 indices and values.
inline std::tuple<at::Tensor, at::Tensor> topk_outputs(const at::Tensor& x, int64_t k) {
  const int64_t kept = std::min(k, x.size(0));
  return {at::empty({kept}, x.options().dtype(at::kLong)), at::empty({kept}, x.options())};
}

// maxpool_amplify's arguments, with the segment table on the host (five ints per segment; a few
// hundred bytes): the kernels trust it for their addresses and size their scratch by it, so every
// segment must read inside a row of G, write inside a row of the output, and have rows and cols
// of at most d each (even when the other is 0). The products are bounded by divisions, so a
// hostile table cannot overflow them. A pooled output is never wider than its input, so out_width
// is at most d. Returns the number of segments.
inline int64_t segment_table(c10::IntArrayRef segments, int64_t d, int64_t kernel, bool restore, int64_t out_width) {
  TORCH_CHECK(kernel >= 1, "maxpool_amplify: kernel=", kernel, " is out of range; allowed >= 1");
  TORCH_CHECK(segments.size() % 5 == 0, "maxpool_amplify: segments must hold five ints per segment, got ",
              segments.size());
  TORCH_CHECK(restore ? out_width == d : (out_width >= 0 && out_width <= d), "maxpool_amplify: out_width=",
              out_width, restore ? " must equal d=" : " is out of range; allowed [0, d=", d,
              restore ? " with restore=True" : "]");
  const int64_t* t = segments.data();
  const int64_t count = static_cast<int64_t>(segments.size() / 5);
  for (int64_t s = 0; s < count; ++s) {
    const int64_t off = t[5 * s], rows = t[5 * s + 1], cols = t[5 * s + 2], pooled = t[5 * s + 3], out = t[5 * s + 4];
    TORCH_CHECK(off >= 0 && rows >= 0 && cols >= 0 && off <= d && rows <= d && cols <= d &&
                    (cols == 0 || rows <= (d - off) / cols),
                "maxpool_amplify: segment ", s, " (offset ", off, ", rows ", rows, ", cols ", cols,
                ") does not fit in d=", d);
    TORCH_CHECK(pooled == 0 || pooled == 1, "maxpool_amplify: segment ", s, " has pooled=", pooled,
                "; allowed 0 or 1");
    const int64_t written = restore || pooled == 0 ? rows * cols : (rows / kernel) * (cols / kernel);
    TORCH_CHECK(out >= 0 && out <= out_width && written <= out_width - out, "maxpool_amplify: segment ", s,
                " writes ", written, " values at output offset ", out, ", outside the output row of width ", out_width);
    TORCH_CHECK(!restore || out == off, "maxpool_amplify: with restore=True segment ", s,
                " must write where it reads (out_offset ", out, " != in_offset ", off, ")");
  }
  return count;
}

}  // namespace robustagg::checks
