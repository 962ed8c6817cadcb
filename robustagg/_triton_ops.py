"""The ``triton`` backend: the Triton kernels of ``kernels/`` as ``torch.ops.robustagg_triton.*``.

Each op has exactly the raw signature of its schema in csrc/ops.cpp (``OPS`` maps the op name to
the registered op), including the ``nonfinite`` row flags found in the same pass.

Registration (docs/backends.md): ops whose launch configuration depends only on shapes use
``torch.library.triton_op`` with ``wrap_triton``, so that torch.compile can see the kernels. Under
``TRITON_INTERPRET=1`` (CPU tensors) that is not possible: ``triton_op`` uses the Python body as
the fake implementation, and the interpreter then runs the kernel on fake tensors and fails. There,
and for the ops whose output size or launch grid depends on data (top-k: empty outputs when the
input is not finite; max-pool: the grid comes from the segment table), the ops are plain
``torch.library.custom_op`` with the same fake implementations as ``robustagg::*``.

If triton cannot be imported, the ImportError propagates and robustagg reports the backend
unavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch
import triton  # noqa: F401  (an ImportError here means: no triton backend)

from . import _fake


def _load_kernels():
    """The kernels package as ``robustagg.triton_kernels``.

    An installed robustagg has it as a subpackage (setup.py's package_dir). A source checkout has
    it as ``<repo>/kernels`` beside this package; that copy is preferred when it exists, because
    an environment can also hold an editable-install finder that maps the name to another
    checkout's kernels.
    """
    name = "robustagg.triton_kernels"
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(source, "__init__.py")
    if not os.path.isfile(init):
        return importlib.import_module(name)
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == init:
        return loaded
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[source])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load_kernels()
from robustagg.triton_kernels import (client_stats as _stats, maxpool as _maxpool, order_stats as _order,  # noqa: E402
                                      pairwise as _pairwise, sign_votes as _signs, topk as _topk)

NAMESPACE = "robustagg_triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
TRACEABLE = _HAS_TRITON_OP and not INTERPRETED


def _launcher():
    return torch.library.wrap_triton if TRACEABLE else (lambda kernel: kernel)


def _register(name, fn, fake, mutates_args=(), traceable=True):
    qualified = f"{NAMESPACE}::{name}"
    if traceable and TRACEABLE:
        torch.library.triton_op(qualified, fn, mutates_args=mutates_args)
    else:
        op = torch.library.custom_op(qualified, fn, mutates_args=mutates_args)
        op.register_fake(fake)
    return getattr(getattr(torch.ops, NAMESPACE), name)


Tensors2 = tuple[torch.Tensor, torch.Tensor]
Tensors3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def sign_sum(G: torch.Tensor) -> Tensors2:
    return _signs.sign_sum_forward(G, _launcher())


def order_mean(G: torch.Tensor, lo: int, hi: int) -> Tensors2:
    return _order.order_mean_forward(G, lo, hi, _launcher())


def invariant(G: torch.Tensor, lo: int, hi: int, min_votes: int) -> Tensors3:
    return _order.invariant_forward(G, lo, hi, min_votes, _launcher())


def rlr(G: torch.Tensor, weights: Optional[torch.Tensor], theta: int, server_lr: float) -> Tensors2:
    return _signs.rlr_forward(G, weights, theta, server_lr, _launcher())


def client_stats(G: torch.Tensor, window_start: int, window_length: int, ref: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _stats.client_stats_forward(G, window_start, window_length, ref, _launcher())


def clip_rows(G: torch.Tensor, max_norm: torch.Tensor) -> Tensors2:
    return _stats.clip_rows_forward(G, max_norm, _launcher())


def topk_ef_step(u: torch.Tensor, error: torch.Tensor, momentum: torch.Tensor, k: int, rho: float) -> Tensors3:
    return _topk.topk_ef_step_forward(u, error, momentum, k, rho)


def topk_abs(x: torch.Tensor, k: int) -> Tensors3:
    return _topk.topk_abs_forward(x, k)


def maxpool_amplify(G: torch.Tensor, segments: torch.Tensor, kernel: int, restore: bool, out_width: int) -> Tensors2:
    return _maxpool.maxpool_amplify_forward(G, segments, kernel, restore, out_width)


def pairwise_sqdist(G: torch.Tensor) -> Tensors2:
    return _pairwise.pairwise_sqdist_forward(G, _launcher())


def pairwise_cosine(G: torch.Tensor) -> Tensors2:
    return _pairwise.pairwise_cosine_forward(G, _launcher())


OPS = {
    "sign_sum": _register("sign_sum", sign_sum, _fake._sign_sum),
    "order_mean": _register("order_mean", order_mean, _fake._order_mean),
    "invariant": _register("invariant", invariant, _fake._invariant),
    "rlr": _register("rlr", rlr, _fake._rlr),
    "client_stats": _register("client_stats", client_stats, _fake._client_stats),
    "clip_rows": _register("clip_rows", clip_rows, _fake._clip_rows),
    "topk_ef_step": _register("topk_ef_step", topk_ef_step, _fake._topk_ef_step,
                              mutates_args=("error", "momentum"), traceable=False),
    "topk_abs": _register("topk_abs", topk_abs, _fake._topk_abs, traceable=False),
    "maxpool_amplify": _register("maxpool_amplify", maxpool_amplify, _fake._maxpool_amplify, traceable=False),
    "pairwise_sqdist": _register("pairwise_sqdist", pairwise_sqdist, _fake._pairwise_sqdist),
    "pairwise_cosine": _register("pairwise_cosine", pairwise_cosine, _fake._pairwise_cosine),
}
