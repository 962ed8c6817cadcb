"""Backend discovery and selection (docs/backends.md).

Four backends run the raw ops, each with the signatures declared in csrc/ops.cpp:

* ``cpu``    - the C++ kernels in ``robustagg._C`` (CPU tensors);
* ``cuda``   - the CUDA C++ kernels in ``robustagg._C_cuda`` (CUDA tensors);
* ``triton`` - the Triton kernels in ``robustagg.triton_kernels`` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``);
* ``torch``  - the pure-PyTorch reference (any device).

Automatic selection: a CUDA tensor uses cuda, else triton, else torch; a CPU tensor uses cpu, else
torch. ``ROBUSTAGG_BACKEND`` forces one backend for the process. An explicit backend that cannot
run a call raises ``BackendUnavailableError`` with the reason; it never falls back silently.

What was built is found once, at import; after that selection reads only Python values, so that
torch.compile traces it away (a dispatcher query returns a non-tensor and would break the graph).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import _registry
from ._errors import BackendUnavailableError

BACKENDS = ("cpu", "cuda", "triton", "torch")

_C_error = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.robustagg.* and the CPU kernels)
except ImportError as exc:  # pragma: no cover - a broken install
    _C_error = f"robustagg._C failed to import ({exc}); reinstall with `pip install --no-build-isolation -e .`"

_C_cuda_error = None
if importlib.util.find_spec("robustagg._C_cuda") is None:
    _C_cuda_error = ("robustagg was not compiled with CUDA (it is built where torch has CUDA and nvcc "
                     "is found, or with ROBUSTAGG_FORCE_CUDA=1)")
else:
    try:
        from . import _C_cuda  # noqa: F401  (registers the CUDA kernels)
    except ImportError as exc:
        _C_cuda_error = f"robustagg._C_cuda failed to import: {exc}"

# (op, dispatch key) of every kernel that robustagg._C and robustagg._C_cuda registered
_NATIVE = frozenset()
if _C_error is None:
    _registry.register_native_fakes()
    _NATIVE = frozenset((op.name, key) for op in _registry.native_ops() for key in op.native
                        if torch._C._dispatch_has_kernel_for_dispatch_key(f"robustagg::{op.name}", key))

_triton_module = None
_triton_error = None


def _load_triton():
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("robustagg._triton_ops")
        except ImportError as exc:
            _triton_error = f"Triton kernels unavailable: {exc}"
    return _triton_module


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_native_kernel(op: str, dispatch_key: str) -> bool:
    return (op, dispatch_key) in _NATIVE


def _unavailable_reason(backend: str, op: str | None, device: torch.device | None):
    """Why ``backend`` cannot run ``op`` on ``device``, or None if it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if _C_error:
            return _C_error
        if device is not None and device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got a tensor on {device}"
        if op is not None and not _has_native_kernel(op, "CPU"):
            return f"the cpu backend has no kernel for {op} in this build"
        return None
    if backend == "cuda":
        if _C_cuda_error:
            return _C_cuda_error
        if device is not None and device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got a tensor on {device}"
        if op is not None and not _has_native_kernel(op, "CUDA"):
            return f"the cuda backend has no kernel for {op} in this build"
        return None
    if backend == "triton":
        module = _load_triton()
        if module is None:
            return _triton_error
        if device is not None and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            return (f"the triton backend takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                    f"got a tensor on {device}")
        if op is not None and op not in module.OPS:
            return f"the triton backend has no kernel for {op}"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def available_backends() -> dict[str, str]:
    """Each backend mapped to ``"available"`` or the reason it is not."""
    out = {}
    for name in BACKENDS:
        reason = _unavailable_reason(name, None, None)
        if name == "cuda" and reason is None and not torch.cuda.is_available():
            reason = "built, but torch sees no CUDA device"
        if name == "triton" and reason is None and not (torch.cuda.is_available() or triton_interpreted()):
            reason = "importable, but there is no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
        out[name] = reason or "available"
    return out


def select(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs ``op`` for a tensor on ``device``."""
    if backend is None:
        backend = os.environ.get("ROBUSTAGG_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; choose one of {BACKENDS} or None")
        reason = _unavailable_reason(backend, op, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {reason}")
        return backend
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        if _unavailable_reason(name, op, device) is None:
            return name
    return "torch"


def raw_op(op: str, backend: str):
    """The raw-op callable of ``backend`` (signatures as in csrc/ops.cpp)."""
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.robustagg, op)
    if backend == "triton":
        return _load_triton().OPS[op]
    return getattr(getattr(torch.ops, _registry.TORCH_NAMESPACE), op)
