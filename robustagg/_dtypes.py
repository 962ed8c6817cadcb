"""The dtypes the ops take, and the dtype each one computes in (docs/ops.md)."""
import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a storage dtype: float64 for float64, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_max(dtype: torch.dtype) -> float:
    """The largest finite value of dtype's arithmetic dtype: the range of a scalar the kernels use."""
    return torch.finfo(acc_dtype(dtype)).max
