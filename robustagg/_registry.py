"""The op table: one row for each raw op declared in csrc/ops.cpp.

A row holds what the Python side knows about its op:

* ``fake``: the fake (meta) implementation, the outputs' shapes and dtypes, for torch.compile and
  ``torch.library.opcheck``;
* ``torch_backend``: the ``torch`` backend's implementation (robustagg/_torch_backend.py), whose
  annotations are the raw schema every Python registration uses;
* ``sample``: the arguments of a small representative call on a device, for the tests;
* ``triton_launcher``: the Triton launcher, ``"<module>.<function>"`` in ``robustagg.triton_kernels``
  (None where there is no Triton kernel), named and not imported here, so that robustagg imports
  without triton;
* ``triton_traceable``: whether the Triton op can be a ``torch.library.triton_op``, which
  torch.compile traces into: its launch grid must depend on shapes only, and its launcher then
  takes ``wrap_triton`` as its ``launch=`` keyword. The others are opaque ``custom_op``s;
* ``mutates``: the arguments the op writes in place;
* ``native``: the dispatch keys where robustagg._C and robustagg._C_cuda are expected to hold a kernel.

Each backend registers from this table: ``register_native_fakes`` the fakes of the compiled ops
``torch.ops.robustagg.*``, this module the torch backend as ``torch.ops.robustagg_torch.*``, and
robustagg/_triton_ops.py the Triton launchers as ``torch.ops.robustagg_triton.*``. A new op needs
one row here besides its implementations (docs/contributing.md).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from . import _torch_backend
from .layout import Layout

TORCH_NAMESPACE = "robustagg_torch"


@dataclass(frozen=True)
class RawOp:
    name: str
    fake: Callable
    torch_backend: Callable
    sample: Callable[[torch.device], tuple]
    triton_launcher: str | None = None
    triton_traceable: bool = True
    mutates: tuple[str, ...] = ()
    native: tuple[str, ...] = ("CPU", "CUDA")

    def signature(self) -> inspect.Signature:
        """The raw op's Python signature, its annotations resolved."""
        return inspect.signature(self.torch_backend, eval_str=True)

    def schema(self) -> str:
        """The raw schema without the op's name, as ``torch.library.custom_op`` takes it."""
        return torch.library.infer_schema(self.torch_backend, mutates_args=self.mutates)


# ---------------------------------------------------------------- fake implementations

def _rows_flag(G, rows=None):
    return G.new_empty(G.shape[0] if rows is None else rows.shape[0], dtype=torch.bool)


def _sign_sum(G, rows=None):
    return G.new_empty(G.shape[1], dtype=torch.int32), _rows_flag(G, rows)


def _order_mean(G, lo, hi, rows=None):
    return G.new_empty(G.shape[1]), _rows_flag(G, rows)


def _closest_to_median_mean(G, beta, rows=None):
    return G.new_empty(G.shape[1]), _rows_flag(G, rows)


def _invariant(G, lo, hi, min_votes, rows=None):
    return G.new_empty(G.shape[1]), G.new_empty(G.shape[1], dtype=torch.bool), _rows_flag(G, rows)


def _rlr(G, weights, theta, server_lr, rows=None):
    return G.new_empty(G.shape[1]), _rows_flag(G, rows)


def _client_stats(G, window_start, window_length, ref):
    n, f64 = G.shape[0], torch.float64
    with_ref = 0 if ref is None else 1
    return (G.new_empty(n, dtype=f64), G.new_empty(n, 3, dtype=f64), G.new_empty(n * with_ref, dtype=f64),
            G.new_empty(with_ref, dtype=f64), G.new_empty(n * with_ref, dtype=f64), _rows_flag(G))


def _clip_rows(G, max_norm):
    return torch.empty_like(G), _rows_flag(G)


def _topk_ef_step(u, error, momentum, k, rho):
    kk = min(k, u.shape[0])
    return u.new_empty(kk, dtype=torch.int64), u.new_empty(kk), u.new_empty(1, dtype=torch.bool)


def _topk_abs(x, k):
    kk = min(k, x.shape[0])
    return x.new_empty(kk, dtype=torch.int64), x.new_empty(kk), x.new_empty(1, dtype=torch.bool)


def _maxpool_amplify(G, segments, kernel, restore, out_width):
    return G.new_empty(G.shape[0], out_width), _rows_flag(G)


def _pairwise(G):
    return G.new_empty(G.shape[0], G.shape[0], dtype=torch.float64), _rows_flag(G)


