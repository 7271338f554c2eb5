"""The GPT model, built from megatron-core parts: ``TransformerConfig`` + a layer spec + ``GPTModel``.

Transformer Engine's layer spec when TE is installed (GPU clusters), otherwise megatron-core's local spec (CPU, or
GPUs without TE).  The same architecture description (:class:`GPTArchitecture`) is saved in every checkpoint, so a
teacher can be rebuilt from its own checkpoint without the student's flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util

import torch



@dataclasses.dataclass(frozen=True)
class GPTArchitecture:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    vocab_size: int  # the tokenizer's vocabulary
    padded_vocab_size: int  # vocab_size padded for TP (Megatron's make-vocab-size-divisible-by)
    num_query_groups: int | None = None  # GQA; None = MHA
    normalization: str = "LayerNorm"  # or "RMSNorm"
    activation: str = "gelu"  # or "swiglu"
    position_embedding_type: str = "rope"  # or "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # what imported Hugging Face models need (defaults: what salt_megatron's own models have always used)
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3.x "llama3" RoPE scaling (megatron-core's fixed 1/4/8192 form)
    add_qkv_bias: bool = False  # Qwen2: biases on q/k/v only

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be >= vocab_size")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTArchitecture":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def non_embedding_params(self) -> int:
        """Parameters of the transformer layers (no embeddings, no output layer), for FLOP bounds."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = h if self.num_query_groups is None else h // self.num_attention_heads * self.num_query_groups
        attn = h * (h + 2 * kv) + h * h
        mlp = (3 if self.activation == "swiglu" else 2) * h * f
        return L * (attn + mlp)

    def output_layer_params(self) -> int:
        return self.hidden_size * self.padded_vocab_size


def pad_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's rule: pad so each TP shard of the output layer is a multiple of ``divisible_by``."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def megatron_fusions(use_transformer_engine: bool) -> dict:
    """megatron-core's fusion switches: on (Megatron-LM's defaults) under Transformer Engine's layer spec on a GPU,
    whose fused kernels they select; off otherwise (CUDA-only kernels, or never run without TE on the GPUs here)."""
    on = bool(use_transformer_engine and torch.cuda.is_available())
    return dict(bias_activation_fusion=on, masked_softmax_fusion=on, bias_dropout_fusion=on, apply_rope_fusion=on,
                gradient_accumulation_fusion=on, persist_layer_norm=on)


def build_gpt_model(
    arch: GPTArchitecture,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_transformer_engine: bool | None = None,
    whole_model: bool = False,
    pg_collection=None,
    config_overrides: dict | None = None,
):
    """A megatron-core ``GPTModel`` for this rank's pipeline stage (parallel_state must be initialised).

    ``whole_model=True`` builds every layer on this rank whatever the pipeline size (the teacher lives whole on the
    last stage); pass ``pg_collection=whole_model_process_groups()`` with it when PP > 1.  ``use_transformer_engine``:
    the layer spec (None: TE where installed with a GPU).  ``config_overrides``: more ``TransformerConfig`` fields
    (the student's recomputation and sequence parallelism: ``training.performance_arguments``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = 1 if whole_model else parallel_state.get_pipeline_model_parallel_world_size()
    if arch.num_layers % pp:
        raise ValueError(f"num_layers ({arch.num_layers}) must be divisible by pipeline-model-parallel-size ({pp})")
    if arch.num_attention_heads % tp:
        raise ValueError(
            f"num_attention_heads ({arch.num_attention_heads}) must be divisible by tensor-model-parallel-size ({tp})"
        )
    if arch.padded_vocab_size % tp:
        raise ValueError(f"padded vocab size {arch.padded_vocab_size} is not divisible by TP={tp}")
    swiglu = arch.activation == "swiglu"
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    config = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization=arch.normalization,
        gated_linear_unit=swiglu,
        activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        add_bias_linear=not swiglu,
        add_qkv_bias=arch.add_qkv_bias,
        layernorm_epsilon=arch.norm_epsilon,
        init_method_std=arch.init_method_std,
        hidden_dropout=arch.hidden_dropout,
        attention_dropout=arch.attention_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        **megatron_fusions(use_transformer_engine),
        **(config_overrides or {}),
    )
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization=arch.normalization)
    extra = {} if pg_collection is None else {"pg_collection": pg_collection}
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
        position_embedding_type=arch.position_embedding_type,
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        **extra,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if params_dtype in (torch.bfloat16, torch.float16):
        # what Megatron-LM does for --bf16/--fp16: weights in half precision, float inputs cast on the first stage,
        # logits back to fp32 on the last
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


def whole_model_process_groups():
    """megatron-core process groups for a model held whole on each rank: the usual TP/DP/CP groups, and a
    pipeline group of one.  Collective: every rank must call it."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.pp, _ = torch.distributed.new_subgroups(group_size=1)
    return pgs


class _ContiguousGrad(torch.autograd.Function):
    """Identity; backward hands on a contiguous gradient.  megatron-core's TP all-reduce of a gradient
    (``mappings._reduce``) reduces a contiguous copy and returns the original when given a strided one, as the
    gradient of the transposed, reshaped hidden states is: the TP ranks' parts would silently not be summed."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@contextlib.contextmanager
def output_layer_inputs(model):
    """Within the block, ``model(...)`` returns what its output layer would multiply, the hidden states ``[b, s, h]``
    (through megatron-core's ``copy_to_tensor_model_parallel_region``, whose backward sums the TP ranks' parts), not
    the logits; the yielded dict's ``"weight"`` is the weight it would have used (the word embedding when tied).
    For a loss that takes the hidden states and the weight itself (``kd.fused_linear``).  ``model``: a GPTModel,
    maybe inside DDP / Float16Module; on a stage without the output layer nothing changes."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    layer = getattr(inner, "output_layer", None) if getattr(inner, "post_process", False) else None
    captured = {}
    if layer is None:
        yield captured
        return

    def hidden_instead(input_, weight=None, runtime_gather_output=None, **_):
        captured["weight"] = layer.weight if weight is None else weight
        return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(input_)), None

    layer.forward = hidden_instead  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield captured
    finally:
        del layer.forward


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True = masked (megatron-core's convention); given explicitly because the local spec's
    default mask is built with a hard-coded CUDA device."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]
