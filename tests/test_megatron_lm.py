"""A Megatron-LM checkpoint as the teacher: laid out as Megatron-LM writes it (tracker, iter_*/ with torch_dist shards
written by megatron-core's own save path, args in the common state), it teaches exactly as the same weights in
salt_megatron's own format do; what cannot be read is one line."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from tests.cli_run import refused_in_process, run_cli, train_losses
from tests.conftest import STUDENT
from tests.dist_utils import run_workers

STEP = 8
KD = [*STUDENT, "--train-iters", "3", "--kd-steps", "2", "--eval-iters", "1", "--log-interval", "1"]


def _megatron_lm_args(tokenizer_model: str, **changes) -> argparse.Namespace:
    """The args Megatron-LM saves (its flag names) for the conftest teacher: 2 x 32, LayerNorm, GELU, RoPE."""
    args = dict(num_layers=2, hidden_size=32, ffn_hidden_size=128, num_attention_heads=2, seq_length=32,
                max_position_embeddings=32, padded_vocab_size=512, make_vocab_size_divisible_by=16,
                normalization="LayerNorm", swiglu=False, position_embedding_type="rope", add_bias_linear=True,
                untie_embeddings_and_output_weights=False, group_query_attention=False, num_query_groups=1,
                tokenizer_type="SentencePieceTokenizer", tokenizer_model=tokenizer_model, hidden_dropout=0.1,
                attention_dropout=0.1, iteration=STEP)
    args.update(changes)
    return argparse.Namespace(**args)


def _resave_as_megatron_lm(rank, world, salt_dir, out_dir, args, drop_key):
    """Load a salt_megatron teacher and save its weights the way Megatron-LM does (model sharded state dict + args in
    the common state, ``iter_NNNNNNN`` and the tracker)."""
    from megatron.core import dist_checkpointing, tensor_parallel

    from salt_megatron import checkpointing
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture, build_gpt_model

    initialize_distributed(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    meta = checkpointing.read_meta(salt_dir)
    model = build_gpt_model(GPTArchitecture.from_dict(meta["arch"]))
    checkpointing.load_model_weights(meta["path"], model)
    sharded = model.sharded_state_dict()
    if drop_key:
        sharded = {k: v for k, v in sharded.items() if drop_key not in k}
    path = os.path.join(out_dir, f"iter_{STEP:07d}")
    os.makedirs(path)
    dist_checkpointing.save({"model": sharded, "args": args, "iteration": STEP, "checkpoint_version": 3.0}, path)
    with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(STEP))


def _megatron_lm_teacher(teacher_dir, out_dir, args, drop_key=None):
    run_workers(_resave_as_megatron_lm, 1, str(teacher_dir), str(out_dir), args, drop_key)
    return out_dir


def test_a_megatron_lm_checkpoint_teaches_like_the_same_weights_in_our_format(corpus, teacher_dir, tmp_path):
    mlm = _megatron_lm_teacher(teacher_dir, tmp_path / "mlm", _megatron_lm_args(corpus + ".model"))
    files = set(os.listdir(mlm / f"iter_{STEP:07d}"))
    assert {"metadata.json", "common.pt", "__0_0.distcp"} <= files and "salt_meta.json" not in files
    runs = {}
    for name, teacher in (("ours", teacher_dir), ("megatron_lm", mlm)):
        proc = run_cli("pretrain", "--data-path", corpus, *KD, "--teacher-load", teacher, "--metrics-file",
                       tmp_path / f"{name}.jsonl")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "teacher: 2 layers x 32" in proc.stdout
        runs[name] = train_losses(tmp_path / f"{name}.jsonl")
    assert runs["megatron_lm"] == runs["ours"] and len(runs["ours"]) == 3


def test_a_model_config_yaml_stands_in_for_args_it_cannot_read(corpus, teacher_dir, tmp_path, capfd):
    mlm = _megatron_lm_teacher(teacher_dir, tmp_path / "mlm", None)  # no args in the common state
    argv = ["pretrain", "--data-path", corpus, *KD, "--teacher-load", mlm]
    refused_in_process(capfd, argv, r"common.pt holds no 'args' \(Megatron-LM's\): for a Megatron-LM teacher, "
                                    r"describe it with --teacher-model-config YAML")
    config = tmp_path / "teacher.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in vars(_megatron_lm_args(None)).items()
                                if k != "tokenizer_model"))
    refused_in_process(capfd, [*argv, "--teacher-model-config", config],
                       r"the teacher's tokenizer \(none named in its args\) is not on this machine: pass it with "
                       r"--teacher-tokenizer-model")
    proc = run_cli(*argv, "--teacher-model-config", config, "--teacher-tokenizer-model", corpus + ".model")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("changes, pattern", [
    ({"qk_layernorm": True}, r"a Megatron-LM model with qk_layernorm is not supported"),
    ({"swiglu": True}, r"add_bias_linear=True with swiglu=True"),
    ({"padded_vocab_size": 256}, r"padded vocabulary \(256\) is smaller than the student's tokenizer \(512\)"),
    ({"tokenizer_model": "/nowhere/tok.model"}, r"tokenizer \(/nowhere/tok.model\) is not on this machine"),
])
def test_what_does_not_map_is_one_line(corpus, teacher_dir, tmp_path, capfd, changes, pattern):
    args = _megatron_lm_args(**{"tokenizer_model": corpus + ".model", **changes})
    mlm = _megatron_lm_teacher(teacher_dir, tmp_path / "mlm", args)
    refused_in_process(capfd, ["pretrain", "--data-path", corpus, *KD, "--teacher-load", mlm, "--save",
                               tmp_path / "out"], pattern)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_weights_is_refused_not_half_loaded(corpus, teacher_dir, tmp_path):
    mlm = _megatron_lm_teacher(teacher_dir, tmp_path / "mlm", _megatron_lm_args(corpus + ".model"),
                               drop_key="decoder.layers")
    proc = run_cli("pretrain", "--data-path", corpus, *KD, "--teacher-load", mlm, "--save", tmp_path / "out")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert "the teacher's weights did not load from" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_megatron_lm_args_are_read_with_its_defaults():
    from salt_megatron.megatron_lm import architecture

    arch = architecture(vars(_megatron_lm_args("t.model", swiglu=True, add_bias_linear=False,
                                               normalization="RMSNorm", group_query_attention=True,
                                               num_query_groups=1, norm_epsilon=1e-6, rotary_base=500000,
                                               use_rope_scaling=True, rope_scaling_factor=32.0)),
                        vocab_size=500, source="args")
    assert (arch.activation, arch.normalization, arch.num_query_groups, arch.norm_epsilon, arch.rotary_base,
            arch.rope_scaling_factor, arch.vocab_size, arch.padded_vocab_size) == (
        "swiglu", "RMSNorm", 1, 1e-6, 500000, 32.0, 500, 512)


def _score_and_evaluate(rank, world, calls):
    """``score`` / ``evaluate`` invocations in one process (no interpreter start per call); their results."""
    from salt_megatron.scoring import build_parser as score_parser, score
    from salt_megatron.training.evaluate import build_parser as evaluate_parser, evaluate_checkpoint

    out = []
    for command, argv in calls:
        if command == "score":
            out.append(score(score_parser().parse_args(argv))[0])
        else:
            out.append(evaluate_checkpoint(evaluate_parser().parse_args(argv))["val_loss"])
    return out


def test_a_megatron_lm_checkpoint_scores_and_evaluates_like_the_same_weights_in_our_format(corpus, teacher_dir,
                                                                                          tmp_path):
    """SALT_DS with a Megatron-LM SLM: `score` writes the same scores, `evaluate` the same loss, as for the same
    weights in salt_megatron's format; without readable args, --model-config describes it."""
    import shutil

    import numpy as np

    mlm = _megatron_lm_teacher(teacher_dir, tmp_path / "mlm", _megatron_lm_args(corpus + ".model"))
    bare = _megatron_lm_teacher(teacher_dir, tmp_path / "bare", None)  # no args saved
    config = tmp_path / "model.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in vars(_megatron_lm_args(None)).items()))
    calls, data = [], {}
    for name, ckpt in (("ours", teacher_dir), ("megatron_lm", mlm)):
        data[name] = tmp_path / name / "sotu"
        data[name].parent.mkdir()
        for suffix in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx", ".model"):
            shutil.copy(corpus + suffix, str(data[name]) + suffix)
        calls += [("score", ["--load", str(ckpt), "--data-path", str(data[name]), "--no-progress"]),
                  ("evaluate", ["--load", str(ckpt), "--data-path", str(data[name])])]
    calls.append(("evaluate", ["--load", str(bare), "--data-path", corpus, "--model-config", str(config),
                               "--tokenizer-model", corpus + ".model"]))
    _, ours_loss, _, mlm_loss, bare_loss = run_workers(_score_and_evaluate, 1, calls)[0]
    scores = {name: np.load(str(d) + "_train.salt_scores.samples.npy") for name, d in data.items()}
    assert np.array_equal(scores["ours"], scores["megatron_lm"]) and scores["ours"].size > 0
    assert ours_loss == mlm_loss == bare_loss
