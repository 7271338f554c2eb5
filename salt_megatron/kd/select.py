"""Which kernel set runs: ``impl`` = ``"torch"``, ``"fused"`` or ``"auto"`` (fused where built for the device)."""

from __future__ import annotations

import torch

from salt_megatron.kd.fused_kernels import kernels_for
from salt_megatron.kd.protocol import KernelSet
from salt_megatron.kd.torch_kernels import TORCH_KERNELS

IMPLS = ("auto", "torch", "fused")


def select_kernels(impl: str, device: torch.device) -> KernelSet:
    if impl == "torch":
        return TORCH_KERNELS
    if impl == "fused":
        return kernels_for(device, required=True)
    if impl == "auto":
        return kernels_for(device, required=False) or TORCH_KERNELS
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
