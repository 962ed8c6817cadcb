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


class Rows:
    """How many rows an op runs on, for error messages after non-finite rows were dropped."""

    def __init__(self, n, n_total, dropped=()):
        self.n, self.n_total, self.dropped = n, n_total, list(dropped)

    def why(self) -> str:
        if not self.dropped:
            return f" for n={self.n} rows"
        return (f" for the n'={self.n} finite rows left of n={self.n_total} after dropping "
                f"non-finite clients {self.dropped}")


def coordinatewise(op, G, nonfinite, backend, run, raw_op=None):
    """Run a coordinate-wise op under the policy; ``run(fn, X, rows)``, fn the raw op, returns
    (..., nonfinite).

    ``raw_op`` is the raw op that computes ``op`` (trimmed_mean and median run order_mean);
    messages name ``op``, the function the caller called. Under "drop" the op runs again on the
    finite rows, with ``run(fn, X, rows, kept)``.
    """
    check_policy(nonfinite, op)
    raw_op = raw_op or op
    fn = _backend.raw_op(raw_op, _backend.select(raw_op, G.device, backend))
    n = G.shape[0]
    *result, bad = run(fn, G, Rows(n, n))
    if nonfinite == "propagate" or not bool(bad.any()):
        return result
    dropped = bad.nonzero().flatten()
    if nonfinite == "raise":
        raise NonFiniteUpdateError(dropped.tolist(), op)
    kept = (~bad).nonzero().flatten()
    if kept.numel() == 0:
        raise ValueError(f"{op}: all n={n} client rows hold NaN or Inf; no finite row is left to aggregate")
    rows = Rows(kept.numel(), n, dropped.tolist())
    *result, _ = run(fn, G.index_select(0, kept), rows, kept)
    return result


def per_client(op, G, nonfinite, backend, run, row_outputs, matrix_outputs=()):
    """Run a per-client op; under "drop" the listed outputs get NaN in the non-finite rows.

    ``row_outputs`` index outputs whose dim 0 is the client; ``matrix_outputs`` index [n, n]
    outputs whose rows and columns are clients.
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
