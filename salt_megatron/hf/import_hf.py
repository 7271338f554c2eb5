"""``salt-megatron import-hf``: a Hugging Face Llama-family checkpoint as an ordinary salt_megatron checkpoint.

    salt-megatron import-hf --hf-model DIR --save CKPT [--tensor-model-parallel-size N]
                            [--make-vocab-size-divisible-by M] [--seq-length L]

Reads ``config.json``, the tokenizer (``tokenizer.json``) and the safetensors weights (sharded with their index, or
one file); writes ``CKPT/iter_0000000/`` (dist_checkpointing + ``salt_meta.json`` with the architecture, the
tokenizer hash and the logits fingerprint), which ``pretrain --teacher-load``, ``score`` and ``evaluate`` take as
they are.  Everything is checked before anything is written: an unsupported architecture, RoPE scaling, a missing
shard or a tensor of the wrong shape ends in one line.  ``--tensor-model-parallel-size`` and
``--make-vocab-size-divisible-by`` only set the vocabulary padding: use the student's values (the checkpoint loads
at any TP size).
"""

from __future__ import annotations

import json
import os
import time

from salt_megatron import checkpointing
from salt_megatron.errors import ArgumentParser, CheckpointError, DataError, MissingFile
from salt_megatron.hf.config import architecture_from_hf
from salt_megatron.hf.weights import read_safetensors, safetensors_files, single_process_model, to_megatron

STEP = 0  # an imported model has trained no step here; salt_meta.json's "imported_from" says where it came from


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise MissingFile(f"--hf-model {directory} is not a directory")
    if not os.path.isfile(path):
        raise MissingFile(f"{directory} has no config.json: pass a Hugging Face model directory (save_pretrained's)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object")
    return config


def original_dtype(config: dict, tensors: dict) -> str:
    """The dtype to export the model back in: the weights' own."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        return str(dtypes.pop()).removeprefix("torch.")
    return str(config.get("torch_dtype") or config.get("dtype") or "float32")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="salt-megatron import-hf", description=__doc__.splitlines()[0])
    p.add_argument("--hf-model", required=True, metavar="DIR", help="a Hugging Face model directory")
    p.add_argument("--save", required=True, metavar="CKPT", help="the salt_megatron checkpoint directory to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="the TP size the padding is for")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=None,
                   help="the model's sequence length (default: max_position_embeddings, at most 2048)")
    p.add_argument("--check-only", action="store_true", help="check everything, write nothing")
    return p


def import_hf(args) -> str | None:
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.training.evaluate import model_fingerprint

    start = time.time()
    source = args.hf_model
    config = read_config(source)
    arch = architecture_from_hf(config, tensor_model_parallel_size=args.tensor_model_parallel_size,
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                seq_length=args.seq_length, source=os.path.join(source, "config.json"))
    safetensors_files(source)  # every shard present
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > arch.vocab_size:
        raise DataError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                        f"{arch.vocab_size}")
    entries = checkpointing.checkpoint_entries(args.save)
    if entries:
        raise CheckpointError(f"--save {args.save} already holds checkpoints ({', '.join(entries[:3])}); import into "
                              "a new directory")
    model = single_process_model(arch, "import-hf")
    hf = read_safetensors(source)
    state = to_megatron(hf, model.state_dict(), arch, source)  # refuses a mismatch before any write
    if args.check_only:
        print(f"salt-megatron import-hf: the checks passed ({source}: {config['architectures'][0]}, "
              f"{arch.num_layers} layers x {arch.hidden_size})")
        return None
    model.load_state_dict(state)
    meta = {
        "arch": arch.to_dict(),
        "tokenizer_hash": tokenizer.hash,
        "tokenizer_model": os.path.abspath(source),
        "fingerprint": model_fingerprint(model, arch),
        "imported_from": {"path": os.path.abspath(source), "config": config, "dtype": original_dtype(config, hf)},
        "consumed_samples": 0,
    }
    path = checkpointing.save_checkpoint(args.save, STEP, model, None, meta)
    params = sum(t.numel() for name, t in hf.items()
                 if name != "lm_head.weight" or arch.untie_embeddings_and_output_weights)
    print(f"imported {config['architectures'][0]} ({params / 1e6:.1f}M parameters, {arch.num_layers} layers x "
          f"{arch.hidden_size}, vocab {arch.vocab_size} padded to {arch.padded_vocab_size}) from {source} into {path} "
          f"in {time.time() - start:.1f} s")
    return path


def main(argv=None) -> str | None:
    return import_hf(build_parser().parse_args(argv))
