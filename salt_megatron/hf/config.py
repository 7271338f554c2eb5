"""Hugging Face ``config.json`` ↔ :class:`GPTArchitecture`, with one-line refusals for what does not map.

Supported: ``LlamaForCausalLM`` (SmolLM2, TinyLlama, Llama-2/3.x incl. the ``llama3`` RoPE scaling),
``Qwen2ForCausalLM`` (biases on q/k/v) and ``MistralForCausalLM`` without a sliding window; GQA, tied or untied
embeddings, RMSNorm ε, RoPE θ.  All are pre-norm RMSNorm + SwiGLU + RoPE (rotate-half, as megatron-core's default).
"""

from __future__ import annotations

from salt_megatron.errors import DataError, UsageError
from salt_megatron.model import GPTArchitecture, pad_vocab_size

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# megatron-core's llama3 RoPE scaling has these three fixed (only the factor is a parameter)
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT_SEQ_LENGTH_CAP = 2048


def _rope(config: dict) -> tuple[float, dict | None]:
    """(θ, scaling) from either the transformers-4 keys (``rope_theta``, ``rope_scaling``) or v5's
    ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def architecture_from_hf(config: dict, *, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                         seq_length: int | None = None, source: str = "config.json") -> GPTArchitecture:
    """The architecture of an HF checkpoint, or :class:`DataError` naming what is not supported."""
    kind = (config.get("architectures") or [None])[0]
    if kind not in SUPPORTED:
        raise DataError(f"{source}: architecture {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']!r} (only 'silu': SwiGLU)")
    if config.get("mlp_bias"):
        unsupported.append("mlp_bias")
    if kind != "Qwen2ForCausalLM" and config.get("attention_bias"):
        unsupported.append("attention_bias (biases on q/k/v/o; Qwen2's q/k/v-only biases are supported)")
    if kind == "MistralForCausalLM" and config.get("sliding_window") is not None:
        unsupported.append(f"sliding_window {config['sliding_window']} (only full attention)")
    if kind == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        unsupported.append("use_sliding_window (only full attention)")
    theta, scaling = _rope(config)
    rope_factor = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            unsupported.append(f"rope_scaling type {rope_type!r} (supported: none, 'llama3')")
        else:
            odd = {k: scaling.get(k) for k, v in LLAMA3_FIXED.items() if float(scaling.get(k, v)) != v}
            if odd:
                unsupported.append(f"llama3 rope_scaling with {odd} (megatron-core fixes {LLAMA3_FIXED})")
            rope_factor = float(scaling.get("factor", 8.0))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        unsupported.append(f"head_dim {head_dim} with {heads} heads != hidden_size {hidden}")
    if unsupported:
        raise DataError(f"{source}: {kind} with {'; '.join(unsupported)} is not supported")
    tp = tensor_model_parallel_size
    if heads % tp or kv_heads % tp:
        raise UsageError(f"--tensor-model-parallel-size {tp} must divide the attention heads ({heads}) and the "
                         f"key/value heads ({kv_heads})")
    vocab = int(config["vocab_size"])
    max_positions = int(config.get("max_position_embeddings") or DEFAULT_SEQ_LENGTH_CAP)
    return GPTArchitecture(
        num_layers=int(config["num_hidden_layers"]), hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=int(config["intermediate_size"]),
        seq_length=seq_length or min(max_positions, DEFAULT_SEQ_LENGTH_CAP),
        vocab_size=vocab, padded_vocab_size=pad_vocab_size(vocab, tp, make_vocab_size_divisible_by),
        num_query_groups=kv_heads if kv_heads != heads else None, normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)), rotary_base=theta, rope_scaling_factor=rope_factor,
        add_qkv_bias=kind == "Qwen2ForCausalLM",
    )


def check_exportable(arch: GPTArchitecture, source: str) -> str:
    """The HF class a checkpoint exports as (Llama shape, or Qwen2 with q/k/v biases), or :class:`DataError`."""
    wrong = [f"{name} {getattr(arch, name)!r} (needs {want!r})" for name, want in
             (("normalization", "RMSNorm"), ("activation", "swiglu"), ("position_embedding_type", "rope"))
             if getattr(arch, name) != want]
    if wrong:
        raise DataError(f"{source} is not of Llama shape ({'; '.join(wrong)}): export-hf writes Llama-layout "
                        "checkpoints (train with --normalization RMSNorm --swiglu --position-embedding-type rope)")
    return "Qwen2ForCausalLM" if arch.add_qkv_bias else "LlamaForCausalLM"


def hf_config(arch: GPTArchitecture, *, kind: str, dtype: str, bos_token_id=None, eos_token_id=None,
              imported: dict | None = None) -> dict:
    """``config.json`` for ``arch``; an imported model's own config (``imported``) is kept and its sizes checked."""
    config = dict(imported or {})
    config.update({
        "architectures": [kind], "model_type": "qwen2" if kind == "Qwen2ForCausalLM" else "llama",
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups or arch.num_attention_heads, "hidden_act": "silu",
        "rms_norm_eps": arch.norm_epsilon, "tie_word_embeddings": not arch.untie_embeddings_and_output_weights,
        "torch_dtype": dtype, "dtype": dtype, "head_dim": arch.hidden_size // arch.num_attention_heads,
    })
    config.setdefault("max_position_embeddings", arch.seq_length)
    if imported is None:
        config.update({"rope_theta": arch.rotary_base, "attention_bias": False, "mlp_bias": False,
                       "initializer_range": arch.init_method_std, "use_cache": True})
        if arch.rope_scaling_factor is not None:
            config["rope_scaling"] = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, **LLAMA3_FIXED}
        config.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id))
                       if v is not None})
    return config
