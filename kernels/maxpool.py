r"""Max-pool amplification (docs/ops.md): every segment, every client, one launch.

The segment table (rows of in_offset, rows, cols, pooled, out_offset; see
robustagg/layout.py ``segment_table``) becomes a small work table of items, each cut into tiles
of BLOCK lanes; program (tile, row) looks its item up in a per-tile index and does one of:

* COPY: a pass-through (0-D/1-D) segment, one element per lane;
* POOL: one output per lane, the max of its ``kernel x kernel`` window (stride = kernel, floor
  mode) over raw signed values, NaN propagating as in ``torch.max_pool2d``;
* RESTORE: one window per lane: its max is found once, then written to the window's first
  arg-max in row-major order and 0 to its other ``kernel x kernel - 1`` places;
* SCAN: elements no output reads (the dropped remainder when pooling, the part of a row a flat
  layout leaves out), read only so that non-finite rows are found in the same pass;
* ZERO: the same parts with restore=True, written as 0 and scanned.

POOL and RESTORE items exist only for segments holding at least one window, so their
``kernel x kernel`` loops never run longer than the segment they cover; a segment smaller than
the kernel is all SCAN or ZERO. Building the work table needs the segment table on the host (one
tiny copy), which is checked there with csrc/checks.h's rules (robustagg/_raw_checks.py); the
element work itself is one launch.
"""
import torch
import triton
import triton.language as tl

from .._raw_checks import segment_table
from .common import nonfinite, to_acc, to_storage
from .settings import flat_settings, is_fp64

# Work-item kinds; a work item is the int64 row (kind, in_offset, cols, pitch, out_offset, count,
# first_tile), so the kernel reads item fields at offsets 0..6 of row * 7.
COPY, POOL, RESTORE, SCAN, ZERO = 0, 1, 2, 3, 4


@triton.jit
def _flag_row(hit, flags, row):
    """flags[row] = 1 if any lane hit a NaN/Inf (an integer max: the order of the atomics does not matter)."""
    hits = tl.sum(hit.to(tl.int32), axis=0)
    tl.atomic_max(flags + row, 1, mask=hits > 0, sem="relaxed")


@triton.jit
def _window_max(src, corner, pitch, ok, kernel, IS_FP64: tl.constexpr):
    """Max of the window at ``corner``, its first arg-max (row-major; NaN wins, first NaN first)
    and whether the window holds a NaN/Inf (a -Inf need not be the max)."""
    best = to_acc(tl.load(src + corner, mask=ok, other=0.0), IS_FP64)
    where = tl.zeros(corner.shape, dtype=tl.int32)
    bad = tl.zeros(corner.shape, dtype=tl.int1)
    for a in range(0, kernel):
        for b in range(0, kernel):
            v = to_acc(tl.load(src + corner + a * pitch + b, mask=ok, other=0.0), IS_FP64)
            better = (v > best) | ((v != v) & (best == best))
            best = tl.where(better, v, best)
            where = tl.where(better, a * kernel + b, where)
            bad |= nonfinite(v)
    return best, where, bad


@triton.jit
def _maxpool_kernel(G, items, tile_item, out, flags, d, out_width, kernel, IS_FP64: tl.constexpr,
                    BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    item = items + tl.load(tile_item + tile).to(tl.int64) * 7
    kind = tl.load(item + 0)
    in_offset = tl.load(item + 1)
    cols = tl.load(item + 2)
    pitch = tl.load(item + 3)
    out_offset = tl.load(item + 4)
    e = (tile - tl.load(item + 6)) * BLOCK + tl.arange(0, BLOCK)
    ok = e < tl.load(item + 5)
    src = G + row * d + in_offset
    dst = out + row * out_width + out_offset
    if kind == 0:  # COPY
        x = tl.load(src + e, mask=ok, other=0.0)
        tl.store(dst + e, x, mask=ok)
        _flag_row(nonfinite(to_acc(x, IS_FP64)) & ok, flags, row)
    elif kind == 1 or kind == 2:  # POOL or RESTORE: lane e is window e
        out_cols = cols // kernel
        corner = (e // out_cols) * kernel * cols + (e % out_cols) * kernel
        best, where, bad = _window_max(src, corner, cols, ok, kernel, IS_FP64)
        if kind == 1:
            tl.store(dst + e, to_storage(best, dst.dtype.element_ty), mask=ok)
        else:
            for a in range(0, kernel):
                for b in range(0, kernel):
                    kept = tl.where(where == a * kernel + b, best, 0.0)
                    tl.store(dst + corner + a * cols + b, to_storage(kept, dst.dtype.element_ty), mask=ok)
        _flag_row(bad & ok, flags, row)
    else:  # SCAN or ZERO: a strip of `cols` values per line, lines `pitch` apart
        at = (e // cols) * pitch + e % cols
        x = tl.load(src + at, mask=ok, other=0.0)
        _flag_row(nonfinite(to_acc(x, IS_FP64)) & ok, flags, row)
        if kind == 4:
            tl.store(dst + at, tl.zeros([BLOCK], dtype=dst.dtype.element_ty), mask=ok)


def _work_items(table, d: int, kernel: int, restore: bool):
    """(kind, in_offset, cols, pitch, out_offset, count) per item, from the checked segment table."""
    items, covered_end = [], 0
    uncovered = ZERO if restore else SCAN
    for in_offset, rows, cols, pooled, out_offset in table:
        numel = rows * cols
        covered_end = max(covered_end, in_offset + numel)
        if not pooled:
            items.append((COPY, in_offset, cols, cols, out_offset, numel))
            continue
        kept_rows, kept_cols = (rows // kernel) * kernel, (cols // kernel) * kernel
        windows = (rows // kernel) * (cols // kernel)
        items.append((RESTORE if restore else POOL, in_offset, cols, cols, out_offset, windows))
        # the floor-mode remainder: the strip right of the windows, then every row below them
        right = cols - kept_cols
        items.append((uncovered, in_offset + kept_cols, right, cols, out_offset + kept_cols, kept_rows * right))
        below = (rows - kept_rows) * cols
        items.append((uncovered, in_offset + kept_rows * cols, below, below, out_offset + kept_rows * cols, below))
    tail = d - covered_end
    items.append((uncovered, covered_end, tail, tail, covered_end, tail))
    return [item for item in items if item[-1] > 0]


def maxpool_amplify_forward(G, segments, kernel: int, restore: bool, out_width: int, launch=lambda k: k):
    """([n, out_width] pooled or restored rows, bool[n] non-finite rows)."""
    G = G.contiguous()
    n, d = G.shape
    block, warps = flat_settings()
    items = _work_items(segment_table(segments, d, kernel, restore, out_width), d, kernel, restore)
    tiles = torch.tensor([triton.cdiv(item[-1], block) for item in items], dtype=torch.int64)
    first_tile = torch.cumsum(tiles, 0) - tiles
    table = torch.cat([torch.tensor(items, dtype=torch.int64).reshape(-1, 6), first_tile[:, None]], dim=1)
    tile_item = torch.repeat_interleave(torch.arange(len(items), dtype=torch.int32), tiles)
    out = torch.empty(n, out_width, dtype=G.dtype, device=G.device)
    flags = torch.zeros(n, dtype=torch.int32, device=G.device)
    if tile_item.numel() > 0:
        launch(_maxpool_kernel)[(tile_item.numel(), n)](
            G, table.to(G.device), tile_item.to(G.device), out, flags, d, out_width, kernel,
            IS_FP64=is_fp64(G), BLOCK=block, num_warps=warps)
    return out, flags.bool()
