"""csrc/checks.h for the raw ops written in Python: the Triton launchers (kernels/) and the torch
backend (robustagg/_torch_backend.py) check their arguments here, so that a hostile argument gets
the RuntimeError of the native ops, with the same message, on every backend.

These guard the raw ``torch.ops.robustagg_triton.*`` and ``torch.ops.robustagg_torch.*`` entry
points, where a bad rank, window or state would otherwise become a bad address on a GPU, or a
result without meaning. The public API checks its arguments before it gets here
(robustagg/_checks.py, with messages of its own). Numbers are written as a C++ stream writes a
double (``%g``), dtypes by their c10 names, so that the messages are the native ones character for
character.

A check that reads the values of a tensor (weights, max_norm, rows) reads them on the host, a sync
as in the native bindings. Fake tensors (torch.compile tracing a Triton launcher) have no values:
there the check becomes an assert in the graph (a device-side assert on a GPU), whose message
cannot quote the values.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from ._dtypes import acc_dtype, dtype_max

# at::ScalarType's names, as the native messages print a dtype
_SCALAR_TYPES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
                 torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble", torch.bool: "Bool",
                 torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long"}


def _scalar_type(dtype: torch.dtype) -> str:
    return _SCALAR_TYPES.get(dtype, str(dtype))


def _real(value: float) -> str:
    """``value`` as ``std::ostream << double`` writes it: %g, and "-nan" (glibc) for a NaN whose
    sign bit is set."""
    if math.isnan(value) and math.copysign(1.0, value) < 0:
        return "-nan"
    return f"{value:g}"


def check_count(value: int, lo: int, hi: int, op: str, name: str) -> None:
    """An int the kernels use as a count or rank bound (theta, beta, min_votes, a window): in [lo, hi]."""
    if not lo <= value <= hi:
        raise RuntimeError(f"{op}: {name}={value} is out of range; allowed [{lo}, {hi}]")


def check_ranks(lo: int, hi: int, n: int, op: str) -> None:
    """The kept ranks lo..hi-1 of the n rows read (order_mean, invariant)."""
    if not 0 <= lo < hi <= n:
        raise RuntimeError(f"{op}: lo={lo}, hi={hi} are out of range; allowed 0 <= lo < hi <= n={n}")


def check_window(start: int, length: int, d: int) -> None:
    """client_stats' column window [start, start + length): inside the d columns it reads."""
    check_count(start, 0, d - 1, "client_stats", "window_start")
    check_count(length, 1, d - start, "client_stats", "window_length")


def check_real(value: float, lo: float, hi: float, op: str, name: str) -> None:
    """A real scalar the kernels read (server_lr, rho): finite and in [lo, hi]."""
    if not (math.isfinite(value) and lo <= value <= hi):
        raise RuntimeError(f"{op}: {name}={_real(value)} is out of range; allowed [{_real(lo)}, {_real(hi)}] "
                           f"(and finite)")


def check_k(k: int, op: str) -> None:
    if k < 0:
        raise RuntimeError(f"{op}: k={k} is out of range; allowed >= 0")


def row_vector_arg(v: torch.Tensor, G: torch.Tensor, count: int, op: str, name: str) -> torch.Tensor:
    """A per-row vector (weights, max_norm), one entry for each of the ``count`` rows the op reads,
    returned in G's arithmetic dtype on G's device, as the kernels read it."""
    if v.dim() != 1 or v.shape[0] != count:
        raise RuntimeError(f"{op}: {name} must have shape ({count},), one per row the op reads, got {list(v.shape)}")
    return v.to(G.device, acc_dtype(G.dtype)).contiguous()


def check_nonnegative(v: torch.Tensor, op: str, name: str) -> None:
    """The values of a per-row vector the kernels read (weights, max_norm): finite and >= 0."""
    if is_fake(v):
        torch._assert_async((torch.isfinite(v) & (v >= 0)).all(), f"{op}: {name} must hold finite values >= 0")
        return
    # min and max propagate NaN, so one read of the two decides every condition
    low, high = torch.stack([v.min(), v.max()]).tolist()
    if not (math.isfinite(low) and math.isfinite(high) and low >= 0):
        raise RuntimeError(f"{op}: {name} must hold finite values >= 0, got min={_real(low)} max={_real(high)}")


