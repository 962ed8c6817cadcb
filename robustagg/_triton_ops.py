"""The ``triton`` backend: the Triton kernels of ``kernels/`` as ``torch.ops.robustagg_triton.*``.

Each op has exactly the raw signature of its schema in csrc/ops.cpp (``OPS`` maps the op name to
the registered op), including the ``nonfinite`` row flags found in the same pass. The launchers,
and which of them torch.compile can trace, are listed in the op table (robustagg/_registry.py).

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

import torch
import triton  # noqa: F401  (an ImportError here means: no triton backend)

from ._registry import RAW_OPS, RawOp, register


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

NAMESPACE = "robustagg_triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
TRACEABLE = _HAS_TRITON_OP and not INTERPRETED
_WRAP = torch.library.wrap_triton if TRACEABLE else (lambda kernel: kernel)


def _launcher(op: RawOp):
    """The op's launcher in robustagg.triton_kernels, called with the raw op's arguments."""
    module, name = op.triton_launcher.split(".")
    forward = getattr(importlib.import_module(f"robustagg.triton_kernels.{module}"), name)
    if not op.triton_traceable:
        return forward

    # By keyword: the dispatcher passes a trailing defaulted argument (rows=None) only when the
    # caller gave it, so a positional wrap_triton would land in its place.
    def launch(*args, **kwargs):
        return forward(*args, **kwargs, launch=_WRAP)

    launch.__signature__ = op.signature()   # triton_op infers the schema from it
    return launch


OPS = {name: register(NAMESPACE, op, _launcher(op), traceable=op.triton_traceable and TRACEABLE)
       for name, op in RAW_OPS.items() if op.triton_launcher}
