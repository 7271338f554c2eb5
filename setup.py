"""Build of the fused KL kernels; everything else about the package is in pyproject.toml.

The CPU extension is built always, the CUDA one when a CUDA toolkit and a CUDA torch are found, but only when torch
is importable at build time (``pip install --no-build-isolation``, or the Dockerfile's builder stage).  An isolated
build (``pip wheel .``, ``python -m build``) ships the sources inside the package instead, and
``salt_megatron.kd.build`` compiles them just in time on first use.  SALT_MEGATRON_BUILD_EXT=0 builds none,
SALT_MEGATRON_BUILD_CUDA=0 skips CUDA.  Compiler flags and the kernel contract version come from
salt_megatron/kd/kernel_flags.py, shared with the just-in-time build.
"""

import os
import runpy
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "salt_megatron/csrc"  # relative: setuptools wants relative source paths
# read as a plain file so that building needs nothing of the package importable
KERNEL_FLAGS = runpy.run_path(os.path.join(HERE, "salt_megatron", "kd", "kernel_flags.py"))


def _fused_kernel_extensions():
    if os.environ.get("SALT_MEGATRON_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("salt_megatron: torch is not importable at build time (an isolated build): the kernel sources ship "
              "in the package and compile just in time on first use", file=sys.stderr)
        return [], {}
    flags = KERNEL_FLAGS
    ext_modules = [
        CppExtension(
            flags["INSTALLED_MODULE"]["cpu"],
            [f"{CSRC}/{name}" for name in flags["SOURCES"]["cpu"]],
            include_dirs=[CSRC],
            extra_compile_args=flags["CPU_CFLAGS"],
            extra_link_args=flags["CPU_LDFLAGS"],
        )
    ]
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    want_cuda = os.environ.get("SALT_MEGATRON_BUILD_CUDA", "1") != "0"
    if want_cuda and torch.version.cuda is not None and nvcc and os.path.exists(nvcc):
        # TORCH_CUDA_ARCH_LIST, when set, picks the architectures; else A100 and H100 code plus PTX for newer GPUs
        arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else flags["CUDA_ARCH_FLAGS"]
        ext_modules.append(
            CUDAExtension(
                flags["INSTALLED_MODULE"]["cuda"],
                [f"{CSRC}/{name}" for name in flags["SOURCES"]["cuda"]],
                include_dirs=[CSRC],
                extra_compile_args={"cxx": flags["CUDA_CXXFLAGS"], "nvcc": [*flags["CUDA_NVCC_FLAGS"], *arch]},
            )
        )
    elif want_cuda:
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found"
        print(f"salt_megatron: not building the CUDA kernel ({why})", file=sys.stderr)
    # ninja of this interpreter's environment (pip does not put the venv's bin/ on PATH)
    bindir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return ext_modules, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


_EXT_MODULES, _CMDCLASS = _fused_kernel_extensions()

setup(ext_modules=_EXT_MODULES, cmdclass=_CMDCLASS)
