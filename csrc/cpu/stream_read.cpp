// The benchmark's own streaming read (robustagg/bench/timing.py): one pass over a tensor's bytes
// that does nothing but load them, so its bandwidth is a floor no op that reads the same bytes can
// beat. It is torch.ops.robustagg_bench.stream_read, outside the robustagg namespace and the op
// table: a measuring tool, not an aggregation op.
//
// The bytes are summed as 64-bit words into eight independent accumulators (so the adds never
// wait on each other) on every thread, in long contiguous runs; the wrap-around total is returned
// so that the compiler cannot drop the loads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

namespace robustagg::cpu {
namespace {

constexpr int kAccumulators = 8;
// Words per OpenMP work item: 2 MiB runs keep the hardware prefetcher streaming.
constexpr int64_t kRunWords = int64_t(1) << 18;

template <Isa isa, typename Word>
Word sum_words_body(const Word* words, int64_t count) {
  Word acc[kAccumulators] = {};
  int64_t i = 0;
  for (; i + kAccumulators <= count; i += kAccumulators) {
    for (int k = 0; k < kAccumulators; ++k) acc[k] += words[i + k];
  }
  for (; i < count; ++i) acc[0] += words[i];
  Word total = 0;
  for (int k = 0; k < kAccumulators; ++k) total += acc[k];
  return total;
}
RA_CPU_KERNEL(sum_words, (typename Word), (Word), (const Word* words, int64_t count), (words, count))

at::Tensor stream_read(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "stream_read: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "stream_read: x must be contiguous (it times a plain read of its bytes)");
  const auto* bytes = static_cast<const unsigned char*>(x.const_data_ptr());
  const int64_t nbytes = x.numel() * static_cast<int64_t>(x.element_size());
  // A tensor's storage is at least element-aligned, not word-aligned: the head and the tail that
  // do not fill an aligned word are added byte by byte.
  const int64_t head = std::min<int64_t>(nbytes, (8 - reinterpret_cast<uintptr_t>(bytes) % 8) % 8);
  const int64_t count = (nbytes - head) / 8;
  const auto* words = reinterpret_cast<const uint64_t*>(bytes + head);
  uint64_t total = 0;
  for (int64_t i = 0; i < head; ++i) total += bytes[i];
  for (int64_t i = head + 8 * count; i < nbytes; ++i) total += bytes[i];
  const Isa isa = best_isa();
  const int64_t runs = (count + kRunWords - 1) / kRunWords;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t begin = r * kRunWords;
    total += sum_words<uint64_t>(isa, words + begin, std::min(kRunWords, count - begin));
  }
  int64_t result;
  std::memcpy(&result, &total, sizeof(result));
  return at::scalar_tensor(result, at::TensorOptions().dtype(at::kLong));
}

}  // namespace
}  // namespace robustagg::cpu

TORCH_LIBRARY(robustagg_bench, m) {
  // x's bytes summed modulo 2^64 (an int64 scalar): as little-endian 64-bit words where they
  // fill an aligned word, byte by byte in the unaligned head and tail.
  m.def("stream_read(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustagg_bench, CPU, m) { m.impl("stream_read", &robustagg::cpu::stream_read); }
