"""CUDA-on-CPU emulation of the csrc/cuda kernels, for tests/test_cuda_emulated.py.

No GPU and no CUDA toolkit are needed, only g++:

* ``build.py`` copies every csrc/cuda/*.cu, rewrites its ``<<<...>>>`` launches (and three
  other constructs, documented there) and compiles it with g++ -std=c++17 against the shim CUDA
  headers in ``include/`` (plain, AddressSanitizer or ThreadSanitizer build);
* ``runtime.cpp`` runs each launch block by block, every CUDA thread a fiber, with
  ``__syncthreads`` and the warp intrinsics waiting for their partners like the hardware and
  several fiber schedules, and stops a launch on a deadlock, divergent barrier or bad
  configuration with a message naming the kernel, block and thread;
* ``harness.cpp`` calls the real launchers of csrc/cuda/launch.h the way csrc/cuda/bindings.cpp
  does, behind ``extern "C"`` entry points, and ``library.py`` is their ctypes front end;
* ``mutate.py`` checks that the suite catches deliberately broken kernels.
"""
