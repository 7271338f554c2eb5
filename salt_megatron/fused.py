"""Loader of the fused KL-divergence kernels (csrc/) behind ``vocab_parallel_kl_div(..., impl="fused"|"auto")``.

Two extensions implement the kernel contract of :mod:`salt_megatron.kd_loss` (``row_stats`` / ``student_grad``):

* ``salt_megatron._kl_cpu``: C++ / OpenMP, built by ``pip install -e .`` always;
* ``salt_megatron._kl_cuda``: CUDA, built by ``pip install -e .`` when a CUDA toolkit and a CUDA torch are found.

Where the installed extension is missing (or was built against another torch), the sources in ``csrc/`` are
compiled just in time with ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler, plus nvcc for CUDA) into
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/salt_megatron/torch_extensions``; ``SALT_MEGATRON_NO_JIT=1`` turns that
off.  The result (module or the reason there is none) is cached per process.

Both kernels take fp32, bf16 and fp16 logits (student and teacher may differ) and an optional ``row_index`` (the
rows to process, so that rows masked out cost nothing and are not copied).  fp64 inputs (gradcheck) and other
unusual layouts go to the PyTorch kernels of :mod:`salt_megatron.kd_loss`; ``kernels.handles(x)`` says which.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

import torch

from salt_megatron import kd_loss

__all__ = [
    "FusedKernels",
    "kernels_for",
    "cpu_kernel_available",
    "cuda_kernel_available",
    "kernel_status",
    "load_extension",
]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = {
    "cpu": ("kl_div_cpu_binding.cpp", "kl_div_cpu.cpp"),
    "cuda": ("kl_div_cuda_binding.cpp", "kl_div_cuda.cu"),
}
_INSTALLED = {"cpu": "salt_megatron._kl_cpu", "cuda": "salt_megatron._kl_cuda"}
_JIT_NAME = {"cpu": "salt_megatron_kl_cpu", "cuda": "salt_megatron_kl_cuda"}
# The kernel contract's version (csrc/salt_kl.h: SALT_KL_CONTRACT_VERSION); a compiled module of another is stale.
CONTRACT_VERSION = 3
# Compiler flags, the same as setup.py's.  No -march: one binary for every x86-64 CPU (the CPU kernel picks its
# AVX-512 / AVX2 / SSE2 variant at load time).
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CXXFLAGS = ["-O3"]
CUDA_NVCC_FLAGS = ["-O3", "-lineinfo"]
# Kernels accept these dtypes; anything else (fp64) uses the PyTorch kernels.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.RLock()
_loaded: dict[str, tuple[object | None, str]] = {}  # kind -> (module or None, how it was loaded / why not)
_kernels: dict[str, FusedKernels] = {}


def _jit_disabled() -> bool:
    return os.environ.get("SALT_MEGATRON_NO_JIT", "0").strip().lower() not in ("", "0", "false", "no")


def _build_directory(kind: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "salt_megatron" / "torch_extensions"
    cuda = f"_cu{torch.version.cuda.replace('.', '')}" if kind == "cuda" and torch.version.cuda else ""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}{cuda}"
    path = base / tag / _JIT_NAME[kind]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _jit_build(kind: str, verbose: bool = False):
    from torch.utils import cpp_extension

    sources = [str(_CSRC / name) for name in _SOURCES[kind]]
    if kind == "cpu":
        return cpp_extension.load(
            _JIT_NAME[kind], sources, extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS,
            extra_include_paths=[str(_CSRC)], build_directory=str(_build_directory(kind)), verbose=verbose,
            with_cuda=False,
        )
    return cpp_extension.load(
        _JIT_NAME[kind], sources, extra_cflags=CUDA_CXXFLAGS, extra_cuda_cflags=CUDA_NVCC_FLAGS,
        extra_include_paths=[str(_CSRC)], build_directory=str(_build_directory(kind)), verbose=verbose,
        with_cuda=True,
    )


def _import_installed(kind: str):
    """The extension built by ``pip install -e .`` / ``setup.py build_ext``, or (None, why not)."""
    try:
        module = importlib.import_module(_INSTALLED[kind])
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{_INSTALLED[kind]} is not importable ({exc})"
    version = getattr(module, "CONTRACT_VERSION", None)
    if version != CONTRACT_VERSION:
        return None, (f"{_INSTALLED[kind]} is stale (kernel contract {version}, expected {CONTRACT_VERSION}; rebuild "
                      f"with `pip install --no-build-isolation -e .`)")
    return module, f"installed extension {_INSTALLED[kind]}"


def load_extension(kind: str, verbose: bool = False):
    """The compiled module for ``kind`` ("cpu" or "cuda"), or None; cached.  See :func:`kernel_status` for why."""
    if kind not in _SOURCES:
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        if kind in _loaded:
            return _loaded[kind][0]
        module, how = _import_installed(kind)
        if module is None:
            installed_error = how
            if kind == "cuda" and torch.version.cuda is None:
                how = f"{installed_error}; this torch ({torch.__version__}) has no CUDA"
            elif _jit_disabled():
                how = f"{installed_error}; JIT build disabled by SALT_MEGATRON_NO_JIT"
            elif not all((_CSRC / name).is_file() for name in _SOURCES[kind]):
                how = f"{installed_error}; the sources are not in {_CSRC} for a JIT build"
            elif kind == "cuda" and _cuda_home() is None:
                how = f"{installed_error}; no CUDA toolkit (nvcc; set CUDA_HOME) for a JIT build"
            else:
                try:
                    module = _jit_build(kind, verbose=verbose)
                    how = f"JIT build from {_CSRC} in {_build_directory(kind)}"
                except Exception as jit_exc:  # noqa: BLE001 - any build failure means "not available"
                    lines = str(jit_exc).strip().splitlines()
                    detail = " | ".join(lines[-12:]) if lines else type(jit_exc).__name__
                    how = f"{installed_error}; the JIT build from {_CSRC} failed: {detail}"
        _loaded[kind] = (module, how)
        return module


def kernel_status() -> dict[str, str]:
    """How each extension was loaded, or why it is not available (loads them if not tried yet)."""
    status = {}
    for kind in ("cpu", "cuda"):
        module = load_extension(kind)
        status[kind] = ("available: " if module is not None else "unavailable: ") + _loaded[kind][1]
    return status


def cpu_kernel_available() -> bool:
    return load_extension("cpu") is not None


def cuda_kernel_available() -> bool:
    """True when the CUDA extension is loaded and a GPU is visible."""
    return torch.cuda.is_available() and load_extension("cuda") is not None


class FusedKernels:
    """The fused implementation of the two local kernels of :mod:`salt_megatron.kd_loss`, for one device type.

    Compared with the PyTorch kernels, both methods also take ``row_index`` (int64 ``[M]``, on the logits'
    device): only those rows are read (stats row i belongs to logits row ``row_index[i]``; the row vectors
    ``max_s``, ``log_sum_s``, ``max_t``, ``log_sum_t``, ``grad_rows`` have M entries) and only those rows of
    ``out`` are written.  Out-of-range rows are refused before any kernel runs, unless ``trusted_rows=True``
    (the caller made ``row_index`` itself, e.g. from a mask: the check would synchronise a GPU).
    """

    supports_row_index = True

    def __init__(self, device_type: str, module):
        self.device_type = device_type
        # student_grad takes teacher_grad_rows (CE folded into the KD gradient pass): both kernels do
        self.supports_split_grad = True
        self.name = f"fused-{device_type}"
        self._module = module

    def __repr__(self) -> str:
        return f"FusedKernels({self.device_type!r})"

    def handles(self, *tensors: torch.Tensor) -> bool:
        """Whether the compiled kernel takes these tensors (else the PyTorch kernels run: fp64, odd layouts)."""
        return all(
            x.device.type == self.device_type and x.dtype in _KERNEL_DTYPES and x.dim() == 2
            and (x.shape[1] <= 1 or x.stride(1) == 1)
            for x in tensors
        )

    def _call(self, fn, device: torch.device, *args):
        if self.device_type == "cuda":
            with torch.cuda.device(device):
                return fn(*args, torch.cuda.current_stream(device).cuda_stream)
        return fn(*args)

    @staticmethod
    def _check_row_index(row_index, num_rows):
        # checked here rather than in C++: an exception thrown across the extension boundary is where a torch
        # built with another toolchain can crash (seen on the GPU machine's torch 2.11)
        if row_index is not None and row_index.numel() and (
            int(row_index.min()) < 0 or int(row_index.max()) >= num_rows
        ):
            raise RuntimeError(f"row_index holds a row out of range [0, {num_rows})")

    def row_stats(self, student, teacher, temperature, row_index=None, trusted_rows=False):
        if not trusted_rows:  # the check reads row_index's min/max: on a GPU that synchronises
            self._check_row_index(row_index, student.shape[0])
        if not self.handles(student, teacher):
            if row_index is not None:
                student, teacher = student.index_select(0, row_index), teacher.index_select(0, row_index)
            return kd_loss.local_row_stats(student, teacher, temperature)
        return self._call(self._module.row_stats, student.device, student, teacher, float(temperature), row_index)

    def student_grad(
        self, student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out, row_index=None,
        teacher_grad_rows=None, trusted_rows=False,
    ):
        if not trusted_rows:
            self._check_row_index(row_index, student.shape[0])
        row_vectors = (max_s, log_sum_s, max_t, log_sum_t, grad_rows)
        if not self.handles(student, teacher, out) or out.dtype != student.dtype:
            if row_index is None:
                kd_loss.local_student_grad(student, teacher, *row_vectors, temperature, out,
                                           teacher_grad_rows=teacher_grad_rows)
            else:
                part = torch.empty(row_index.numel(), out.shape[1], dtype=out.dtype, device=out.device)
                kd_loss.local_student_grad(
                    student.index_select(0, row_index), teacher.index_select(0, row_index), *row_vectors,
                    temperature, part, teacher_grad_rows=teacher_grad_rows,
                )
                out.index_copy_(0, row_index, part)
            return
        # both modules: (..., out, row_index, teacher_grad_rows); _call appends the stream for CUDA
        self._call(
            self._module.student_grad, student.device, student, teacher, *row_vectors, float(temperature), out,
            row_index, teacher_grad_rows,
        )


def kernels_for(device, required: bool = False) -> FusedKernels | None:
    """The fused kernels for ``device``'s type; None when not available (or raise RuntimeError if ``required``)."""
    device = torch.device(device)
    kind = device.type
    if kind not in _SOURCES:
        if required:
            raise RuntimeError(f"no fused KL kernel for device type {kind!r} (only 'cpu' and 'cuda'); use impl='torch'")
        return None
    with _lock:
        if kind in _kernels:
            return _kernels[kind]
        module = load_extension(kind)
        if module is None:
            if required:
                nvcc = " and nvcc (a CUDA toolkit; CUDA_HOME)" if kind == "cuda" else ""
                raise RuntimeError(
                    f"the fused KL kernel for {kind} is not available: {_loaded[kind][1]}.\n"
                    f"Build it with `pip install --no-build-isolation -e .` in the salt_megatron checkout (needs a "
                    f"C++ compiler{nvcc}; SALT_MEGATRON_BUILD_EXT=0 / SALT_MEGATRON_BUILD_CUDA=0 must not be set), "
                    f"or let it compile just in time (needs ninja and the csrc/ sources; unset SALT_MEGATRON_NO_JIT). "
                    f"impl='torch' works without it."
                )
            return None
        _kernels[kind] = FusedKernels(kind, module)
        return _kernels[kind]
