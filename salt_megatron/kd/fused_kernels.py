"""The fused kernel set: the compiled ``csrc/`` kernels behind the kernel protocol, for one device type.

Both kernels take fp32, bf16 and fp16 logits (student and teacher may differ) and a ``row_index`` (rows masked out
cost nothing and are not copied).  fp64 inputs (gradcheck) and other layouts the compiled code does not take go to
the PyTorch kernels; :meth:`FusedKernels.handles` says which.
"""

from __future__ import annotations

import threading

import torch

from salt_megatron.kd import build
from salt_megatron.kd.torch_kernels import local_row_stats, local_student_grad

# the compiled kernels accept these dtypes; anything else (fp64) uses the PyTorch kernels
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.RLock()
_kernels: dict[str, "FusedKernels"] = {}


class FusedKernels:
    """The compiled implementation of the kernel protocol (``supports_row_index``, ``supports_split_grad``).

    Out-of-range ``row_index`` entries are refused before any kernel runs, unless ``trusted_rows=True`` (the caller
    made ``row_index`` itself, e.g. from a mask: the check would synchronise a GPU).
    """

    supports_row_index = True
    supports_split_grad = True

    def __init__(self, device_type: str, module):
        self.device_type = device_type
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

    def handles_topk(self, logits: torch.Tensor) -> bool:
        """Whether :meth:`topk_logsumexp` takes these logits (the CPU module has it; the CUDA one leaves it to
        torch.topk, which is fast there)."""
        return hasattr(self._module, "topk_logsumexp") and self.handles(logits)

    def topk_logsumexp(self, logits: torch.Tensor, k: int, temperature: float):
        """The ``k`` largest of ``logits/τ`` per row of ``[rows, width]`` logits (fp32 values and int64 columns,
        best first, ties to the lower column) and each row's log Σ exp(logits/τ), in one read of the logits."""
        return self._module.topk_logsumexp(logits, int(k), float(temperature))

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

    def row_stats(self, student, teacher, temperature, with_ce_sum=False, row_index=None, trusted_rows=False):
        if not trusted_rows:  # the check reads row_index's min/max: on a GPU that synchronises
            self._check_row_index(row_index, student.shape[0])
        if not self.handles(student, teacher):
            if row_index is not None:
                student, teacher = student.index_select(0, row_index), teacher.index_select(0, row_index)
            return local_row_stats(student, teacher, temperature, with_ce_sum)
        return self._call(self._module.row_stats, student.device, student, teacher, float(temperature), row_index,
                          bool(with_ce_sum))

    def student_grad(
        self, student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out,
        teacher_grad_rows=None, ce_log_sum_s=None, ce_grad_rows=None, row_index=None, trusted_rows=False,
    ):
        if not trusted_rows:
            self._check_row_index(row_index, student.shape[0])
        row_vectors = (max_s, log_sum_s, max_t, log_sum_t, grad_rows)
        extra = {"teacher_grad_rows": teacher_grad_rows, "ce_log_sum_s": ce_log_sum_s, "ce_grad_rows": ce_grad_rows}
        if not self.handles(student, teacher, out) or out.dtype != student.dtype:
            if row_index is None:
                local_student_grad(student, teacher, *row_vectors, temperature, out, **extra)
            else:
                part = torch.empty(row_index.numel(), out.shape[1], dtype=out.dtype, device=out.device)
                local_student_grad(student.index_select(0, row_index), teacher.index_select(0, row_index),
                                   *row_vectors, temperature, part, **extra)
                out.index_copy_(0, row_index, part)
            return
        # both modules: (..., out, row_index, teacher_grad_rows, ce_log_sum_s, ce_grad_rows); _call appends the
        # stream for CUDA
        self._call(
            self._module.student_grad, student.device, student, teacher, *row_vectors, float(temperature), out,
            row_index, teacher_grad_rows, ce_log_sum_s, ce_grad_rows,
        )


def kernels_for(device, required: bool = False) -> FusedKernels | None:
    """The fused kernels for ``device``'s type; None when not available (or raise RuntimeError if ``required``)."""
    kind = torch.device(device).type
    if kind not in build.KINDS:
        if required:
            raise RuntimeError(f"no fused KL kernel for device type {kind!r} (only 'cpu' and 'cuda'); use impl='torch'")
        return None
    with _lock:
        if kind in _kernels:
            return _kernels[kind]
        module = build.load_extension(kind)
        if module is None:
            if required:  # one line: why, and what still works
                raise RuntimeError(f"the fused KL kernel for {kind} is not available: {build.why_unavailable(kind)}; "
                                   f"impl='torch' works without it (`salt-megatron report` shows what a build needs)")
            return None
        _kernels[kind] = FusedKernels(kind, module)
        return _kernels[kind]
