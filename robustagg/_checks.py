"""Argument checks shared by the ops, the aggregators and the helpers around them.

Each raises ``TypeError`` or ``ValueError`` with a message that names the argument, its value and
the allowed range, and returns the value as the caller uses it.
"""
from __future__ import annotations

import math
import numbers

import torch

from ._dtypes import DTYPES, dtype_max

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_int(owner: str, name: str, value, lo: int, hi: int | None = None, why: str = "") -> int:
    """An int in [lo, hi], else an error naming the argument, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}: {name}={value} is out of range; allowed {allowed}{why}")
    return value


def check_float(owner: str, name: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real in [lo, hi] (an open end with ``lo_open`` / ``hi_open``), else an error naming
    the argument, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if not math.isfinite(value) or below or above:
        opening, closing = "(" if lo_open else "[", ")" if hi_open else "]"
        if lo is not None and hi is not None:
            allowed = f"in {opening}{lo}, {hi}{closing}"
        elif lo is not None:
            allowed = f"{'>' if lo_open else '>='} {lo}"
        else:
            allowed = f"{'<' if hi_open else '<='} {hi}" if hi is not None else "finite"
        raise ValueError(f"{owner}: {name}={value} is out of range; allowed {allowed} (and finite)")
    return value


def check_bool(owner: str, name: str, value) -> bool:
    """A bool (not merely truthy), else an error naming the argument and the value."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return value


def check_choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {tuple(choices)}")
    return value


def check_multiplier(owner: str, name: str, value: float, dtype: torch.dtype) -> float:
    """A factor of the output (a server learning rate) that fits the arithmetic dtype of ``dtype``,
    so that a 0 or +-1 it multiplies stays finite."""
    limit = dtype_max(dtype)
    return check_float(owner, name, value, -limit, limit)


def check_dtype(x: torch.Tensor, op: str, name: str) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; supported dtypes are float16, bfloat16, float32, float64")


def check_matrix(G, op: str, name: str = "G") -> torch.Tensor:
    """G as the ops read it: a 2-D tensor of a supported dtype with n >= 1 rows and d >= 1 columns,
    detached and contiguous."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{op}: {name} has shape {tuple(G.shape)}; it must be 2-D (n clients, d coordinates)")
    n, d = G.shape
    if n == 0:
        raise ValueError(f"{op}: {name} has n=0 rows; at least 1 client row is required")
    if d == 0:
        raise ValueError(f"{op}: {name} has d=0 columns; at least 1 coordinate is required")
    check_dtype(G, op, name)
    return G.detach().contiguous()


def check_vector(x, op: str, name: str) -> torch.Tensor:
    """A detached 1-D tensor of a supported dtype with at least 1 element."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] == 0:
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}; it must be 1-D with at least 1 element")
    check_dtype(x, op, name)
    return x.detach()


def values_checked() -> bool:
    """Whether an op checks the values of its tensor arguments (weights, ref, bounds) on the host:
    always, except while torch.compile traces it, where a host read would split the graph."""
    return not torch.compiler.is_compiling()


def check_weights(owner: str, weights, n: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float64, *, check_values: bool = True) -> torch.Tensor:
    """Per-client weights (sample counts) as a contiguous [n] tensor of ``dtype`` on ``device``:
    real, finite, >= 0 and not all 0.

    They are returned scaled by a power of two (exactly) to a largest value in [0.5, 1): only their
    ratios matter, and such weights cannot overflow when they are added up in float32.
    ``check_values=False`` checks the type and shape only: the values are then never read on the
    host, which keeps a compiled caller in one graph (``values_checked()``).
    """
    if isinstance(weights, torch.Tensor):
        w = weights
    else:
        try:
            w = torch.as_tensor(weights)
        except (TypeError, ValueError, RuntimeError):
            w = None
    if w is None or w.dtype == torch.bool or w.is_complex() or not (w.is_floating_point() or w.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{owner}: weights must be {n} real numbers (a 1-D tensor or sequence), got {weights!r}")
    if w.shape != (n,):
        raise ValueError(f"{owner}: weights has shape {tuple(w.shape)}; it must be ({n},), one per client")
    w = w.detach().to(torch.float64)
    if check_values:
        # min and max propagate NaN, so one read of the three covers every condition
        low, high, total = torch.stack([w.min(), w.max(), w.sum()]).tolist()
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or total <= 0:
            raise ValueError(f"{owner}: weights must be finite, >= 0 and not all 0; got min={low} max={high}")
    w = torch.ldexp(w, -torch.frexp(w.max()).exponent)
    return w.to(device=device, dtype=dtype).contiguous()


def check_rows(op: str, rows, n: int, device: torch.device) -> torch.Tensor | None:
    """A row selection (``rows=`` of the coordinate-wise ops) as a contiguous int64 tensor of row
    numbers of G on ``device``: 1-D, 1 <= m <= n entries, each in [0, n); repeats are allowed.
    None stays None (every row). The range is read on the host except while tracing
    (``values_checked()``)."""
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        r = rows.detach()
    else:
        try:
            r = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError):
            r = None
        if r is not None and r.numel() == 0:
            r = r.to(torch.int64)   # an empty sequence comes out as float32
    if r is None or r.dtype not in _INTEGER_DTYPES or r.dim() != 1:
        raise TypeError(f"{op}: rows must be a 1-D integer tensor or sequence of row numbers of G, got {rows!r}")
    if not 1 <= r.shape[0] <= n:
        raise ValueError(f"{op}: rows selects m={r.shape[0]} rows; allowed 1 <= m <= n={n}")
    if values_checked():
        first, last = torch.stack(torch.aminmax(r)).tolist()
        if first < 0 or last >= n:
            raise ValueError(f"{op}: rows holds row numbers from {first} to {last}; allowed [0, {n - 1}] for n={n}")
    return r.to(device=device, dtype=torch.int64).contiguous()
