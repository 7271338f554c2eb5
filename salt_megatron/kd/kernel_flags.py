"""How the fused kernels in ``csrc/`` are compiled: the one home of their flags and contract version.

Read by ``setup.py`` (ahead-of-time build, through ``runpy`` so that no part of the package is imported) and by
``salt_megatron.kd.build`` (just-in-time build), so both produce the same binaries.  Standard library only.
"""

# The kernel contract's version: passed to the compiler as SALT_KL_CONTRACT_VERSION, exported by each compiled
# module as CONTRACT_VERSION; a compiled module of another version is stale and is not used.  Bump it whenever the
# contract (csrc/salt_kl.h) or the bindings' signatures change.
CONTRACT_VERSION = 5
DEFINES = [f"-DSALT_KL_CONTRACT_VERSION={CONTRACT_VERSION}"]

# kind -> the sources, relative to csrc/
SOURCES = {
    "cpu": ("kl_div_cpu_binding.cpp", "kl_div_cpu.cpp", "topk_cpu.cpp"),
    "cuda": ("kl_div_cuda_binding.cpp", "kl_div_cuda.cu"),
}
# kind -> the module name of the ahead-of-time build (inside the package) and of the just-in-time build
INSTALLED_MODULE = {"cpu": "salt_megatron._kl_cpu", "cuda": "salt_megatron._kl_cuda"}
JIT_MODULE = {"cpu": "salt_megatron_kl_cpu", "cuda": "salt_megatron_kl_cuda"}

# No -march: one binary for every x86-64 CPU (the CPU kernel picks its AVX-512 / AVX2 / SSE2 variant at load time).
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", *DEFINES]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CXXFLAGS = ["-O3", *DEFINES]
CUDA_NVCC_FLAGS = ["-O3", "-lineinfo", *DEFINES]
# Architectures of the ahead-of-time CUDA build when TORCH_CUDA_ARCH_LIST is not set: A100 and H100 code, plus PTX
# that newer GPUs compile at load time.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
