"""megatron-core on a CPU-only torch: every patch in one place, applied only when CUDA is absent.

megatron-core (0.16-0.19) is written for CUDA.  On a CPU-only torch it fails in a handful of places (README,
"megatron-core on a CPU", lists them).  Instead of editing megatron-core, we hand each of its modules a view of
``torch`` whose CUDA-only corners point at the CPU: factories called with ``device="cuda"`` make CPU tensors,
``torch.cuda.current_device()`` is the CPU, streams and synchronisation are no-ops, and the CUDA RNG is the CPU
generator.  The view is installed as the module-level name ``torch`` inside ``megatron.core.*`` modules only, so
user code and torch itself are untouched.

``import salt_megatron`` applies it once (the package's entry point; every command and module of the package comes
through it).  With CUDA present it does nothing.  Every patch of a name inside megatron-core first checks that the
name exists: a megatron-core release that renamed one fails at once with one line naming the installed version,
never with a confusing error deep in a training step.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import types
import warnings

import torch

from salt_megatron.compat.torch_view import CpuTorchView

_APPLIED = False
SUPPORTED_MEGATRON_CORE = "0.16-0.19"


class MegatronCoreIncompatible(RuntimeError):
    """The installed megatron-core lacks a name the CPU patches replace."""


def _megatron_core_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "of unknown version"


def _require(owner, name: str):
    """``owner.name``, which a patch is about to replace; one clear error if this megatron-core has no such name."""
    if not hasattr(owner, name):
        where = getattr(owner, "__module__", None) if isinstance(owner, type) else None
        qualified = f"{where + '.' if where else ''}{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}"
        raise MegatronCoreIncompatible(
            f"salt_megatron cannot run megatron-core {_megatron_core_version()} on a CPU: it has no "
            f"{qualified}.{name}, which the CPU patches replace (supported: megatron-core {SUPPORTED_MEGATRON_CORE})"
        )
    return getattr(owner, name)

# megatron-core modules the SALT stack uses; they are imported and patched eagerly.  Modules imported later are
# patched by the import hook below.
_EAGER_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.models.gpt",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.pipeline_parallel",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.timers",
)

_TORCH_VIEW = None


def _patch_module(module):
    if getattr(module, "torch", None) is torch:
        module.torch = _TORCH_VIEW


def _patch_rng_helpers():
    """The RNG tracker reads and writes CUDA generator states through two helpers; point them at the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    _require(mrandom, "_get_cuda_rng_state")
    _require(mrandom, "_set_cuda_rng_state")

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _patch_clip_grads():
    """``clip_grad_by_total_norm_fp32`` asserts CUDA grads and uses apex's multi-tensor scale: use torch's."""
    from megatron.core.optimizer import clip_grads

    _require(clip_grads, "clip_grad_by_total_norm_fp32")

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    for name in ("megatron.core.optimizer.optimizer",):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _run_within(cls, name, context):
    """Within ``cls.name`` only (a method or a classmethod), the ``context()`` manager is active."""
    method = _require(cls, name)
    if getattr(method, "_salt_cpu_patched", False):
        return
    is_classmethod = isinstance(inspect.getattr_static(cls, name), classmethod)

    def patched(*args, **kwargs):
        with context():  # a classmethod's `method` is already bound: it does not take the class again
            return method(*args[1:], **kwargs) if is_classmethod else method(*args, **kwargs)

    patched._salt_cpu_patched = True
    setattr(cls, name, classmethod(patched) if is_classmethod else patched)


def _patch_tensor_cuda_calls():
    """Tied embeddings across pipeline stages call ``weight.data.cuda()`` before their all-reduce."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _run_within(LanguageModule, "setup_embeddings_and_output_layer", _tensor_cuda_is_identity)


@contextlib.contextmanager
def _tensor_type_names_cuda():
    original = torch.Tensor.type

    def cuda_named(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        return name.replace("torch.", "torch.cuda.", 1) if not args and not kwargs and self.device.type == "cpu" \
            else name

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _patch_distributed_optimizer():
    """The distributed optimizer sorts its parameters by ``param.type()``, which it expects to read
    ``torch.cuda.FloatTensor``: within that one classmethod, CPU tensors give CUDA type names."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _run_within(DistributedOptimizer, "_build_model_and_main_param_groups", _tensor_type_names_cuda)


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches ``megatron.core.*`` modules that are imported after :func:`ensure_megatron_runs_here`."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core.") or fullname in _IN_PROGRESS:
            return None
        _IN_PROGRESS.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            _IN_PROGRESS.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _WrappedLoader(spec.loader)
        return spec


_IN_PROGRESS: set = set()


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch_module(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _stand_in_for_triton_kernels():
    """megatron-core 0.19 imports triton unconditionally (``transformer.moe.ops.paged_stash``, MoE only).

    A CPU-only torch has no triton.  Stubbing ``triton`` itself would fool torch's own inductor, so instead the
    one megatron module that needs it is replaced by a stand-in with the same names whose kernels raise.
    """
    if importlib.util.find_spec("triton") is not None:
        return
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return

    def _no_triton(*args, **kwargs):
        raise RuntimeError("MoE paged stash needs triton and a GPU; this is a CPU-only torch")

    stand_in = types.ModuleType(name)
    stand_in.GLOBAL_BLOCK_SIZE = 1024
    stand_in.paged_stash_copy_kernel = _no_triton
    stand_in.paged_stash_pop_kernel = _no_triton
    sys.modules[name] = stand_in


def ensure_megatron_runs_here() -> bool:
    """Apply the CPU patches if (and only if) CUDA is absent.  Idempotent.  Returns True when patches are active."""
    global _APPLIED, _TORCH_VIEW
    if torch.cuda.is_available() or importlib.util.find_spec("megatron") is None:
        return False
    if _APPLIED:
        return True
    # megatron-core warns at import that Apex/Transformer Engine are missing; on a CPU that is the expected state.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed", category=UserWarning)
    _stand_in_for_triton_kernels()
    _TORCH_VIEW = CpuTorchView()
    sys.meta_path.insert(0, _PatchOnImport())
    for name in _EAGER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a module some megatron-core version does not have
            continue
    for name, module in list(sys.modules.items()):
        if name == "megatron.core" or name.startswith("megatron.core."):
            _patch_module(module)
    _patch_rng_helpers()
    _patch_clip_grads()
    _patch_tensor_cuda_calls()
    _patch_distributed_optimizer()
    _APPLIED = True
    return True
