"""Megatron-LM checkpoints as teachers: its ``torch_dist`` layout, and the architecture from the args saved in it.

Megatron-LM writes ``DIR/latest_checkpointed_iteration.txt`` and ``DIR/iter_NNNNNNN/`` (or ``release/``) holding
dist_checkpointing shards (``metadata.json``, ``*.distcp``) and ``common.pt`` with its ``args``.  The model's
sharded keys are megatron-core's, the same for the local and the Transformer Engine layer specs, so the weights load
as salt_megatron's own do.  The architecture comes from those args, or from a ``--teacher-model-config`` YAML with
the same names (as Megatron-LM's own distillation takes a teacher's config), which also serves when the args cannot
be read (pickled with classes this machine does not have).  What does not map onto salt_megatron's GPT is refused in
one line; a teacher whose weights did not load is refused by its logits (see ``teacher.Teacher``).
"""

from __future__ import annotations

import os

import yaml

from salt_megatron.checkpointing import META, TRACKER, tracked_checkpoint
from salt_megatron.errors import CheckpointError, TeacherRefused
from salt_megatron.model import GPTArchitecture

COMMON = "common.pt"
# architecture fields read from Megatron-LM's args (its flag names), with Megatron-LM's defaults
ARG_DEFAULTS = {"num_query_groups": None, "group_query_attention": False, "ffn_hidden_size": None,
                "normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute",
                "untie_embeddings_and_output_weights": False, "norm_epsilon": 1e-5, "rotary_base": 10000,
                "add_bias_linear": True, "add_qkv_bias": False, "qk_layernorm": False, "kv_channels": None,
                "use_rope_scaling": False, "rope_scaling_factor": 8.0, "rotary_percent": 1.0,
                "init_method_std": 0.02, "tokenizer_model": None}
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "padded_vocab_size")


def _is_torch_dist(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in ("metadata.json", COMMON))


def is_megatron_lm_checkpoint(load_dir: str) -> bool:
    """A Megatron-LM run or iteration directory (torch_dist format, no salt_meta.json)."""
    if not os.path.isdir(load_dir) or os.path.isfile(os.path.join(load_dir, META)):
        return False
    if _is_torch_dist(load_dir):
        return True
    tracker = os.path.join(load_dir, TRACKER)
    return os.path.isfile(tracker) and not any(
        os.path.isfile(os.path.join(load_dir, name, META)) for name in os.listdir(load_dir))


def iteration_path(load_dir: str) -> tuple[str, int]:
    """The iteration directory the tracker names (or ``load_dir`` itself), and its step."""
    if _is_torch_dist(load_dir):
        name = os.path.basename(os.path.normpath(load_dir))
        return load_dir, int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else 0
    path, step = tracked_checkpoint(load_dir)  # (a run directory: is_megatron_lm_checkpoint saw its tracker)
    step = step or 0  # Megatron-LM's release checkpoint
    if not _is_torch_dist(path):
        raise CheckpointError(f"{load_dir}: the tracker names {path}, which is not a torch_dist checkpoint "
                              f"(metadata.json and {COMMON}); legacy mp_rank_* checkpoints are not read")
    return path, step


