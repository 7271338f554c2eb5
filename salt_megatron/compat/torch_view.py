"""``torch`` as megatron-core's modules see it on a CPU-only machine (installed by ``salt_megatron.compat.cpu``).

Factories called with ``device="cuda"`` make CPU tensors, ``torch.cuda.current_device()`` is the CPU, streams and
events are no-ops, and the CUDA RNG is the CPU generator; every other name is torch's own.
"""

from __future__ import annotations

import contextlib
import types

import torch

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "empty_strided",
)


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, an int, a torch.device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _redirect_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: records nothing; timers fall back to wall-clock time."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


class _CpuCudaNamespace(types.SimpleNamespace):
    """What megatron-core modules see as ``torch.cuda`` on a CPU-only machine; unknown names fall through."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _make_cuda_namespace():
    return _CpuCudaNamespace(
        # megatron-core allocates buffers and moves RoPE frequencies to the "current device": the CPU here.
        current_device=lambda: torch.device("cpu"),
        # p2p communication and timers synchronise the GPU; there is nothing to wait for on the CPU.
        synchronize=lambda *a, **k: None,
        # DDP and pipeline utils create side streams for overlap; on the CPU everything runs in order.
        Stream=_NullStream,
        Event=_NullEvent,
        current_stream=lambda *a, **k: _NullStream(),
        default_stream=lambda *a, **k: _NullStream(),
        stream=lambda *a, **k: contextlib.nullcontext(),
        # The RNG tracker keeps per-TP-rank generator states; without CUDA they are CPU generator states.
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        # memory queries used in logging have no CPU meaning.
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        empty_cache=lambda: None,
    )


class CpuTorchView(types.ModuleType):
    """``torch`` as megatron-core modules see it on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch")
        # device="cuda" factories in optimizer, clip_grads, grad_scaler, schedules and buffers make CPU tensors.
        for name in _FACTORIES:
            setattr(self, name, _redirect_factory(getattr(torch, name)))
        self.cuda = _make_cuda_namespace()

    def __getattr__(self, name):
        return getattr(torch, name)
