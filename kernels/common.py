"""Helpers shared by the kernel families: device functions, and the host-side check of the row
selection that the coordinate-wise ops take."""
import torch
import triton
import triton.language as tl

from .._raw_checks import rows_arg

# Power-of-two scales of core/common.h (kScaleDown, kScaleUp) for float64 values whose squares or
# products would overflow or underflow (docs/nonfinite.md): |x| * 2^-600 <= 2^424 for every float64, and a
# value below 2^-450 times 2^600 is a normal number whose square is one too. Scaling by them is
# exact. Kernels read them as constexprs, the host code as their ``.value``.
SCALE_DOWN = tl.constexpr(2.0 ** -600)
SCALE_UP = tl.constexpr(2.0 ** 600)
# core's kTinySquares: a float64 sum of squares below this may have lost squares to underflow.
TINY_SQUARES = 2.0 ** -900


@triton.jit
def to_acc(x, IS_FP64: tl.constexpr):
    """Arithmetic dtype: float64 for float64 input, float32 otherwise."""
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def nonfinite(x):
    """True for NaN and +-Inf (NaN fails every comparison, so |x| < inf is False for it)."""
    return ~(tl.abs(x) < float("inf"))


@triton.jit
def flag_rows(x, rows, valid, flags, AXIS: tl.constexpr):
    """Set flags[row] = 1 for every row of the tile holding a NaN/Inf (x in the arithmetic dtype).

    The integer atomic only fires for rows that hold one, and max of 0/1 flags is
    order-independent, so the result is deterministic.
    """
    hits = tl.sum((nonfinite(x) & valid).to(tl.int32), axis=AXIS)
    tl.atomic_max(flags + rows, 1, mask=hits > 0, sem="relaxed")


@triton.jit
def sign_of(x):
    """sign(x) as int32 with sign(+-0) = 0 (and 0 for NaN); x in the arithmetic dtype.

    16-bit values are compared after widening: the interpreter compares raw bfloat16 wrongly.
    """
    return (x > 0).to(tl.int32) - (x < 0).to(tl.int32)


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """Cast an arithmetic value to the storage dtype, rounding to nearest even.

    bfloat16 is rounded by hand: the interpreter's numpy emulation truncates, and doing the
    rounding in integer ops gives the same bits on the interpreter and on the GPU.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, bits | 0x400000, rounded)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def load_row_block(G, row_ids, start, n, d, cols, col_ok, HAS_ROWS: tl.constexpr, IS_FP64: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Positions start..start+BLOCK_N-1 of the n rows a kernel reads, at columns ``cols``, in the
    arithmetic dtype (0 where masked): (x [BLOCK_N, BLOCK_D], the positions, the valid mask)."""
    rows = start + tl.arange(0, BLOCK_N)
    valid = (rows < n)[:, None] & col_ok[None, :]
    src = source_rows(rows, rows < n, row_ids, HAS_ROWS)
    x = to_acc(tl.load(G + src[:, None] * d + cols[None, :], mask=valid, other=0.0), IS_FP64)
    return x, rows, valid


@triton.jit
def source_rows(rows, row_ok, row_ids, HAS_ROWS: tl.constexpr):
    """The rows of G that positions ``rows`` of the selection read, as int64: row_ids[rows] with a
    row selection (masked positions read row 0, whose loads are masked too), else ``rows``."""
    if HAS_ROWS:
        return tl.load(row_ids + rows, mask=row_ok, other=0)
    else:
        return rows.to(tl.int64)


def row_selection(G: torch.Tensor, rows, op: str):
    """(row_ids, m, HAS_ROWS) for a kernel that reads the rows ``rows`` of G where they lie, after
    csrc/checks.h rows_arg's checks (robustagg/_raw_checks.py: the range is read on the host, or
    asserted in the graph on fake tensors). Without rows, row_ids is G itself, a pointer the kernel
    never reads."""
    rows = rows_arg(rows, G, op)
    if rows is None:
        return G, G.shape[0], False
    return rows, rows.shape[0], True
