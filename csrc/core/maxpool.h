// Per-window math of maxpool_amplify (docs/ops.md), shared by the CPU and CUDA kernels.
//
// A pooled segment is a (rows, cols) row-major matrix inside one row of G, pooled with a
// kernel x kernel window, stride kernel, floor mode (the last rows % kernel rows and
// cols % kernel columns are dropped). The max is over raw signed values. A NaN in a window wins
// it (torch.max_pool2d propagates NaN), and the first NaN or first maximum in row-major window
// order is the arg-max, like torch.argmax.
//
// Segment table rows (schema in csrc/ops.cpp): (in_offset, rows, cols, pooled, out_offset).
#pragma once
#include "core/common.h"

namespace robustagg {

struct PoolSegment {
  int64_t in_offset;   // first column of the segment in a row of G
  int64_t rows, cols;  // its 2-D view; rows * cols values
  bool pooled;         // false: 0-D/1-D parameter, copied through
  int64_t out_offset;  // first column of its output in a row of the result
};

RA_HD PoolSegment pool_segment(const int64_t* table_row) {
  return PoolSegment{table_row[0], table_row[1], table_row[2], table_row[3] != 0, table_row[4]};
}

// True when candidate x replaces the running max `best` of a window scanned in row-major order:
// strictly greater, or the first NaN. Later equal values never win, so the arg-max is the first.
template <typename A> RA_HD bool window_takes(A x, A best) {
  return x > best || (x != x && best == best);
}

}  // namespace robustagg
