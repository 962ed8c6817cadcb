"""robustagg: compiled kernels for robust federated-learning aggregation.

The ops are in ``robustagg.ops`` (also re-exported here), the pure-PyTorch references in
``robustagg.reference``, flattening of client updates in ``robustagg.layout``, the defenses in
``robustagg.aggregators``, the attacks in ``robustagg.attacks`` and the update convention
(deltas, ``apply_update``) in ``robustagg.fl``. The documentation is in docs/ (docs/README.md).
"""
from ._backend import BACKENDS, available_backends
from ._errors import BackendUnavailableError, NonFiniteUpdateError
from .layout import Layout, flatten
from . import ops
from .ops import *  # noqa: F401,F403  (every public op: ops.__all__)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "available_backends", "BackendUnavailableError", "NonFiniteUpdateError", "Layout", "flatten",
    *ops.__all__,
]
