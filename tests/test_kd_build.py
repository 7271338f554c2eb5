"""Building and finding the fused kernels: kernel selection, clear messages when a kernel is missing or stale, one
home for the compiler flags and contract version (salt_megatron/kd/kernel_flags.py, read by setup.py and the JIT
build), the CUDA sources compiled with nvcc here (no GPU needed), the CUDA binding syntax-checked on the host."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from salt_megatron.kd import TORCH_KERNELS, build, fused_kernels, kernel_flags, select_kernels, vocab_parallel_kl_div
from tests.kd_cases import fused_kernels_on

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "salt_megatron" / "csrc"


def test_kernel_selection():
    k = fused_kernels_on("cpu")
    assert k.name == "fused-cpu" and k.supports_row_index and k.supports_split_grad
    assert fused_kernels.kernels_for(torch.device("cpu")) is k  # cached
    assert fused_kernels.kernels_for("meta") is None
    with pytest.raises(RuntimeError, match="meta"):
        fused_kernels.kernels_for("meta", required=True)
    assert select_kernels("auto", torch.device("cpu")) is k  # "auto" takes the built kernel
    assert select_kernels("torch", torch.device("cpu")) is TORCH_KERNELS
    with pytest.raises(ValueError, match="impl must be one of"):
        select_kernels("cuda", torch.device("cpu"))


def test_both_kernel_sets_declare_the_protocol():
    from salt_megatron.kd import KernelSet

    for kernels in (TORCH_KERNELS, fused_kernels_on("cpu")):
        assert isinstance(kernels, KernelSet), kernels
        assert isinstance(kernels.supports_row_index, bool) and isinstance(kernels.supports_split_grad, bool)


def test_unavailable_kernel_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(build, "_loaded", {"cpu": (None, "no compiler (test)")})
    monkeypatch.setattr(fused_kernels, "_kernels", {})
    assert fused_kernels.kernels_for("cpu") is None
    assert vocab_parallel_kl_div(torch.zeros(2, 4), torch.zeros(2, 4), impl="auto").shape == (2,)  # PyTorch path
    with pytest.raises(RuntimeError, match=r"^[^\n]*no compiler \(test\); impl='torch' works without it[^\n]*$"):
        vocab_parallel_kl_div(torch.zeros(2, 4), torch.zeros(2, 4), impl="fused")


def test_stale_installed_extension_is_refused(monkeypatch):
    module, how = build.import_installed("cpu")
    if module is None:
        pytest.skip(f"no installed CPU extension: {how}")
    assert module.CONTRACT_VERSION == kernel_flags.CONTRACT_VERSION
    monkeypatch.setattr(kernel_flags, "CONTRACT_VERSION", kernel_flags.CONTRACT_VERSION + 1)
    module, how = build.import_installed("cpu")
    assert module is None and "stale" in how


def test_setup_py_takes_every_flag_from_kernel_flags():
    """One home for flags and contract version: setup.py names none itself, and the JIT build passes the same."""
    text = (ROOT / "setup.py").read_text()
    assert "kernel_flags.py" in text
    assert not re.search(r'"-O3"|"-fopenmp"|gencode|CONTRACT_VERSION|kl_div_cpu|kl_div_cuda', text)
    assert "-DSALT_KL_CONTRACT_VERSION=" + str(kernel_flags.CONTRACT_VERSION) in kernel_flags.CPU_CFLAGS
    assert all(d in flags for d in kernel_flags.DEFINES
               for flags in (kernel_flags.CUDA_CXXFLAGS, kernel_flags.CUDA_NVCC_FLAGS))
    assert "#define SALT_KL_CONTRACT_VERSION" not in (CSRC / "salt_kl.h").read_text()


def test_cuda_sources_include_no_torch_header():
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', (CSRC / "kl_div_cuda.cu").read_text(), re.M)
    assert includes and not [h for h in includes if re.match(r"(torch|ATen|c10|caffe2|pybind11)/", h)], includes
    # the binding (and the helper header it shares with the CPU binding) include torch/extension.h and nothing CUDA
    for name in ("kl_div_cuda_binding.cpp", "binding_common.h"):
        found = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', (CSRC / name).read_text(), re.M)
        assert "torch/extension.h" in found and set(found) <= {"torch/extension.h", "salt_kl.h", "binding_common.h"}, found


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernel_compiles_with_nvcc(arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}",
           str(CSRC / "kl_div_cuda.cu"), "-o", str(tmp_path / f"kl_div_cuda_sm{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / f"kl_div_cuda_sm{arch}.o").stat().st_size > 0


def _host_syntax_check(defines):
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=salt_check", *defines,
           str(CSRC / "kl_div_cuda_binding.cpp")]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cuda_binding_compiles_with_the_host_compiler():
    """The CUDA binding includes only torch/extension.h, so a CPU torch can syntax-check it (no GPU build here);
    without the contract version from kernel_flags it refuses to compile."""
    result = _host_syntax_check(kernel_flags.DEFINES)
    assert result.returncode == 0, result.stderr[-3000:]
    without = _host_syntax_check(["-Wfatal-errors"])  # stops at the #error, before parsing torch's headers
    assert without.returncode != 0 and "SALT_KL_CONTRACT_VERSION is not defined" in without.stderr
