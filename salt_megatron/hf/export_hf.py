"""``salt-megatron export-hf``: a checkpoint of Llama shape as a Hugging Face directory.

    salt-megatron export-hf --load CKPT --out DIR [--dtype auto|float32|bfloat16|float16] [--tokenizer-model M]

Writes ``config.json``, ``model.safetensors`` and the tokenizer files, which
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads offline.  Llama shape: RMSNorm, SwiGLU, RoPE, no
biases (``--normalization RMSNorm --swiglu``); a model imported with q/k/v biases exports as Qwen2.  The directory
is written under a temporary name and renamed when complete; an existing non-empty ``--out`` is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from salt_megatron import checkpointing
from salt_megatron.errors import ArgumentParser, DataError, UsageError, require_modules
from salt_megatron.files import atomic_directory
from salt_megatron.hf.config import check_exportable, hf_config
from salt_megatron.hf.weights import from_megatron, single_process_model
from salt_megatron.model import GPTArchitecture

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _tokenizer_files(tokenizer, tmp_dir: str) -> tuple[int | None, int | None]:
    """Write the tokenizer the model was trained with into ``tmp_dir``; returns (bos id, eos id) for config.json."""
    spec = getattr(tokenizer, "spec", None)
    if spec is not None and spec.get("type") == "NullTokenizer":  # ids as text: nothing for transformers to load
        return None, tokenizer.eod
    if spec is not None:  # HF or GPT-2 BPE: its tokenizer.json and what BOS/EOS it uses
        with open(os.path.join(tmp_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(spec["tokenizer_json"])
        bos, eos = spec["bos_token_id"], spec["eos_token_id"]
        vocab = {i: t for t, i in tokenizer._tokenizer.get_vocab(with_added_tokens=True).items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": vocab.get(eos),
                  **({"bos_token": vocab[bos]} if bos is not None and bos in vocab else {})}
    else:  # salt_megatron's own SentencePiece model (ids: unk 0, bos 1, eos/EOD 2, pad 3)
        shutil.copyfile(tokenizer.model_path, os.path.join(tmp_dir, "tokenizer.model"))
        bos, eos = 1, tokenizer.eod
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                  "legacy": False}
    with open(os.path.join(tmp_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return bos, eos


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="salt-megatron export-hf", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, metavar="CKPT", help="checkpoint directory (run dir or one iter_* dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype (auto: an imported model's own, else float32)")
    p.add_argument("--tokenizer-model", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--check-only", action="store_true", help="check everything, write nothing")
    return p


def export_hf(args) -> str | None:
    from salt_megatron.data.tokenizer_types import tokenizer_from_flags

    start = time.time()
    meta = checkpointing.read_meta(args.load)
    arch = GPTArchitecture.from_dict(meta["arch"])
    kind = check_exportable(arch, meta["path"])
    tokenizer = tokenizer_from_flags(args, lambda: meta["tokenizer_model"])
    if tokenizer.hash != meta.get("tokenizer_hash"):
        raise DataError(f"the tokenizer {tokenizer.model_path} differs from the one {meta['path']} was trained with "
                        f"({meta.get('tokenizer_model')}): pass that one with --tokenizer-model")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out} exists and is not an empty directory; export into a new one")
    imported = meta.get("imported_from") or {}
    dtype = imported.get("dtype", "float32") if args.dtype == "auto" else args.dtype
    require_modules("hf", "safetensors")
    if args.check_only:
        print(f"salt-megatron export-hf: the checks passed ({meta['path']} as {kind})")
        return None
    from safetensors.torch import save_file

    model = single_process_model(arch, "export-hf")
    checkpointing.load_model_weights(meta["path"], model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tensors = {name: t.to(getattr(torch, dtype)) for name, t in from_megatron(state, arch).items()}

    out = os.path.abspath(args.out.rstrip("/"))
    with atomic_directory(out) as tmp_dir:  # complete or absent: a crash leaves no half-written model
        save_file(tensors, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        bos, eos = _tokenizer_files(tokenizer, tmp_dir)
        config = hf_config(arch, kind=kind, dtype=dtype, bos_token_id=bos, eos_token_id=eos,
                           imported=imported.get("config"))
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    params = sum(t.numel() for t in tensors.values())
    print(f"exported {meta['path']} (step {meta['step']}) as {kind} ({params / 1e6:.1f}M parameters, {dtype}) to "
          f"{out} in {time.time() - start:.1f} s")
    return out


def main(argv=None) -> str | None:
    return export_hf(build_parser().parse_args(argv))
