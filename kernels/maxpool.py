r"""Max-pool amplification (SPEC §4.7): every segment, every client, one launch.

The segment table (rows of in_offset, rows, cols, pooled, out_offset; see
robustagg/layout.py ``segment_table``) becomes a small work table of items, each cut into tiles
of BLOCK elements; program (tile, row) looks its item up in a per-tile index and does one of:

* COPY: a pass-through (0-D/1-D) segment;
* POOL: one output per element, the max of its ``kernel x kernel`` window (stride = kernel,
  floor mode) over raw signed values, NaN propagating as in ``torch.max_pool2d``;
* RESTORE: one output per input element, the window max if the element is the window's first
  arg-max in row-major order, else 0 (also 0 in the dropped remainder);
* SCAN: elements no output reads (the dropped remainder when pooling, the part of a row a flat
  layout leaves out), read only so that non-finite rows are found in the same pass;
* ZERO: that uncovered part with restore=True, written as 0 and scanned.

Building the work table needs the segment table on the host (one tiny copy); the element work
itself is one launch.
"""
import torch
import triton
import triton.language as tl

from .common import nonfinite, to_acc, to_storage
from .settings import flat_settings, is_fp64

# Work-item kinds; a work item is the int64 row (kind, in_offset, rows, cols, pitch, out_offset,
# count, first_tile), so the kernel reads item fields at offsets 0..7 of row * 8.
COPY, POOL, RESTORE, SCAN, ZERO = 0, 1, 2, 3, 4


@triton.jit
def _flag_row(x, ok, flags, row):
    hits = tl.sum((nonfinite(x) & ok).to(tl.int32), axis=0)
    tl.atomic_max(flags + row, 1, mask=hits > 0, sem="relaxed")


@triton.jit
def _window_max(src, corner, pitch, ok, kernel, IS_FP64: tl.constexpr):
    """Max of the window at ``corner`` and its first arg-max (row-major); NaN wins, first NaN first."""
    best = to_acc(tl.load(src + corner, mask=ok, other=0.0), IS_FP64)
    where = tl.zeros(corner.shape, dtype=tl.int32)
    for a in range(0, kernel):
        for b in range(0, kernel):
            v = to_acc(tl.load(src + corner + a * pitch + b, mask=ok, other=0.0), IS_FP64)
            better = (v > best) | ((v != v) & (best == best))
            best = tl.where(better, v, best)
            where = tl.where(better, a * kernel + b, where)
    return best, where


@triton.jit
def _maxpool_kernel(G, items, tile_item, out, flags, d, out_width, kernel, IS_FP64: tl.constexpr,
                    BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    item = items + tl.load(tile_item + tile).to(tl.int64) * 8
    kind = tl.load(item + 0)
    in_offset = tl.load(item + 1)
    rows = tl.load(item + 2)
    cols = tl.load(item + 3)
    pitch = tl.load(item + 4)
    out_offset = tl.load(item + 5)
    e = (tile - tl.load(item + 7)) * BLOCK + tl.arange(0, BLOCK)
    ok = e < tl.load(item + 6)
    src = G + row * d + in_offset
    dst = out + row * out_width + out_offset
    if kind == 0:  # COPY
        x = tl.load(src + e, mask=ok, other=0.0)
        tl.store(dst + e, x, mask=ok)
        _flag_row(to_acc(x, IS_FP64), ok, flags, row)
    elif kind == 1:  # POOL
        out_cols = cols // kernel
        corner = (e // out_cols) * kernel * cols + (e % out_cols) * kernel
        best, _ = _window_max(src, corner, cols, ok, kernel, IS_FP64)
        tl.store(dst + e, to_storage(best, dst.dtype.element_ty), mask=ok)
        _flag_row(best, ok, flags, row)
    elif kind == 2:  # RESTORE
        y = e // cols
        x_col = e % cols
        inside = ok & (y < (rows // kernel) * kernel) & (x_col < (cols // kernel) * kernel)
        top = y - y % kernel
        left = x_col - x_col % kernel
        best, where = _window_max(src, top * cols + left, cols, inside, kernel, IS_FP64)
        mine = (y - top) * kernel + (x_col - left)
        kept = tl.where(inside & (where == mine), best, 0.0)
        tl.store(dst + e, to_storage(kept, dst.dtype.element_ty), mask=ok)
        _flag_row(to_acc(tl.load(src + e, mask=ok, other=0.0), IS_FP64), ok, flags, row)
    else:  # SCAN or ZERO: a strip of `cols` values per line, lines `pitch` apart
        x = tl.load(src + (e // cols) * pitch + e % cols, mask=ok, other=0.0)
        _flag_row(to_acc(x, IS_FP64), ok, flags, row)
        if kind == 4:
            tl.store(dst + e, tl.zeros([BLOCK], dtype=dst.dtype.element_ty), mask=ok)


def _work_items(segments, d: int, kernel: int, restore: bool):
    """(kind, in_offset, rows, cols, pitch, out_offset, count) per item, from the segment table."""
    items, covered_end = [], 0
    for in_offset, rows, cols, pooled, out_offset in segments.tolist():
        numel = rows * cols
        covered_end = max(covered_end, in_offset + numel)
        if not pooled:
            items.append((COPY, in_offset, rows, cols, cols, out_offset, numel))
        elif restore:
            items.append((RESTORE, in_offset, rows, cols, cols, out_offset, numel))
        else:
            kept_rows, kept_cols = (rows // kernel) * kernel, (cols // kernel) * kernel
            items.append((POOL, in_offset, rows, cols, cols, out_offset, (rows // kernel) * (cols // kernel)))
            right = cols - kept_cols
            items.append((SCAN, in_offset + kept_cols, kept_rows, right, cols, 0, kept_rows * right))
            below = (rows - kept_rows) * cols
            items.append((SCAN, in_offset + kept_rows * cols, 1, below, below, 0, below))
    tail = d - covered_end
    items.append((ZERO if restore else SCAN, covered_end, 1, tail, tail, covered_end if restore else 0, tail))
    return [item for item in items if item[-1] > 0]


def maxpool_amplify_forward(G, segments, kernel: int, restore: bool, out_width: int, launch=lambda k: k):
    """([n, out_width] pooled or restored rows, bool[n] non-finite rows)."""
    G = G.contiguous()
    n, d = G.shape
    block, warps = flat_settings()
    items = _work_items(segments.cpu(), d, kernel, restore)
    tiles = torch.tensor([triton.cdiv(item[-1], block) for item in items], dtype=torch.int64)
    first_tile = torch.cumsum(tiles, 0) - tiles
    table = torch.cat([torch.tensor(items, dtype=torch.int64).reshape(-1, 7), first_tile[:, None]], dim=1)
    tile_item = torch.repeat_interleave(torch.arange(len(items), dtype=torch.int32), tiles)
    out = torch.empty(n, out_width, dtype=G.dtype, device=G.device)
    flags = torch.zeros(n, dtype=torch.int32, device=G.device)
    if tile_item.numel() > 0:
        launch(_maxpool_kernel)[(tile_item.numel(), n)](
            G, table.to(G.device), tile_item.to(G.device), out, flags, d, out_width, kernel,
            IS_FP64=is_fp64(G), BLOCK=block, num_warps=warps)
    return out, flags.bool()
