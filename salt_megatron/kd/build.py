"""Finding the compiled fused kernels (``csrc/``): the ahead-of-time build, or a just-in-time one.

Two extensions implement the kernel protocol (``salt_megatron.kd.protocol``):

* ``salt_megatron._kl_cpu``: C++ / OpenMP, built by ``pip install -e .`` always;
* ``salt_megatron._kl_cuda``: CUDA, built by ``pip install -e .`` when a CUDA toolkit and a CUDA torch are found.

Where the installed extension is missing (or was built against another torch, or for another kernel contract), the
sources in ``csrc/`` are compiled just in time with ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler,
plus nvcc for CUDA) into ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/salt_megatron/torch_extensions``;
``SALT_MEGATRON_NO_JIT=1`` turns that off.  Compiler flags and the contract version come from
``salt_megatron.kd.kernel_flags``, shared with ``setup.py``.  The result (module, or why there is none) is cached
per process.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from salt_megatron.kd import kernel_flags

CSRC = Path(__file__).resolve().parent.parent / "csrc"  # shipped inside the package (wheel and sdist)
KINDS = tuple(kernel_flags.SOURCES)

_lock = threading.RLock()
_loaded: dict[str, tuple[object | None, str]] = {}  # kind -> (module or None, how it was loaded / why not)


def _jit_disabled() -> bool:
    return os.environ.get("SALT_MEGATRON_NO_JIT", "0").strip().lower() not in ("", "0", "false", "no")


def _build_directory(kind: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "salt_megatron" / "torch_extensions"
    cuda = f"_cu{torch.version.cuda.replace('.', '')}" if kind == "cuda" and torch.version.cuda else ""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}{cuda}"
    path = base / tag / kernel_flags.JIT_MODULE[kind]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _jit_build(kind: str, verbose: bool = False):
    from torch.utils import cpp_extension

    sources = [str(CSRC / name) for name in kernel_flags.SOURCES[kind]]
    common = dict(extra_include_paths=[str(CSRC)], build_directory=str(_build_directory(kind)), verbose=verbose)
    if kind == "cpu":
        return cpp_extension.load(kernel_flags.JIT_MODULE[kind], sources, extra_cflags=kernel_flags.CPU_CFLAGS,
                                  extra_ldflags=kernel_flags.CPU_LDFLAGS, with_cuda=False, **common)
    return cpp_extension.load(kernel_flags.JIT_MODULE[kind], sources, extra_cflags=kernel_flags.CUDA_CXXFLAGS,
                              extra_cuda_cflags=kernel_flags.CUDA_NVCC_FLAGS, with_cuda=True, **common)


def import_installed(kind: str):
    """The extension built by ``pip install -e .`` / ``setup.py build_ext``, or (None, why not)."""
    name = kernel_flags.INSTALLED_MODULE[kind]
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{name} is not importable ({exc})"
    version = getattr(module, "CONTRACT_VERSION", None)
    if version != kernel_flags.CONTRACT_VERSION:
        return None, (f"{name} is stale (kernel contract {version}, expected {kernel_flags.CONTRACT_VERSION}; "
                      f"rebuild with `pip install --no-build-isolation -e .`)")
    return module, f"installed extension {name}"


def _compiler() -> str | None:
    """The C++ compiler torch's extension builder will call (CXX, else c++)."""
    return shutil.which(os.environ.get("CXX", "c++"))


def jit_blocker(kind: str) -> str | None:
    """Why a just-in-time build of ``kind`` cannot even start here (one line), or None when it can."""
    from torch.utils import cpp_extension

    if kind == "cuda" and torch.version.cuda is None:
        return f"this torch ({torch.__version__}) has no CUDA"
    if _jit_disabled():
        return "JIT builds are turned off (SALT_MEGATRON_NO_JIT)"
    missing = [name for name in kernel_flags.SOURCES[kind] if not (CSRC / name).is_file()]
    if missing:
        return f"the kernel sources are not in {CSRC} ({', '.join(missing)}): reinstall salt_megatron"
    if _compiler() is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')} is not on PATH; install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda" and _cuda_home() is None:
        return "no CUDA toolkit (nvcc; set CUDA_HOME)"
    return None


def availability(kind: str) -> tuple[str, str]:
    """``("prebuilt" | "JIT-buildable" | "JIT-built" | "unavailable", detail)`` without compiling anything (for
    ``salt-megatron report``)."""
    with _lock:
        if kind in _loaded and _loaded[kind][0] is not None:
            how = _loaded[kind][1]
            return ("prebuilt" if how.startswith("installed") else "JIT-built"), how
    module, how = import_installed(kind)
    if module is not None:
        return "prebuilt", how
    blocker = jit_blocker(kind)
    if blocker is not None:
        return "unavailable", f"{how}; {blocker}"
    return "JIT-buildable", (f"{how}; compiles on first use with {_compiler()} and ninja into "
                             f"{_build_directory(kind).parent.parent}")


def load_extension(kind: str, verbose: bool = False):
    """The compiled module for ``kind`` ("cpu" or "cuda"), or None; cached.  :func:`why_unavailable` says why."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        if kind in _loaded:
            return _loaded[kind][0]
        module, how = import_installed(kind)
        if module is None:
            installed_error, blocker = how, jit_blocker(kind)
            if blocker is not None:
                how = f"{installed_error}; {blocker}"
            else:
                try:
                    module = _jit_build(kind, verbose=verbose)
                    how = f"JIT build from {CSRC} in {_build_directory(kind)}"
                except Exception as jit_exc:  # noqa: BLE001 - any build failure means "not available"
                    lines = str(jit_exc).strip().splitlines()
                    detail = " | ".join(lines[-12:]) if lines else type(jit_exc).__name__
                    how = f"{installed_error}; the JIT build from {CSRC} failed: {detail}"
        _loaded[kind] = (module, how)
        return module


def why_unavailable(kind: str) -> str:
    """How the extension was loaded, or why it is not available (loads it if not tried yet)."""
    load_extension(kind)
    return _loaded[kind][1]


def kernel_status() -> dict[str, str]:
    """``{kind: "available: how" | "unavailable: why"}`` for both extensions."""
    return {kind: ("available: " if load_extension(kind) is not None else "unavailable: ") + why_unavailable(kind)
            for kind in KINDS}


def cpu_kernel_available() -> bool:
    return load_extension("cpu") is not None


def cuda_kernel_available() -> bool:
    """True when the CUDA extension is loaded and a GPU is visible."""
    return torch.cuda.is_available() and load_extension("cuda") is not None
