r"""The public functional API of robustagg (semantics of every op: docs/ops.md).

Every op takes ``G`` of shape (n, d): row i is client i, column j coordinate j. Each op

* checks its arguments (robustagg/_checks.py) and raises ``ValueError``/``TypeError`` naming the
  argument, its value and the allowed range;
* picks a backend (``backend=None``: automatic, docs/backends.md) and calls ``torch.ops.robustagg.*``
  (or the Triton / torch implementation of the same raw signature, robustagg/_registry.py);
* applies the non-finite policy (docs/nonfinite.md, robustagg/_policy.py): ``nonfinite="raise"``
  (default) raises ``NonFiniteUpdateError``, ``"drop"`` computes on the finite rows only,
  ``"propagate"`` skips the check. The kernels find non-finite rows in the same pass that computes
  the result; under ``"drop"`` a coordinate-wise op runs again on the surviving rows, which the
  kernels read in place (G is not copied), while per-client ops just give the dropped rows NaN
  outputs. ``return_nonfinite=True`` also returns which rows held NaN or Inf. Under
  ``"propagate"`` a compiled op reads no tensor on the host (while tracing, the values of
  ``weights``, ``ref``, ``rows`` and a tensor ``max_norm`` go unchecked), so that it compiles into
  one graph.

Supported dtypes are float16, bfloat16, float32 and float64; arithmetic is float32 (float64 for
float64). Results have G's dtype, except counts (int32), indices (int64), masks (bool) and the
per-client statistics and pairwise matrices, which are float64: they are n or n x n numbers whose
exact values (the norm of a float32 row of 3e38, the squared distance of two 1e20 rows) need not
fit float32.

Finite input never gives Inf or NaN where the exact result is finite in the output dtype: sums that
overflow are redone scaled, norms and distances of float64 rows are scaled as LAPACK's nrm2 does.
The ops are not differentiable: tensors that require grad are read detached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _backend, reference
from ._checks import (check_bool, check_float, check_int, check_matrix, check_multiplier, check_rows, check_vector,
                      check_weights, values_checked)
from ._dtypes import acc_dtype, dtype_max
from ._policy import check_policy, coordinatewise, per_client
from .layout import Layout

__all__ = [
    "ClientStats", "sign_sum", "sign_agreement", "order_mean", "trimmed_mean", "median", "closest_to_median_mean",
    "invariant", "invariant_ranks", "rlr", "client_stats", "clip_rows", "topk_ef_step", "topk_abs", "maxpool_amplify",
    "pairwise_sqdist", "pairwise_cosine",
]


# ---------------------------------------------------------------- coordinate-wise ops
#
# Each takes ``rows``: row numbers of G to compute on (default every row), read in place. The
# result is that of the op on ``G[rows]``, and weights stay one per row of G.
# ``return_nonfinite=True`` also returns bool[n] over G's rows: the rows read that hold NaN or Inf
# (under "drop", the rows the op dropped).

def _reduce(op, G, rows, nonfinite, backend, run, raw_op=None):
    """The policy over the checked row selection: (result list, nonfinite flags over G's rows)."""
    rows = check_rows(op, rows, G.shape[0], G.device)
    return coordinatewise(op, G, nonfinite, backend, run, raw_op=raw_op, rows=rows)


def _returned(op, outputs, nonfinite, return_nonfinite: bool):
    """An op's outputs (a tensor or a tuple), with the nonfinite flags appended when asked for."""
    return_nonfinite = check_bool(op, "return_nonfinite", return_nonfinite)
    if not return_nonfinite:
        return outputs
    return (*outputs, nonfinite) if isinstance(outputs, tuple) else (outputs, nonfinite)


# ---------------------------------------------------------------- sign votes

def sign_sum(G, *, rows=None, nonfinite="raise", return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""$s_j = \sum_i \operatorname{sign}(G_{ij})$, with sign(±0) = 0. Returns int32[d]."""
    G = check_matrix(G, "sign_sum")
    (out,), bad = _reduce("sign_sum", G, rows, nonfinite, backend, lambda fn, X, sel: fn(X, sel.rows))
    return _returned("sign_sum", out, bad, return_nonfinite)


def sign_agreement(G, *, rows=None, nonfinite="raise", return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""$|s_j| / n$, the Invariant Aggregator's AND-mask sign consistency, in G's dtype.

    n counts the rows read (the finite ones under ``nonfinite="drop"``).
    """
    G = check_matrix(G, "sign_agreement")

    def run(fn, X, sel):
        s, bad = fn(X, sel.rows)
        return (s.abs().to(acc_dtype(G.dtype)) / sel.n).to(G.dtype), bad

    (agreement,), bad = _reduce("sign_agreement", G, rows, nonfinite, backend, run, raw_op="sign_sum")
    return _returned("sign_agreement", agreement, bad, return_nonfinite)


# ---------------------------------------------------------------- order statistics

def _order_bounds(op, lo, hi, sel):
    lo = check_int(op, "lo", lo, 0, sel.n - 1, sel.why())
    hi = check_int(op, "hi", hi, lo + 1, sel.n, f" (lo={lo} < hi <= n){sel.why()}")
    return lo, hi


def order_mean(G, lo: int, hi: int, *, rows=None, nonfinite="raise", return_nonfinite=False,
               backend=None) -> torch.Tensor:
    r"""Per coordinate, the mean of the sorted values at positions lo..hi-1:
    $\frac{1}{hi-lo}\sum_{r=lo}^{hi-1} G_{(r),j}$ with $0 \le lo < hi \le n$.

    Only the kept values are added up, in float32 (float64 for float64 input).
    """
    op = "order_mean"
    G = check_matrix(G, op)

    def run(fn, X, sel):
        return fn(X, *_order_bounds(op, lo, hi, sel), sel.rows)

    (out,), bad = _reduce(op, G, rows, nonfinite, backend, run)
    return _returned(op, out, bad, return_nonfinite)


def _trim_bounds(op, trim, sel):
    trim = check_int(op, "trim", trim, 0, (sel.n - 1) // 2,
                      f": n - 2*trim must be >= 1 so that a value is left{sel.why()}")
    return trim, sel.n - trim


def trimmed_mean(G, trim: int, *, rows=None, nonfinite="raise", return_nonfinite=False,
                 backend=None) -> torch.Tensor:
    r"""Coordinate-wise trimmed mean: drop the ``trim`` smallest and largest values, average the rest.

    ``trim=0`` is the plain mean. Needs n - 2*trim >= 1 (on the finite rows under ``"drop"``).
    """
    op = "trimmed_mean"
    G = check_matrix(G, op)

    def run(fn, X, sel):
        return fn(X, *_trim_bounds(op, trim, sel), sel.rows)

    (out,), bad = _reduce(op, G, rows, nonfinite, backend, run, raw_op="order_mean")
    return _returned(op, out, bad, return_nonfinite)


def median(G, *, rows=None, nonfinite="raise", return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""Coordinate-wise median, numpy-style: the mean of the two middle values for even n
    (``torch.median`` returns the lower one)."""
    G = check_matrix(G, "median")

    def run(fn, X, sel):
        return fn(X, (sel.n - 1) // 2, sel.n // 2 + 1, sel.rows)

    (out,), bad = _reduce("median", G, rows, nonfinite, backend, run, raw_op="order_mean")
    return _returned("median", out, bad, return_nonfinite)


def closest_to_median_mean(G, beta: int, *, rows=None, nonfinite="raise", return_nonfinite=False,
                           backend=None) -> torch.Tensor:
    r"""Bulyan's coordinate step (El Mhamdi et al. 2018): per coordinate, the mean of the ``beta``
    values nearest the coordinate median (as ``median`` returns it), ties in distance to the row
    read first. Needs 1 <= beta <= n (the finite rows under ``"drop"``); G is read once."""
    op = "closest_to_median_mean"
    G = check_matrix(G, op)

    def run(fn, X, sel):
        return fn(X, check_int(op, "beta", beta, 1, sel.n, sel.why()), sel.rows)

    (out,), bad = _reduce(op, G, rows, nonfinite, backend, run)
    return _returned(op, out, bad, return_nonfinite)


# ---------------------------------------------------------------- invariant aggregation

def _min_votes(tau: float, n: int, strict: bool) -> int:
    """The least integer v with v/n > tau (>= tau if not strict), v/n evaluated in float64.

    Comparing integer vote counts keeps every backend bit-exact on the mask.
    """
    passes = (lambda v: v / n > tau) if strict else (lambda v: v / n >= tau)
    v = max(0, math.floor(tau * n) - 1)
    while v <= n and not passes(v):
        v += 1
    return v


def invariant(G, tau: float, trim: int, strict: bool = True, *, return_mask: bool = False, rows=None,
              nonfinite="raise", return_nonfinite=False, backend=None):
    r"""Invariant Aggregator (Wang et al. 2024): $\mathrm{out}_j = [a_j > \tau]\cdot\mathrm{trimmed\_mean}_j$
    with $a_j = |s_j|/n$ (``>=`` when ``strict=False``). G is read once.

    The paper uses trim = ceil(alpha*n) with alpha = 0.25; see
    ``aggregators.InvariantAggregator.official()`` for the authors' released-code variant.
    ``return_mask=True`` returns ``(out, mask)``.
    """
    op = "invariant"
    G = check_matrix(G, op)
    tau = check_float(op, "tau", tau, 0.0, 1.0)
    strict = check_bool(op, "strict", strict)

    def run(fn, X, sel):
        lo, hi = _trim_bounds(op, trim, sel)
        return fn(X, lo, hi, _min_votes(tau, sel.n, strict), sel.rows)

    (out, mask), bad = _reduce(op, G, rows, nonfinite, backend, run)
    return _returned(op, (out, mask) if return_mask else out, bad, return_nonfinite)


def invariant_ranks(G, tau: float, lo: int, hi: int, strict: bool = True, *, return_mask: bool = False, rows=None,
                    nonfinite="raise", return_nonfinite=False, backend=None):
    """``invariant`` with explicit kept ranks lo..hi-1 instead of a symmetric trim.

    The authors' released code keeps ranks int(0.45n)..int(0.55n)-1.
    """
    op = "invariant_ranks"
    G = check_matrix(G, op)
    tau = check_float(op, "tau", tau, 0.0, 1.0)
    strict = check_bool(op, "strict", strict)

    def run(fn, X, sel):
        a, b = _order_bounds(op, lo, hi, sel)
        return fn(X, a, b, _min_votes(tau, sel.n, strict), sel.rows)

    (out, mask), bad = _reduce(op, G, rows, nonfinite, backend, run, raw_op="invariant")
    return _returned(op, (out, mask) if return_mask else out, bad, return_nonfinite)


# ---------------------------------------------------------------- robust learning rate

def rlr(G, theta: int, weights=None, server_lr: float = 1.0, *, rows=None, nonfinite="raise",
        return_nonfinite=False, backend=None):
    r"""Robust learning rate (Ozdayi et al. 2021): $\mathrm{out}_j = \eta_j\,\bar g_j$ with
    $\bar g = \sum_i w_i G_i / \sum_i w_i$ and $\eta_j = +\mathrm{lr}$ if $|s_j| \ge \theta$ else
    $-\mathrm{lr}$. ``theta`` is a vote count in 0..n; ``weights`` are the clients' sample counts,
    one per row of G (finite, >= 0, not all 0 on the rows read; under torch.compile their values
    are taken as given)."""
    op = "rlr"
    G = check_matrix(G, op)
    w = None if weights is None else check_weights(op, weights, G.shape[0], G.device, acc_dtype(G.dtype),
                                                   check_values=values_checked())
    server_lr = check_multiplier(op, "server_lr", server_lr, G.dtype)

    def run(fn, X, sel):
        th = check_int(op, "theta", theta, 0, sel.n, f" (a vote count){sel.why()}")
        if w is None or sel.rows is None:
            return fn(X, w, th, server_lr, sel.rows)
        read = w.index_select(0, sel.rows)
        if values_checked() and float(read.sum()) <= 0:
            raise ValueError(f"{op}: the weights of the rows read sum to 0{sel.why()}")
        return fn(X, read, th, server_lr, sel.rows)

    (out,), bad = _reduce(op, G, rows, nonfinite, backend, run)
    return _returned(op, out, bad, return_nonfinite)


# ---------------------------------------------------------------- client statistics

@dataclass
class ClientStats:
    """Per-client statistics from one read of G, all float64."""
    norm: torch.Tensor                 # [n] L2 norm of each row
    sign_frac: torch.Tensor            # [n, 3] fractions > 0, == 0, < 0 inside the window
    dot: torch.Tensor | None           # [n] G_i . ref, if ref was given
    ref_norm: torch.Tensor | None      # scalar ||ref||, if ref was given
    ref_dist: torch.Tensor | None      # [n] ||G_i - ref||, if ref was given
    cosine: torch.Tensor | None        # [n] cos(G_i, ref), 0 where either is zero, if ref was given
    finite: torch.Tensor               # [n] bool, False for rows holding NaN/Inf

    def select(self, rows: torch.Tensor) -> "ClientStats":
        """The statistics of the given rows only (an index tensor)."""
        pick = (lambda t: None if t is None else t[rows])
        return ClientStats(pick(self.norm), pick(self.sign_frac), pick(self.dot), self.ref_norm, pick(self.ref_dist),
                           pick(self.cosine), self.finite[rows])


# A float64 norm within these bounds keeps the products of a dot with a norm within them in range.
_SAFE_NORMS = (2.0 ** -450, 2.0 ** 450)


def _cosines(G, ref, norm, dot, ref_norm, bad) -> torch.Tensor:
    r"""$\cos(G_i, \mathrm{ref})$ in float64 from the kernel's statistics, 0 where a norm is 0.

    For 16/32-bit input every term of the dot fits float64, so dot / norm / ref_norm is accurate.
    For float64 input a finite row or ref whose norm lies outside 2^(+-450) can have lost the dot to
    overflow or underflow; those rows (an attacker's 1e300 client) are recomputed here from scaled
    values (reference.cosine_to).
    """
    nonzero = (norm > 0) & (ref_norm > 0)
    cos = torch.where(nonzero, dot / norm / ref_norm, torch.zeros_like(dot)).clamp(-1.0, 1.0)
    if G.dtype != torch.float64:
        return cos
    lo, hi = _SAFE_NORMS
    ref_outside = (ref_norm < lo) | (ref_norm > hi)
    redo = nonzero & ~bad & ((norm < lo) | (norm > hi) | ref_outside)
    if bool(redo.any()):
        rows = redo.nonzero().flatten()
        cos[rows] = reference.cosine_to(G[rows].double(), ref.double())
    return cos


def client_stats(G, window: tuple[int, int] | None = None, ref=None, *, nonfinite="raise",
                 backend=None) -> ClientStats:
    r"""Row norms $\|G_i\|$, sign fractions inside the column window ``[start, start+length)``, and
    with ``ref`` the dot products $G_i\cdot\mathrm{ref}$, distances $\|G_i - \mathrm{ref}\|$ and
    cosines, in one read of G; all float64. Under ``"drop"`` non-finite rows get NaN.

    ``ref`` must be finite; under torch.compile that is not checked, and a NaN or Inf in it flows
    into the results that use it."""
    op = "client_stats"
    G = check_matrix(G, op)
    n, d = G.shape
    if window is None:
        start, length = 0, d
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise TypeError(f"{op}: window must be a (start, length) tuple or None, got {window!r}")
        start = check_int(op, "window start", window[0], 0, d - 1, f" for d={d}")
        length = check_int(op, "window length", window[1], 1, d - start, f" (start={start}, d={d})")
    if ref is not None:
        ref = check_vector(ref, op, "ref")
        if ref.shape[0] != d:
            raise ValueError(f"{op}: ref has length {ref.shape[0]}; it must have d={d} entries")
        if values_checked() and not bool(torch.isfinite(torch.stack(torch.aminmax(ref))).all()):
            # one pass: min and max propagate NaN
            raise ValueError(f"{op}: ref holds NaN or Inf; the reference update must be finite")
        ref = ref.to(device=G.device, dtype=G.dtype).contiguous()

    # everything is derived from the kernel's outputs before the policy reads the flags, so that
    # under "raise" and "drop" a compiled call leaves its graph there only
    def run(fn, X):
        norm, frac, dot, ref_norm, ref_dist, bad = fn(X, start, length, ref)
        if ref is None:
            return norm, frac, ~bad, bad
        ref_norm = ref_norm.reshape(())
        return norm, frac, dot, ref_norm, ref_dist, _cosines(G, ref, norm, dot, ref_norm, bad), ~bad, bad

    if ref is None:
        (norm, frac, finite), _ = per_client(op, G, nonfinite, backend, run, row_outputs=(0, 1))
        return ClientStats(norm, frac, None, None, None, None, finite)
    (norm, frac, dot, ref_norm, ref_dist, cosine, finite), _ = per_client(op, G, nonfinite, backend, run,
                                                                          row_outputs=(0, 1, 2, 4, 5))
    return ClientStats(norm, frac, dot, ref_norm, ref_dist, cosine, finite)


def _clip_bounds(op, max_norm, G, check_values: bool) -> torch.Tensor:
    """max_norm as the [n] bounds the kernels read, in G's arithmetic dtype: finite and >= 0.

    A tensor's values are read on the host only with ``check_values``.
    """
    n, acc = G.shape[0], acc_dtype(G.dtype)
    is_tensor = isinstance(max_norm, torch.Tensor)
    if is_tensor and max_norm.dim() > 0:
        if max_norm.shape != (n,):
            raise ValueError(f"{op}: max_norm has shape {tuple(max_norm.shape)}; it must be a scalar or ({n},)")
        bound = max_norm.detach().to(device=G.device, dtype=acc).contiguous()
        if check_values:
            low, high = torch.stack([bound.min(), bound.max()]).tolist()   # min and max propagate NaN
            if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
                raise ValueError(f"{op}: max_norm must be finite and >= 0 in {acc}, got min={low} max={high}")
        return bound
    if is_tensor and not check_values:
        return max_norm.detach().to(device=G.device, dtype=acc).expand(n).contiguous()
    value = check_float(op, "max_norm", float(max_norm) if is_tensor else max_norm, 0.0, dtype_max(G.dtype))
    return torch.full((n,), value, dtype=acc, device=G.device)


def clip_rows(G, max_norm, *, nonfinite="raise", return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""$G_i \cdot \min(1, c_i/\|G_i\|)$ with $c$ a scalar or an [n] tensor; a zero row stays zero.

    The bounds must be finite and >= 0; under torch.compile the values of a tensor ``max_norm``
    are not checked."""
    op = "clip_rows"
    G = check_matrix(G, op)
    bound = _clip_bounds(op, max_norm, G, check_values=values_checked())
    (out,), bad = per_client(op, G, nonfinite, backend, lambda fn, X: fn(X, bound), row_outputs=(0,))
    return _returned(op, out, bad, return_nonfinite)


# ---------------------------------------------------------------- top-k with error feedback

def _check_k(k, op):
    return check_int(op, "k", k, 0)


def _raise_vector_nonfinite(op, name, x):
    bad = (~torch.isfinite(x)).nonzero().flatten()[:10].tolist()
    raise ValueError(f"{op}: {name} holds NaN or Inf (first at indices {bad}); nothing was updated")


def topk_ef_step(u, error, momentum, k: int, rho: float, *, nonfinite="raise", backend=None):
    r"""SparseFed's server step with error feedback and momentum factor masking::

        momentum = rho * momentum + u;  error += momentum
        S = indices of the k largest |error| (ties to the lower index)
        values = error[S];  error[S] = 0;  momentum[S] = 0

    Updates ``error`` and ``momentum`` in place; returns ``(indices int64[k] ascending, values[k])``.
    Error feedback can legitimately outgrow the dtype (a client that keeps sending 3e38 in
    float32): momentum and error then saturate at the largest finite value of their dtype instead
    of becoming Inf. ``nonfinite="raise"`` (default) raises ``ValueError`` if u holds NaN/Inf,
    leaving the state untouched; ``"propagate"`` skips the check.
    """
    op = "topk_ef_step"
    check_policy(nonfinite, op, ("raise", "propagate"))
    u = check_vector(u, op, "u")
    for name, t in (("error", error), ("momentum", momentum)):
        check_vector(t, op, name)
        if t.shape != u.shape or t.dtype != u.dtype or t.device != u.device:
            raise ValueError(f"{op}: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; it must match u: "
                             f"{tuple(u.shape)} {u.dtype} on {u.device}")
    k = _check_k(k, op)
    rho = check_float(op, "rho", rho, 0.0, dtype_max(u.dtype))
    fn = _backend.raw_op(op, _backend.select(op, u.device, backend))
    e = error if error.is_contiguous() else error.contiguous()
    m = momentum if momentum.is_contiguous() else momentum.contiguous()
    idx, values, bad = fn(u.contiguous(), e, m, k, rho)
    if nonfinite == "raise" and bool(bad.any()):
        _raise_vector_nonfinite(op, "u", u)
    if e is not error:
        error.copy_(e)
    if m is not momentum:
        momentum.copy_(m)
    return idx, values


def topk_abs(x, k: int, *, nonfinite="raise", backend=None):
    """Indices (int64, ascending) and values of the k largest |x|; ties go to the lower index."""
    op = "topk_abs"
    check_policy(nonfinite, op, ("raise", "propagate"))
    x = check_vector(x, op, "x").contiguous()
    k = _check_k(k, op)
    fn = _backend.raw_op(op, _backend.select(op, x.device, backend))
    idx, values, bad = fn(x, k)
    if nonfinite == "raise" and bool(bad.any()):
        _raise_vector_nonfinite(op, "x", x)
    return idx, values


# ---------------------------------------------------------------- max-pool amplification

def check_pool_kernel(op: str, layout: Layout, d: int, kernel) -> int:
    """``kernel`` for max-pooling rows of length d over ``layout``. A kernel beyond every pooled
    segment's dimensions pools nothing: it is a mistake, not a setting (the paper's kernel 2 stays
    allowed on layouts of tiny parameters)."""
    dims = [max(s.rows, s.cols) for s in layout.segments_for(d) if s.pooled]
    why = f" (the largest dimension of a pooled segment of {layout!r} over d={d}, or 2)" if dims else ""
    return check_int(op, "kernel", kernel, 1, max(dims + [2]) if dims else None, why)


def maxpool_amplify(G, layout: Layout, kernel: int = 2, restore: bool = False, *, nonfinite="raise",
                    return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""AGRAmplifier's max-pooling (Gong et al. 2024): every pooled segment is viewed as a (rows, cols)
    matrix and max-pooled with a ``kernel x kernel`` window, stride ``kernel``, floor mode, over
    raw signed values; 0-D/1-D segments pass through. Returns [n, d_amp], or [n, d] with
    ``restore=True`` (each window's max at its first arg-max position, zeros elsewhere).
    One call handles every segment and client."""
    op = "maxpool_amplify"
    G = check_matrix(G, op)
    if not isinstance(layout, Layout):
        raise TypeError(f"{op}: layout must be a robustagg.layout.Layout (Layout.from_shapes or Layout.flat), "
                        f"got {type(layout).__name__}")
    restore = check_bool(op, "restore", restore)
    d = G.shape[1]
    kernel = check_pool_kernel(op, layout, d, kernel)
    table = layout.segment_table(d, kernel, restore)
    width = d if restore else layout.pooled_width(d, kernel)
    (out,), bad = per_client(op, G, nonfinite, backend, lambda fn, X: fn(X, table, kernel, restore, width),
                              row_outputs=(0,))
    return _returned(op, out, bad, return_nonfinite)


# ---------------------------------------------------------------- pairwise geometry

def pairwise_sqdist(G, *, nonfinite="raise", return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""$D_{ij} = \|G_i - G_j\|^2$, [n, n]; exactly 0 for identical rows, symmetric, zero diagonal."""
    G = check_matrix(G, "pairwise_sqdist")
    (out,), bad = per_client("pairwise_sqdist", G, nonfinite, backend, lambda fn, X: fn(X), (), matrix_outputs=(0,))
    return _returned("pairwise_sqdist", out, bad, return_nonfinite)


def pairwise_cosine(G, *, nonfinite="raise", return_nonfinite=False, backend=None) -> torch.Tensor:
    r"""$C_{ij} = \cos(G_i, G_j)$, [n, n]; exactly 1 for identical non-zero rows, 0 for zero rows."""
    G = check_matrix(G, "pairwise_cosine")
    (out,), bad = per_client("pairwise_cosine", G, nonfinite, backend, lambda fn, X: fn(X), (), matrix_outputs=(0,))
    return _returned("pairwise_cosine", out, bad, return_nonfinite)
