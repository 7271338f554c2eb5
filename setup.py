"""salt_megatron: SALT pretraining (small LM helps a large LM) on megatron-core and DeepSpeed."""

import os
import runpy
import shutil
import sys

from setuptools import find_packages, setup

# the kernels' compiler flags and contract version, shared with the just-in-time build (salt_megatron.kd.build);
# read as a plain file so that building needs nothing of the package importable
KERNEL_FLAGS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "salt_megatron", "kd",
                                           "kernel_flags.py"))


def _fused_kernel_extensions():
    """The fused KL kernels (csrc/): the CPU extension always, the CUDA one when a CUDA toolkit and a CUDA torch
    are found.  SALT_MEGATRON_BUILD_EXT=0 builds none, SALT_MEGATRON_BUILD_CUDA=0 skips CUDA.  Without torch at
    build time (build isolation) nothing is built; salt_megatron.kd.build then compiles the sources just in time."""
    if os.environ.get("SALT_MEGATRON_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("salt_megatron: torch is not importable at build time; skipping the fused kernels", file=sys.stderr)
        return [], {}
    flags = KERNEL_FLAGS
    ext_modules = [
        CppExtension(
            flags["INSTALLED_MODULE"]["cpu"],
            [f"csrc/{name}" for name in flags["SOURCES"]["cpu"]],
            include_dirs=["csrc"],
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
                [f"csrc/{name}" for name in flags["SOURCES"]["cuda"]],
                include_dirs=["csrc"],
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

setup(
    name="salt_megatron",
    version="0.1.0",
    description="SALT: efficient LLM pretraining with a small-LM teacher (KD + data selection) on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["salt_megatron", "salt_megatron.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",
        "numpy",
        "sentencepiece",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "tools": ["tqdm", "pyyaml", "matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["salt-megatron=salt_megatron.cli:main"]},
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
)
