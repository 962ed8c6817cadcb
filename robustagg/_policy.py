"""The non-finite policy of the ops (docs/nonfinite.md): how an op runs its kernel under
``nonfinite="raise"``, ``"drop"`` or ``"propagate"``.

The kernels flag the rows holding NaN or Inf in the same pass that computes the result. Under
``"raise"`` and ``"drop"`` the flags are read on the host, which is where a compiled caller leaves
its graph; under ``"propagate"`` they are never read, so a compiled op stays one graph.
"""
from __future__ import annotations

from . import _backend
from ._errors import NonFiniteUpdateError

POLICIES = ("raise", "drop", "propagate")


def check_policy(nonfinite, op: str, allowed=POLICIES) -> None:
    if nonfinite not in allowed:
        raise ValueError(f"{op}: nonfinite={nonfinite!r} is not a policy; choose one of {allowed}")


class Selection:
    """The rows of G a coordinate-wise op reads: ``rows`` (int64 row numbers of G, passed to the raw
    op) or every row when it is None; ``n`` counts them. After non-finite rows were dropped it says
    which, for error messages."""

    def __init__(self, rows, n, n_total, dropped=()):
        self.rows, self.n, self.n_total, self.dropped = rows, n, n_total, list(dropped)

    def why(self) -> str:
        if not self.dropped:
            return f" for n={self.n} rows"
        return (f" for the n'={self.n} finite rows left of n={self.n_total} after dropping "
                f"non-finite clients {self.dropped}")

    def flags(self, bad):
        """The raw op's flags (one per row read) as bool[n_total] over G's rows."""
        if self.rows is None:
            return bad
        return bad.new_zeros(self.n_total).index_put_((self.rows,), bad)

    def row_numbers(self, mask):
        """The G row numbers of the rows read where ``mask`` (one per row read) is true."""
        local = mask.nonzero().flatten()
        return local if self.rows is None else self.rows[local]


def coordinatewise(op, G, nonfinite, backend, run, raw_op=None, rows=None):
    """Run a coordinate-wise op under the policy; ``run(fn, G, selection)``, fn the raw op, returns
    (..., nonfinite) with the raw op reading ``selection.rows`` of G (a checked int64 tensor, or
    None for every row).

    ``raw_op`` is the raw op that computes ``op`` (trimmed_mean and median run order_mean);
    messages name ``op``, the function the caller called. Under "drop" the op runs again on the
    finite rows, read in place: G is never copied. Returns (result list, nonfinite), nonfinite
    bool[n] over G's rows: the rows read that hold NaN or Inf (the dropped ones under "drop").
    """
    check_policy(nonfinite, op)
    raw_op = raw_op or op
    fn = _backend.raw_op(raw_op, _backend.select(raw_op, G.device, backend))
    n = G.shape[0]
    first = Selection(rows, n if rows is None else rows.shape[0], n)
    *result, bad = run(fn, G, first)
    if nonfinite == "propagate" or not bool(bad.any()):
        return result, first.flags(bad)
    found = first.row_numbers(bad).unique()   # a selection may list a row twice
    if nonfinite == "raise":
        raise NonFiniteUpdateError(found.tolist(), op)
    kept = first.row_numbers(~bad)
    if kept.numel() == 0:
        raise ValueError(f"{op}: all n={first.n} client rows hold NaN or Inf; no finite row is left to aggregate")
    *result, _ = run(fn, G, Selection(kept, kept.numel(), n, found.tolist()))
    return result, first.flags(bad)


def per_client(op, G, nonfinite, backend, run, row_outputs, matrix_outputs=()):
    """Run a per-client op; under "drop" the listed outputs get NaN in the non-finite rows.

    ``row_outputs`` index outputs whose dim 0 is the client; ``matrix_outputs`` index [n, n]
    outputs whose rows and columns are clients. Returns (result list, nonfinite bool[n]).
    """
    check_policy(nonfinite, op)
    fn = _backend.raw_op(op, _backend.select(op, G.device, backend))
    *result, bad = run(fn, G)
    if nonfinite == "propagate":
        return result, bad
    if bool(bad.any()):
        if nonfinite == "raise":
            raise NonFiniteUpdateError(bad.nonzero().flatten().tolist(), op)
        for i in row_outputs:
            result[i] = result[i].masked_fill(bad.reshape(-1, *([1] * (result[i].dim() - 1))), float("nan"))
        for i in matrix_outputs:
            result[i] = result[i].masked_fill(bad[:, None] | bad[None, :], float("nan"))
    return result, bad
