"""``salt-megatron``: one console command, Megatron-style flags per subcommand.

    salt-megatron prepare     text/JSONL → SentencePiece tokenizer → Megatron indexed dataset (.bin/.idx)
    salt-megatron pretrain    train a GPT model (the teacher), or a student with SALT (--teacher-load)
    salt-megatron score       the SLM scores every training window (SALT_DS data selection)
    salt-megatron cache-teacher  the SLM's top-K at every token of the KD phase's windows (offline teacher)
    salt-megatron evaluate    validation loss / perplexity of a checkpoint on any indexed dataset
    salt-megatron demo        the end-to-end CPU demo behind `make demo`
    salt-megatron experiment  the reproduction report: baselines, ablations and paired seeds (`make experiment`)
    salt-megatron report      versions, GPUs and which fused kernels this installation has (like ds_report)
    salt-megatron import-hf   a Hugging Face Llama/Qwen2/Mistral checkpoint as a salt_megatron checkpoint (teacher)
    salt-megatron export-hf   a checkpoint of Llama shape as a Hugging Face directory (transformers loads it)

A problem with the input (flags, files, checkpoints) ends the command with one line on stderr and exit code 2;
``--debug`` (or SALT_MEGATRON_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

COMMANDS = {
    "prepare": ("salt_megatron.data.prepare", "main"),
    "pretrain": ("salt_megatron.training.loop", "main"),
    "score": ("salt_megatron.scoring", "main"),
    "cache-teacher": ("salt_megatron.cache_teacher", "main"),
    "evaluate": ("salt_megatron.training.evaluate", "main"),
    "demo": ("salt_megatron.demo", "main"),
    "experiment": ("salt_megatron.experiment.run", "main"),
    "report": ("salt_megatron.report", "main"),
    "import-hf": ("salt_megatron.hf.import_hf", "main"),
    "export-hf": ("salt_megatron.hf.export_hf", "main"),
}
EXIT_USAGE = 2


def describe(error: BaseException) -> str | None:
    """One line for an error the user can fix; None for anything else (a bug: it keeps its traceback)."""
    from salt_megatron.errors import SaltError, one_line

    if isinstance(error, SaltError):
        return one_line(str(error))
    if isinstance(error, OSError) and error.filename is not None:  # a file that cannot be read or written
        return one_line(f"{error.strerror or error}: {error.filename}")
    return None


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SALT_MEGATRON_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"salt-megatron: error: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)
        return
    command = argv[0]
    # deprecation notices megatron-core's own calls raise inside torch: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
    # megatron-core 0.16 warns about its own default cuda_graph_scope whenever a TransformerConfig is made
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
    try:
        module, func = COMMANDS[command]
        getattr(importlib.import_module(module), func)(argv[1:])
    except Exception as error:  # noqa: BLE001 - sorted below: known problems become one line, bugs re-raise
        message = None if debug else describe(error)
        if message is None:
            raise
        print(f"salt-megatron {command}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    main()
