"""Hugging Face safetensors ↔ megatron-core ``GPTModel`` state dicts (whole tensors, TP = 1 layout).

megatron-core fuses what HF keeps apart, in its own order:
* ``linear_qkv``: per key/value group, that group's query heads, then its key head, then its value head (rows);
* ``linear_fc1``: ``[gate; up]`` (SwiGLU);
* the vocabulary is padded for TP (``padded_vocab_size``): the extra embedding/output rows are zero on import and
  dropped on export (the KD loss and scoring never read them).
Both directions are pure reshapes and copies, so import → export gives back the same tensors bit for bit.  Transformer
Engine's layer spec keeps the pre-norm weights inside ``linear_qkv``/``linear_fc1`` (``layer_norm_weight``): both
names are understood.
"""

from __future__ import annotations

import json
import os
import re

import torch

from salt_megatron.errors import DataError, MissingFile, UsageError, require_modules
from salt_megatron.model import GPTArchitecture

INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def single_process_model(arch: GPTArchitecture, command: str):
    """The whole fp32 ``GPTModel`` in this one process: import-hf and export-hf need no more (the checkpoints they
    write or read load at any TP/PP size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise UsageError(f"{command} runs as one process (the checkpoint loads at any TP/PP size): run it without "
                         "torchrun")
    from megatron.core import tensor_parallel

    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import build_gpt_model

    initialize_distributed(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # megatron-core's init draws from its model-parallel RNG
    return build_gpt_model(arch, params_dtype=torch.float32)


def safetensors_files(directory: str) -> list[str]:
    """The weight files of an HF directory (sharded with its index, or one ``model.safetensors``), all present."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                names = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{index}: not a safetensors index ({e})") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise MissingFile(f"{directory}: shard(s) {', '.join(missing)} named in {INDEX} are missing")
        return [os.path.join(directory, n) for n in names]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise MissingFile(f"{directory} has no model.safetensors or {INDEX} (PyTorch .bin checkpoints are not read: "
                      "save_pretrained(..., safe_serialization=True) converts them)")


def read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    require_modules("hf", "safetensors")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for path in safetensors_files(directory):
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def _head_dim(arch: GPTArchitecture) -> int:
    return arch.hidden_size // arch.num_attention_heads


def _groups(arch: GPTArchitecture) -> int:
    return arch.num_query_groups or arch.num_attention_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: GPTArchitecture) -> torch.Tensor:
    """HF q/k/v (weights ``[out, in]`` or biases ``[out]``) → megatron's grouped ``linear_qkv`` rows."""
    d, g = _head_dim(arch), _groups(arch)
    per_group = arch.num_attention_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, per_group * d, *tail)
    k, v = k.reshape(g, d, *tail), v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, arch: GPTArchitecture):
    d, g = _head_dim(arch), _groups(arch)
    per_group = arch.num_attention_heads // g
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])]) if rows > len(weight) \
        else weight


def _layer_sources(i: int) -> dict[str, str]:
    """megatron-core name (inside ``decoder.layers.i.``) → HF name, for the tensors that map one to one."""
    hf = f"model.layers.{i}."
    return {
        "input_layernorm.weight": hf + "input_layernorm.weight",
        "self_attention.linear_qkv.layer_norm_weight": hf + "input_layernorm.weight",  # TE spec
        "self_attention.linear_proj.weight": hf + "self_attn.o_proj.weight",
        "pre_mlp_layernorm.weight": hf + "post_attention_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": hf + "post_attention_layernorm.weight",  # TE spec
        "mlp.linear_fc2.weight": hf + "mlp.down_proj.weight",
    }


def hf_sources(name: str, arch: GPTArchitecture):
    """``(HF tensor names, combine)`` for megatron-core's parameter ``name``: ``combine(tensors)`` builds it from those
    HF tensors, in that order.  KeyError for a name HF has no counterpart of."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"], lambda t: _pad_rows(t[0], arch.padded_vocab_size)
    if name == "output_layer.weight":
        return ["lm_head.weight"], lambda t: _pad_rows(t[0], arch.padded_vocab_size)
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"], lambda t: t[0]
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(name)
    i, rest = int(match.group(1)), match.group(2)
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return [f"{attn}{p}_proj.{kind}" for p in "qkv"], lambda t: fuse_qkv(*t, arch)
    if rest == "mlp.linear_fc1.weight":
        return [mlp + "gate_proj.weight", mlp + "up_proj.weight"], torch.cat
    return [_layer_sources(i)[rest]], lambda t: t[0]


def to_megatron(hf: dict[str, torch.Tensor], state: dict[str, torch.Tensor], arch: GPTArchitecture,
                source: str) -> dict[str, torch.Tensor]:
    """A full state dict for the model whose current ``state`` is given (names, shapes, dtypes), from HF tensors.
    Refuses, naming them, HF tensors that are missing, left over, or of another shape."""
    out, used, problems = {}, set(), []
    for name, current in state.items():
        if name.endswith("_extra_state"):
            out[name] = current
            continue
        try:
            names, combine = hf_sources(name, arch)
            tensor = combine([hf[n] for n in names])
        except KeyError as e:
            problems.append(f"missing {e.args[0]} (for {name})")
            continue
        used.update(names)
        if tuple(tensor.shape) != tuple(current.shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)} from the checkpoint, the config implies "
                            f"{tuple(current.shape)}")
            continue
        out[name] = tensor.to(current.dtype)
    ignorable = {"lm_head.weight"} if not arch.untie_embeddings_and_output_weights else set()
    left = sorted(n for n in hf if n not in used and n not in ignorable and "rotary_emb.inv_freq" not in n)
    if left:
        problems.append(f"tensors the config does not account for: {', '.join(left[:4])}"
                        f"{' …' if len(left) > 4 else ''}")
    if problems:
        raise DataError(f"{source}: the weights do not match config.json: {'; '.join(problems[:3])}"
                        f"{' …' if len(problems) > 3 else ''}")
    return out


def from_megatron(state: dict[str, torch.Tensor], arch: GPTArchitecture) -> dict[str, torch.Tensor]:
    """HF tensors (Llama/Qwen2 names, vocabulary unpadded) from a whole-model megatron-core state dict."""
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][: arch.vocab_size],
          "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if arch.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = state["output_layer.weight"][: arch.vocab_size]
    for i in range(arch.num_layers):
        prefix, attn, mlp = f"decoder.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            fused = state.get(f"{prefix}self_attention.linear_qkv.{kind}")
            if fused is not None:
                for p, tensor in zip("qkv", split_qkv(fused, arch)):
                    hf[f"{attn}{p}_proj.{kind}"] = tensor
        gate, up = torch.chunk(state[f"{prefix}mlp.linear_fc1.weight"], 2)
        hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"] = gate, up
        for rest, hf_name in _layer_sources(i).items():
            if prefix + rest in state:
                hf[hf_name] = state[prefix + rest]
    return {name: t.contiguous() for name, t in hf.items()}