def saved_args(path: str) -> dict:
    """Megatron-LM's args from the checkpoint's common state."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - unpickling can fail on any class this machine lacks
        raise TeacherRefused(f"cannot read the args saved in {os.path.join(path, COMMON)} ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}): describe the teacher "
                             "with --teacher-model-config YAML instead") from None
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:  # (salt_megatron's own checkpoints keep their description in salt_meta.json instead)
        raise TeacherRefused(f"no complete checkpoint in {path}: no salt_meta.json (salt_megatron's), and "
                             f"{COMMON} holds no 'args' (Megatron-LM's): for a Megatron-LM teacher, describe it with "
                             "--teacher-model-config YAML")
    return dict(vars(args)) if not isinstance(args, dict) else dict(args)


def architecture(args: dict, *, vocab_size: int, source: str) -> GPTArchitecture:
    """salt_megatron's architecture for Megatron-LM ``args``, or :class:`TeacherRefused` naming what does not map."""
    missing = [k for k in REQUIRED if args.get(k) is None]
    if missing:
        raise TeacherRefused(f"{source}: the teacher's config lacks {', '.join(missing)}")
    a = {**ARG_DEFAULTS, **{k: v for k, v in args.items() if v is not None or k not in ARG_DEFAULTS}}
    unsupported = []
    if a["add_bias_linear"] == a["swiglu"]:  # salt_megatron: biases with GELU, none with SwiGLU
        unsupported.append(f"add_bias_linear={a['add_bias_linear']} with swiglu={a['swiglu']}")
    if a["qk_layernorm"]:
        unsupported.append("qk_layernorm")
    if a["kv_channels"] not in (None, a["hidden_size"] // a["num_attention_heads"]):
        unsupported.append(f"kv_channels {a['kv_channels']} != hidden_size / num_attention_heads")
    if a["rotary_percent"] != 1.0:
        unsupported.append(f"rotary_percent {a['rotary_percent']}")
    if a["position_embedding_type"] not in ("rope", "learned_absolute"):
        unsupported.append(f"position_embedding_type {a['position_embedding_type']!r}")
    if a["normalization"] not in ("LayerNorm", "RMSNorm"):
        unsupported.append(f"normalization {a['normalization']!r}")
    if unsupported:
        raise TeacherRefused(f"{source}: a Megatron-LM model with {'; '.join(unsupported)} is not supported")
    if vocab_size > a["padded_vocab_size"]:
        raise TeacherRefused(f"{source}: the teacher's padded vocabulary ({a['padded_vocab_size']}) is smaller than "
                             f"the student's tokenizer ({vocab_size})")
    groups = a["num_query_groups"] if a["group_query_attention"] else None
    return GPTArchitecture(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], num_attention_heads=a["num_attention_heads"],
        ffn_hidden_size=a["ffn_hidden_size"] or 4 * a["hidden_size"], seq_length=a["seq_length"],
        vocab_size=vocab_size, padded_vocab_size=a["padded_vocab_size"], num_query_groups=groups,
        normalization=a["normalization"], activation="swiglu" if a["swiglu"] else "gelu",
        position_embedding_type=a["position_embedding_type"],
        untie_embeddings_and_output_weights=a["untie_embeddings_and_output_weights"],
        init_method_std=a["init_method_std"], norm_epsilon=a["norm_epsilon"], rotary_base=a["rotary_base"],
        rope_scaling_factor=a["rope_scaling_factor"] if a["use_rope_scaling"] else None,
        add_qkv_bias=a["add_qkv_bias"] and not a["add_bias_linear"],
    )


def model_args(load_dir: str, model_config: str | None = None, *,
               flag: str = "--teacher-model-config") -> tuple[dict, str]:
    """The Megatron-LM flags that describe the model (saved in the checkpoint, or ``model_config`` YAML) and where
    they came from."""
    if model_config is not None:
        try:
            with open(model_config) as f:
                args = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise TeacherRefused(f"{flag} {model_config}: {e}") from None
        if not isinstance(args, dict):
            raise TeacherRefused(f"{flag} {model_config}: expected a mapping of Megatron-LM flags")
        return args, model_config
    path, _ = iteration_path(load_dir)
    return saved_args(path), os.path.join(path, COMMON)


def teacher_meta(load_dir: str, *, vocab_size: int, model_config: str | None = None,
                 tokenizer_model: str | None = None) -> dict:
    """The teacher metadata salt_megatron's own checkpoints carry, made from a Megatron-LM checkpoint."""
    from salt_megatron.data.tokenizer import tokenizer_hash

    path, step = iteration_path(load_dir)
    args, source = model_args(load_dir, model_config)
    arch = architecture(args, vocab_size=vocab_size, source=source)
    tokenizer = tokenizer_model or args.get("tokenizer_model")
    if not tokenizer or not os.path.exists(tokenizer):
        raise TeacherRefused(f"the teacher's tokenizer ({tokenizer or 'none named in its args'}) is not on this "
                             "machine: pass it with --teacher-tokenizer-model, so it can be checked against the "
                             "student's")
    return {"path": path, "step": step, "arch": arch.to_dict(), "tokenizer_hash": tokenizer_hash(tokenizer),
            "tokenizer_model": os.path.abspath(tokenizer), "megatron_lm": True, "fingerprint": None}
