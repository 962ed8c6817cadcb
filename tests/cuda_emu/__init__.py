"""CUDA-on-CPU emulation of the csrc/cuda kernels, for tests/test_cuda_emulated.py.

No GPU is needed: ``build.py`` copies every csrc/cuda/*.cu, rewrites its ``<<<...>>>`` launches
(and two other constructs, documented there) and compiles it with g++ against the shim CUDA
headers in ``include/``; ``runtime.cpp`` runs each launch block by block with one fiber per CUDA
thread; ``harness.cpp`` exposes the real launchers of csrc/cuda/launch.h to ctypes.
"""
