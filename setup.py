"""Build of robustagg's compiled extensions.

* ``robustagg._C``: schemas (csrc/ops.cpp) and the C++ CPU kernels, always built, with OpenMP.
* ``robustagg._C_cuda``: the CUDA kernels (csrc/cuda), built where torch has CUDA and nvcc exists.

Environment switches:
  ROBUSTAGG_FORCE_CUDA=1  build the CUDA extension even when auto-detection says no
  ROBUSTAGG_SKIP_CUDA=1   never build it
  ROBUSTAGG_NATIVE=1      compile for this machine's CPU (-march=native); the default build is portable
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if _flag("ROBUSTAGG_SKIP_CUDA"):
        return False, "ROBUSTAGG_SKIP_CUDA=1"
    if not _sources("csrc/cuda/*.cu"):
        return False, "no CUDA sources in csrc/cuda"
    if _flag("ROBUSTAGG_FORCE_CUDA"):
        return True, "ROBUSTAGG_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found"
    return True, "torch has CUDA and nvcc was found"


cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
if _flag("ROBUSTAGG_NATIVE"):
    cxx_flags.append("-march=native")
include_dirs = [os.path.join(ROOT, "csrc")]

ext_modules = [
    CppExtension(
        "robustagg._C",
        _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

build_cuda, why = _want_cuda()
print(f"robustagg: CUDA extension {'enabled' if build_cuda else 'disabled'} ({why})")
if build_cuda:
    ext_modules.append(
        CUDAExtension(
            "robustagg._C_cuda",
            _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--fmad=false", "-lineinfo",
                         "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90,code=sm_90",
                         # PTX as well, so that GPUs newer than sm_90 can JIT-compile the kernels
                         "-gencode=arch=compute_90,code=compute_90"],
            },
        )
    )

setup(
    packages=["robustagg", "robustagg.aggregators", "robustagg.bench", "robustagg.triton_kernels"],
    package_dir={"robustagg.triton_kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
