"""Exceptions and argument checks shared by the ops and the aggregators."""
import math
import numbers

import torch


class NonFiniteUpdateError(ValueError):
    """Raised under ``nonfinite="raise"`` when client rows hold NaN or Inf (docs/nonfinite.md).

    ``clients`` lists the offending rows, as the caller's original row numbers.
    """

    def __init__(self, clients, op):
        self.clients = [int(c) for c in clients]
        self.op = op
        shown = ", ".join(str(c) for c in self.clients[:20])
        more = f" and {len(self.clients) - 20} more" if len(self.clients) > 20 else ""
        super().__init__(
            f"{op}: {len(self.clients)} client row(s) hold NaN or Inf: [{shown}{more}]; "
            "pass nonfinite='drop' to exclude them or nonfinite='propagate' to skip the check"
        )


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


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
                lo_open: bool = False) -> float:
    """A finite real in [lo, hi] (or (lo, hi] with ``lo_open``), else an error naming the argument,
    the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if not math.isfinite(value) or below or (hi is not None and value > hi):
        opening = "(" if lo_open else "["
        if lo is not None and hi is not None:
            allowed = f"in {opening}{lo}, {hi}]"
        elif lo is not None:
            allowed = f"{'>' if lo_open else '>='} {lo}"
        else:
            allowed = f"<= {hi}" if hi is not None else "finite"
        raise ValueError(f"{owner}: {name}={value} is out of range; allowed {allowed} (and finite)")
    return value


def check_bool(owner: str, name: str, value) -> bool:
    """A bool (not merely truthy), else an error naming the argument and the value."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return value


def check_weights(owner: str, weights, n: int) -> torch.Tensor:
    """Per-client weights (sample counts) as a float64 [n] tensor: real, finite, >= 0 and not all 0.

    They are returned scaled by a power of two (exactly) to a largest value in [0.5, 1): only their
    ratios matter, and such weights cannot overflow when they are added up in float32.
    """
    if isinstance(weights, torch.Tensor):
        w = weights
    else:
        try:
            w = torch.as_tensor(weights)
        except (TypeError, ValueError, RuntimeError):
            w = None
    if w is None or w.dtype == torch.bool or w.is_complex() or not (w.is_floating_point() or w.dtype in (
            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{owner}: weights must be {n} real numbers (a 1-D tensor or sequence), got {weights!r}")
    if w.shape != (n,):
        raise ValueError(f"{owner}: weights has shape {tuple(w.shape)}; it must be ({n},), one per client")
    w = w.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"{owner}: weights must be finite, >= 0 and not all 0; got min={float(w.min())} "
                         f"max={float(w.max())}")
    return torch.ldexp(w, -torch.frexp(w.max()).exponent)
