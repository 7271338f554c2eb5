"""``salt-megatron report``: what this installation is and can do, like DeepSpeed's ``ds_report``.

Versions (Python, torch, megatron-core, DeepSpeed, Transformer Engine, apex, sentencepiece, numpy), CUDA and the
GPUs' architecture, the build tools, whether each fused kernel is prebuilt, buildable just in time or unavailable
and why, and which ``--kd-impl auto`` picks on this device.  Nothing is compiled or started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sys
from importlib import metadata

from salt_megatron.errors import ArgumentParser


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _apex() -> str:
    """NVIDIA apex when installed; the unrelated PyPI ``apex`` web toolkit is named as such."""
    spec = importlib.util.find_spec("apex")
    if spec is None:
        return "not installed (optional: megatron-core uses it when present)"
    where = list(spec.submodule_search_locations or [])
    if where and any(os.path.isdir(os.path.join(where[0], sub)) for sub in ("normalization", "transformer", "amp")):
        return f"NVIDIA apex {_version('apex') or ''}".strip()
    return ("a package named 'apex' that is not NVIDIA's (PyPI's 'apex' is an unrelated web toolkit): "
            "`pip uninstall apex`")


def collect() -> dict:
    import torch

    from salt_megatron import __version__
    from salt_megatron.compat.cpu import _APPLIED as cpu_patches
    from salt_megatron.kd import build

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    kernels = {kind: dict(zip(("state", "detail"), build.availability(kind))) for kind in build.KINDS}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = kernels[device]["state"]
    auto = {"prebuilt": "fused", "JIT-built": "fused", "JIT-buildable": "fused (compiled on first use)"}.get(
        state, "torch (no fused kernel for this device: see its line above)")
    return {
        "salt_megatron": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (a CPU build)",
        "GPUs": ", ".join(gpus) or "none visible",
        "megatron-core": (_version("megatron-core") or "NOT INSTALLED")
                         + (" (CPU patches active)" if cpu_patches else ""),
        "deepspeed": _version("deepspeed") or "not installed (optional: pip install 'salt_megatron[deepspeed]')",
        "transformer-engine": _version("transformer-engine", "transformer_engine") or "not installed (optional)",
        "apex": _apex(),
        "sentencepiece": _version("sentencepiece") or "NOT INSTALLED",
        "numpy": _version("numpy") or "NOT INSTALLED",
        "C++ compiler": shutil.which(os.environ.get("CXX", "c++")) or "none on PATH",
        "ninja": _version("ninja") or (shutil.which("ninja") and "on PATH") or "not installed",
        "nvcc": _nvcc(),
        "kernel sources": str(build.CSRC),
        "fused kernel (cpu)": f"{kernels['cpu']['state']}: {kernels['cpu']['detail']}",
        "fused kernel (cuda)": f"{kernels['cuda']['state']}: {kernels['cuda']['detail']}",
        f"--kd-impl auto on this device ({device})": auto,
    }


def _nvcc() -> str:
    import torch

    from salt_megatron.kd import build

    # torch's CUDA_HOME is None in a CPU build even where a toolkit is installed: look for it the way a user would
    if build._cuda_home():
        return os.path.join(build._cuda_home(), "bin", "nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc") or (candidate if os.path.exists(candidate) else None)
    if found is None:
        return "none (no CUDA toolkit)"
    return found + ("" if torch.version.cuda else " (unused: this torch has no CUDA)")


def main(argv=None) -> dict:
    p = ArgumentParser(prog="salt-megatron report", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        print("salt-megatron report\n" + "-" * 20)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return info
