#!/usr/bin/env python
"""Scoring throughput ÷ the same SLM's forward throughput in training, same batch shape, measured in one run.

* training forward: the model in train mode with autograd on, logits + megatron-core's vocab-parallel CE (what a
  training step's forward does), over the same micro-batches;
* scoring: ``salt_megatron.scoring._score_chunk`` (forward under inference mode, per-token loss, top-k filter,
  per-window and per-document scores) over the same windows.

The two are alternated ``--repeats`` times; the ratio is of total tokens/s.  Target: >= 0.9.

    python benchmarks/scoring.py [--windows 256] [--micro-batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

SLM = dict(num_layers=2, hidden_size=128, num_attention_heads=4)
SEQ, VOCAB = 128, 4096


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    from salt_megatron.data.corpora import prepare_sotu
    from salt_megatron.data.gpt_data import build_gpt_datasets, collate
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.kd import salt_loss
    from salt_megatron.model import GPTArchitecture, build_gpt_model, causal_attention_mask, pad_vocab_size
    from salt_megatron.data.windows import UnshuffledWindows
    from salt_megatron.scoring import _score_chunk

    work = args.workdir or tempfile.mkdtemp(prefix="salt_scoring_bench_")
    prefix = prepare_sotu(work, VOCAB)
    initialize_distributed(1, 1)
    from megatron.core import parallel_state, tensor_parallel

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    tok = load_tokenizer(prefix + ".model")
    arch = GPTArchitecture(**SLM, ffn_hidden_size=4 * SLM["hidden_size"], seq_length=SEQ, vocab_size=tok.vocab_size,
                           padded_vocab_size=pad_vocab_size(tok.vocab_size, 1))
    model = build_gpt_model(arch)
    ds, _ = build_gpt_datasets(prefix + "_train", None, tok, seq_length=SEQ, seed=1234, train_samples=None,
                               valid_samples=None, cache_dir=os.path.join(work, "cache"))
    windows = UnshuffledWindows(ds)
    n = min(args.windows, len(windows))
    batches = [collate([windows.item(w) for w in range(s, min(n, s + args.micro_batch_size))])
               for s in range(0, n, args.micro_batch_size)]
    mask = causal_attention_mask(SEQ)
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def training_forward():
        model.train()
        for b in batches:
            logits = model(b["tokens"], b["position_ids"], mask)
            salt_loss(logits, b["labels"], kd_weight=0.0, loss_mask=b["loss_mask"], tp_group=tp_group).loss
        model.zero_grad(set_to_none=True)

    def scoring():
        model.eval()
        _score_chunk(model, windows, 0, n, seq_length=SEQ, micro_batch_size=args.micro_batch_size, topk=10,
                     vocab_size=arch.vocab_size, tp_group=tp_group)

    times = {"training_forward": 0.0, "scoring": 0.0}
    training_forward(), scoring()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("training_forward", training_forward), ("scoring", scoring)):
            start = time.perf_counter()
            fn()
            times[name] += time.perf_counter() - start
    tokens = n * SEQ * args.repeats
    fwd, sc = tokens / times["training_forward"], tokens / times["scoring"]
    print(f"SLM {SLM}, vocab {tok.vocab_size}, seq {SEQ}, micro batch {args.micro_batch_size}, {n} windows x "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"training forward {fwd:,.0f} tok/s | scoring {sc:,.0f} tok/s | ratio {sc / fwd:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
