"""Block sizes and warp counts (the role of Liger's ``calculate_settings``).

The GPU numbers are chosen for H100/H200-class GPUs by reasoning, not yet by measurement (no GPU
was lent when they were written; see benchmarks/NOTES.md (Triton section) for what to tune).

Under ``TRITON_INTERPRET=1`` every tl operation costs about a millisecond of Python whatever its
size, so the interpreter gets larger tiles (fewer programs and loop trips; num_warps is ignored
there). The kernels are the same code; the tests take their block-boundary cases from these
functions, and compile the GPU sizes for sm_80/sm_90.
"""
from __future__ import annotations

import os

import torch
import triton

from .._dtypes import acc_dtype  # noqa: F401  (the one definition, re-exported to the kernels)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The sorting network keeps the whole [BLOCK_D, N_PAD] tile in registers; 4096 values over 4 warps is
# 32 per thread, which leaves room for the bitonic network's temporaries.
SORT_TILE = 65536 if INTERPRETED else 4096
# Widest n sorted in one tile; larger n goes through the radix-select path.
MAX_SORT_N = 256


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def column_settings(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for kernels that stream G by column blocks, n rows at a time.

    BLOCK_D of 512 contiguous values per row is four 128-byte lines for fp32, so every warp load
    is fully coalesced; 8 rows per step give 16 values per thread in flight.
    """
    if INTERPRETED:
        return min(32, next_pow2(n)), 2048, 4
    return min(8, next_pow2(n)), 512, 4


def sort_settings(n: int) -> tuple[int, int, int]:
    """(N_PAD, BLOCK_D, num_warps) for the one-tile sort of n <= MAX_SORT_N values per column.

    BLOCK_D stays >= 16 so that each row segment of the tile is at least 64 bytes (two sectors)
    of contiguous fp32 values.
    """
    n_pad = next_pow2(n)
    block_d = max(16, min(2048 if INTERPRETED else 256, SORT_TILE // n_pad))
    return n_pad, block_d, 4 if n_pad * block_d <= 4096 else 8


def select_settings() -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for the radix-select order statistics (n > MAX_SORT_N).

    The program re-reads its [n, BLOCK_D] slab once per key bit, so the slab should stay in L2:
    128 columns x n rows; 32 rows per step keep 4096 values in flight.
    """
    return (64, 1024, 4) if INTERPRETED else (32, 128, 4)


def row_settings(d: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK, num_warps) for per-row kernels: one program reduces CHUNK values of one row.

    A chunk of 64K values (256 KB of fp32) is long enough to amortise the program's start and its
    partial-result store, and short enough that n * d / CHUNK programs fill every SM.
    """
    block = 8192 if INTERPRETED else 1024
    chunk = min(64 * 1024, triton.cdiv(d, block) * block)
    return chunk, block, 4


def flat_settings() -> tuple[int, int]:
    """(BLOCK, num_warps) for elementwise passes over a flat vector."""
    return (8192 if INTERPRETED else 1024), 4


def pairwise_settings() -> tuple[int, int, int]:
    """(BLOCK_I, BLOCK_D, num_warps): row-tile height and columns per step of the pairwise kernel.

    The [BLOCK_I, BLOCK_I, BLOCK_D] float64 temporaries hold 4096 values, 32 per thread.
    """
    return (32, 256, 4) if INTERPRETED else (16, 16, 4)
