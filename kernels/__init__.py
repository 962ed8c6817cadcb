"""Triton kernels of robustagg, one module per op family; installed as ``robustagg.triton_kernels``."""