# ---------------------------------------------------------------- sample calls
#
# 7 clients, 40 coordinates in float32, drawn from a fixed seed: every call builds the same values,
# so that an op that writes its arguments can be run twice on equal inputs.

def _randn(device, *shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _G(device):
    return _randn(device, 7, 40)


def _u(device):
    return _randn(device, 40, seed=1)


def _maxpool_sample(device):
    layout = Layout.from_shapes([(4, 5), (20,)])
    return _G(device), layout.segment_table(40, 2, False), 2, False, layout.pooled_width(40, 2)


# ---------------------------------------------------------------- the table

RAW_OPS = {op.name: op for op in (
    RawOp("sign_sum", _sign_sum, _torch_backend.sign_sum, lambda device: (_G(device),),
          triton_launcher="sign_votes.sign_sum_forward"),
    RawOp("order_mean", _order_mean, _torch_backend.order_mean, lambda device: (_G(device), 1, 6),
          triton_launcher="order_stats.order_mean_forward"),
    RawOp("closest_to_median_mean", _closest_to_median_mean, _torch_backend.closest_to_median_mean,
          lambda device: (_G(device), 3), triton_launcher="order_stats.closest_to_median_mean_forward"),
    RawOp("invariant", _invariant, _torch_backend.invariant, lambda device: (_G(device), 1, 6, 4),
          triton_launcher="order_stats.invariant_forward"),
    RawOp("rlr", _rlr, _torch_backend.rlr, lambda device: (_G(device), _randn(device, 7, seed=2).abs(), 3, 0.5),
          triton_launcher="sign_votes.rlr_forward"),
    RawOp("client_stats", _client_stats, _torch_backend.client_stats, lambda device: (_G(device), 3, 10, _u(device)),
          triton_launcher="client_stats.client_stats_forward"),
    RawOp("clip_rows", _clip_rows, _torch_backend.clip_rows,
          lambda device: (_G(device), torch.full((7,), 6.0, device=device)),
          triton_launcher="client_stats.clip_rows_forward"),
    # top-k returns empty outputs for a non-finite input, and max-pool takes its grid from the
    # segment table on the host: neither launch depends on shapes alone
    RawOp("topk_ef_step", _topk_ef_step, _torch_backend.topk_ef_step,
          lambda device: (_u(device), _randn(device, 40, seed=3), _randn(device, 40, seed=4), 5, 0.5),
          triton_launcher="topk.topk_ef_step_forward", triton_traceable=False, mutates=("error", "momentum")),
    RawOp("topk_abs", _topk_abs, _torch_backend.topk_abs, lambda device: (_u(device), 5),
          triton_launcher="topk.topk_abs_forward", triton_traceable=False),
    RawOp("maxpool_amplify", _maxpool_amplify, _torch_backend.maxpool_amplify, _maxpool_sample,
          triton_launcher="maxpool.maxpool_amplify_forward", triton_traceable=False),
    RawOp("pairwise_sqdist", _pairwise, _torch_backend.pairwise_sqdist, lambda device: (_G(device),),
          triton_launcher="pairwise.pairwise_sqdist_forward"),
    RawOp("pairwise_cosine", _pairwise, _torch_backend.pairwise_cosine, lambda device: (_G(device),),
          triton_launcher="pairwise.pairwise_cosine_forward"),
)}


# ---------------------------------------------------------------- registration

def register(namespace: str, op: RawOp, fn: Callable, traceable: bool = False):
    """``fn`` as ``torch.ops.<namespace>.<op>``, with the op's raw schema and fake implementation.

    ``traceable`` registers a Triton launcher through ``torch.library.triton_op``, whose Python
    body torch.compile traces in place of a fake implementation.
    """
    qualified = f"{namespace}::{op.name}"
    if traceable:
        torch.library.triton_op(qualified, fn, mutates_args=op.mutates, schema=op.schema())
    else:
        torch.library.custom_op(qualified, fn, mutates_args=op.mutates, schema=op.schema()).register_fake(op.fake)
    return getattr(getattr(torch.ops, namespace), op.name)


def native_ops() -> list[RawOp]:
    """The rows whose op robustagg._C defines, once it is imported (a build older than the table
    lacks the newest ops; they then run on the torch backend)."""
    return [op for op in RAW_OPS.values() if op.native and hasattr(torch.ops.robustagg, op.name)]


def register_native_fakes() -> None:
    """The fake implementations of the compiled ops ``torch.ops.robustagg.*``."""
    for op in native_ops():
        torch.library.register_fake(f"robustagg::{op.name}")(op.fake)


for _op in RAW_OPS.values():
    register(TORCH_NAMESPACE, _op, _op.torch_backend)