def weights_arg(weights: torch.Tensor, G: torch.Tensor, count: int, op: str) -> torch.Tensor:
    """rlr's weights in G's arithmetic dtype: finite, >= 0, with a total in (0, the dtype's max]
    (all-zero weights would make the mean 0/0). Its power-of-two rescaling of the weights is the
    native kernels' own.
    """
    w = row_vector_arg(weights, G, count, op, "weights")
    check_nonnegative(w, op, "weights")
    limit, total = dtype_max(G.dtype), w.sum(dtype=torch.float64)
    if is_fake(w):
        torch._assert_async((total > 0) & (total <= limit),
                            f"{op}: weights sum to a value outside the allowed (0, {_real(limit)}]")
        return w
    total = total.item()
    if not 0 < total <= limit:
        raise RuntimeError(f"{op}: weights sum to {_real(total)}; allowed (0, {_real(limit)}]")
    return w


def reference_arg(ref: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """client_stats' reference vector: 1-D, of a supported dtype, with G's column count, dtype and
    device. (The native check first names the backend's device type; here a ref on another device
    gets the second message.)"""
    if ref.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise RuntimeError(f"client_stats: ref has dtype {_scalar_type(ref.dtype)}; supported dtypes are float16, "
                           f"bfloat16, float32, float64")
    if ref.dim() != 1 or ref.shape[0] == 0:
        raise RuntimeError(f"client_stats: ref must be 1-D with at least 1 element, got shape {list(ref.shape)}")
    if ref.shape[0] != G.shape[1] or ref.dtype != G.dtype or ref.device != G.device:
        raise RuntimeError(f"client_stats: ref must be ({G.shape[1]},) {_scalar_type(G.dtype)} on {G.device}, got "
                           f"{list(ref.shape)} {_scalar_type(ref.dtype)} on {ref.device}")
    return ref.contiguous()


def check_invariant(lo: int, hi: int, min_votes: int, n: int) -> None:
    """invariant's ranks of the n rows read, and its vote threshold (n + 1: no coordinate kept)."""
    check_ranks(lo, hi, n, "invariant")
    check_count(min_votes, 0, n + 1, "invariant", "min_votes")


def rlr_args(G: torch.Tensor, weights: torch.Tensor | None, theta: int, server_lr: float, n: int
             ) -> torch.Tensor | None:
    """rlr's arguments for the n rows it reads: theta in [0, n], a finite server_lr within the
    dtype, and the weights (weights_arg), returned as the kernels read them (None: all ones)."""
    check_count(theta, 0, n, "rlr", "theta")
    check_real(server_lr, -dtype_max(G.dtype), dtype_max(G.dtype), "rlr", "server_lr")
    return None if weights is None else weights_arg(weights, G, n, "rlr")


def clip_bound(max_norm: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """clip_rows' per-row bound, finite and >= 0 (a negative one would flip the row), in G's
    arithmetic dtype."""
    bound = row_vector_arg(max_norm, G, G.shape[0], "clip_rows", "max_norm")
    check_nonnegative(bound, "clip_rows", "max_norm")
    return bound


def client_stats_ref(G: torch.Tensor, window_start: int, window_length: int, ref: torch.Tensor | None
                     ) -> torch.Tensor | None:
    """client_stats' window (check_window) and its optional reference vector (reference_arg)."""
    check_window(window_start, window_length, G.shape[1])
    return None if ref is None else reference_arg(ref, G)


def check_topk_ef_step(u: torch.Tensor, error: torch.Tensor, momentum: torch.Tensor, k: int, rho: float) -> None:
    """topk_ef_step's arguments besides u: k, rho, and the state it updates in place, which must
    have u's shape, dtype and device and be contiguous (the kernels write it by u's indices)."""
    check_k(k, "topk_ef_step")
    check_real(rho, 0.0, dtype_max(u.dtype), "topk_ef_step", "rho")
    for t in (error, momentum):
        if t.shape != u.shape or t.dtype != u.dtype or t.device != u.device:
            raise RuntimeError(f"topk_ef_step: error and momentum must match u's shape {list(u.shape)}, dtype "
                               f"{_scalar_type(u.dtype)} and device {u.device}, got {list(t.shape)} "
                               f"{_scalar_type(t.dtype)} on {t.device}")
        if not t.is_contiguous():
            raise RuntimeError("topk_ef_step: error and momentum are updated in place and must be contiguous")


def rows_arg(rows: torch.Tensor | None, G: torch.Tensor, op: str) -> torch.Tensor | None:
    """The optional row selection of the coordinate-wise ops (sign_sum, rlr, order_mean, invariant,
    closest_to_median_mean): a contiguous int64[m] on G's device, 1 <= m <= n, every entry in
    [0, n) (repeats are allowed), or None for every row. The kernels take their addresses from the
    entries, so an eager call reads their range on the host; a traced one asserts it in the graph.
    (The dtype is named as torch names it, where the native message has its c10 name.)"""
    if rows is None:
        return None
    n = G.shape[0]
    if rows.device != G.device:
        raise RuntimeError(f"{op}: rows must be on G's device {G.device}, got one on {rows.device}")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise RuntimeError(f"{op}: rows must be a 1-D int64 tensor of row numbers, got {rows.dtype} of shape "
                           f"{list(rows.shape)}")
    m = rows.shape[0]
    if not 1 <= m <= n:
        raise RuntimeError(f"{op}: rows selects m={m} rows; allowed 1 <= m <= n={n}")
    if is_fake(rows):
        torch._assert_async(((rows >= 0) & (rows < n)).all(),
                            f"{op}: rows holds a row number outside the allowed [0, {n - 1}] for n={n}")
    else:
        first, last = torch.stack(torch.aminmax(rows)).tolist()
        if first < 0 or last >= n:
            raise RuntimeError(f"{op}: rows holds row numbers from {first} to {last}; allowed [0, {n - 1}] for n={n}")
    return rows.contiguous()


def segment_table(segments: list[int], d: int, kernel: int, restore: bool, out_width: int) -> list[list[int]]:
    """maxpool_amplify's segment table as rows of (in_offset, rows, cols, pooled, out_offset), after
    checks::segment_table's checks: the kernels' addresses and sizes come from it, so every segment
    must read inside a row of G and write inside a row of the output."""
    if kernel < 1:
        raise RuntimeError(f"maxpool_amplify: kernel={kernel} is out of range; allowed >= 1")
    if len(segments) % 5:
        raise RuntimeError(f"maxpool_amplify: segments must hold five ints per segment, got {len(segments)}")
    if restore and out_width != d:
        raise RuntimeError(f"maxpool_amplify: out_width={out_width} must equal d={d} with restore=True")
    if not restore and not 0 <= out_width <= d:
        raise RuntimeError(f"maxpool_amplify: out_width={out_width} is out of range; allowed [0, d={d}]")
    table = [segments[i:i + 5] for i in range(0, len(segments), 5)]
    for s, (offset, rows, cols, pooled, out) in enumerate(table):
        if not (0 <= offset <= d and 0 <= rows <= d and 0 <= cols <= d and offset + rows * cols <= d):
            raise RuntimeError(f"maxpool_amplify: segment {s} (offset {offset}, rows {rows}, cols {cols}) does not "
                               f"fit in d={d}")
        if pooled not in (0, 1):
            raise RuntimeError(f"maxpool_amplify: segment {s} has pooled={pooled}; allowed 0 or 1")
        written = rows * cols if restore or not pooled else (rows // kernel) * (cols // kernel)
        if not (0 <= out <= out_width and written <= out_width - out):
            raise RuntimeError(f"maxpool_amplify: segment {s} writes {written} values at output offset {out}, "
                               f"outside the output row of width {out_width}")
        if restore and out != offset:
            raise RuntimeError(f"maxpool_amplify: with restore=True segment {s} must write where it reads "
                               f"(out_offset {out} != in_offset {offset})")
    return table
