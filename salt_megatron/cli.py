"""``salt-megatron``: one console command, Megatron-style flags per subcommand.

    salt-megatron prepare   text/JSONL → SentencePiece tokenizer → Megatron indexed dataset (.bin/.idx)
    salt-megatron pretrain  train a GPT model (the teacher), or a student with SALT (--teacher-load)
    salt-megatron score     the SLM scores every training window (SALT_DS data selection)
    salt-megatron evaluate  validation loss / perplexity of a checkpoint on any indexed dataset
    salt-megatron demo      the end-to-end CPU demo behind `make demo`
    salt-megatron experiment  the reproduction report: baselines, ablations and paired seeds (`make experiment`)
"""

from __future__ import annotations

import sys

COMMANDS = {
    "prepare": ("salt_megatron.data.prepare", "main"),
    "pretrain": ("salt_megatron.training.loop", "main"),
    "score": ("salt_megatron.scoring", "main"),
    "evaluate": ("salt_megatron.training.evaluate", "main"),
    "demo": ("salt_megatron.demo", "main"),
    "experiment": ("salt_megatron.experiment.run", "main"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"salt-megatron: unknown command {argv[0]!r}")
        return
    import importlib

    module, func = COMMANDS[argv[0]]
    getattr(importlib.import_module(module), func)(argv[1:])


if __name__ == "__main__":
    main()
