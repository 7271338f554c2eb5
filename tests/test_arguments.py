"""pretrain's flags: the typed SALT config built from them, renamed flags, and validation through the KD op's
own rules (one place for ω and τ)."""

from __future__ import annotations

from pathlib import Path

import pytest

from salt_megatron.config import BatchConfig, KDDataSelection, SaltConfig
from salt_megatron.errors import UsageError
from salt_megatron.training.arguments import build_pretrain_parser, parse_with_config, validate_pretrain_args


def _args(*argv, world_size=1):
    args = parse_with_config(build_pretrain_parser(), ["--data-path", "unused", *argv])
    return validate_pretrain_args(args, world_size=world_size)


def test_salt_config_from_flags():
    args = _args("--train-iters", "10", "--teacher-load", "t", "--kd-steps", "3", "--kd-weight", "0.4",
                 "--kd-temperature", "2", "--kd-transition", "linear", "--kd-no-temperature-squared",
                 "--kd-impl", "torch", "--kd-data-selection", "band", "--kd-select-fraction", "0.3",
                 "--kd-select-by", "mean_loss", "--kd-scored-data-path", "other")
    salt = SaltConfig.from_args(args)
    assert salt.uses_teacher and salt.teacher_load == "t" and salt.temperature == 2.0
    assert salt.schedule.kd_steps == 3 and salt.schedule.transition == "linear"
    assert salt.kd_weight(0) == pytest.approx(0.4) and salt.kd_weight(3) == 0.0 and not salt.teacher_needed(3)
    assert not salt.scale_kd_by_temperature_squared and salt.kernel_impl == "torch" and salt.fuse_ce_with_kd
    assert salt.data_selection == KDDataSelection(mode="band", fraction=0.3, skip_fraction=0.02,
                                                  select_by="mean_loss", scored_data_path=("other",))
    with pytest.raises(AttributeError):  # frozen
        salt.temperature = 1.0


def test_baseline_config_has_no_teacher():
    salt = SaltConfig.from_args(_args())
    assert not salt.uses_teacher and salt.kd_weight(0) == 0.0 and not salt.teacher_needed(0)
    assert salt.data_selection is None


def test_batch_config():
    batch = BatchConfig.from_args(_args("--micro-batch-size", "2", "--global-batch-size", "8", world_size=2))
    assert (batch.data_parallel_size, batch.num_microbatches) == (2, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        BatchConfig(micro_batch_size=2, global_batch_size=6, data_parallel_size=2, seq_length=8)


@pytest.mark.parametrize("old, new", [("--kd-score", "--kd-select-by"), ("--kd-scores", "--kd-scored-data-path")])
def test_renamed_flags_say_their_new_name(old, new, tmp_path):
    with pytest.raises(UsageError, match=f"{old} was renamed {new}"):
        _args(old, "salt")
    config = tmp_path / "run.yaml"
    config.write_text(f"{old.lstrip('-')}: salt\n")
    with pytest.raises(UsageError, match=f"was renamed {new.lstrip('-')}"):
        _args("--config", str(config))


@pytest.mark.parametrize("flags, message", [
    (["--kd-weight", "1.5"], "--kd-weight must be in [0, 1], got 1.5"),
    (["--kd-temperature", "0"], "--kd-temperature must be > 0, got 0.0"),
])
def test_omega_and_tau_are_checked_by_the_kd_ops_rules(flags, message):
    with pytest.raises(UsageError) as e:
        _args("--train-iters", "4", "--teacher-load", "t", "--kd-steps", "2", *flags)
    assert message in str(e.value)


def test_megatron_users_spellings_and_defaults():
    parser = build_pretrain_parser()
    assert parser.parse_args(["--deepspeed_config", "ds.json"]).deepspeed_config == "ds.json"  # DeepSpeed's own
    args = parser.parse_args([])
    assert args.check_for_nan_in_loss_and_grad is True and args.log_format == "salt"
    assert parser.parse_args(["--no-check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad is False
    # the defaults README's "Coming from Megatron-LM" table says differ from Megatron-LM's
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for flag, value in (("position_embedding_type", "rope"), ("hidden_dropout", 0.0), ("lr_decay_style", "cosine"),
                        ("weight_decay", 0.1), ("adam_beta2", 0.95), ("log_interval", 1), ("eval_iters", 10)):
        assert getattr(args, flag) == value, flag
        assert f"`--{flag.replace('_', '-')}" in readme, flag


def test_speed_and_memory_flags_reach_megatron_cores_configs():
    from salt_megatron.training.performance_arguments import ddp_and_optimizer_kwargs, transformer_config_kwargs

    args = _args("--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "block",
                 "--recompute-num-layers", "2")
    assert args.transformer_impl == "local"  # no Transformer Engine and no GPU here
    assert transformer_config_kwargs(args) == {"sequence_parallel": False, "recompute_granularity": "full",
                                               "recompute_method": "block", "recompute_num_layers": 2}
    selective = _args("--recompute-activations")
    assert transformer_config_kwargs(selective)["recompute_granularity"] == "selective"
    assert ddp_and_optimizer_kwargs(_args("--overlap-grad-reduce")) == (
        {"use_distributed_optimizer": False, "overlap_grad_reduce": True, "overlap_param_gather": False},
        {"use_distributed_optimizer": False})


@pytest.mark.parametrize("flags, message", [
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine needs Transformer Engine "
                                                   "and a GPU"),
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "5"],
     r"--recompute-num-layers must be in \[1, 4\]"),
    (["--recompute-activations", "--recompute-granularity", "full"], "--recompute-activations is"),
    (["--recompute-method", "block"], "go with --recompute-granularity full"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2"], "--sequence-parallel needs Transformer Engine's"),
    (["--deepspeed", "--use-distributed-optimizer"], "with --deepspeed the ZeRO stage"),
    (["--kd-fused-linear"], "--kd-fused-linear needs --teacher-load"),
    (["--kd-fused-linear", "--teacher-load", "t", "--kd-steps", "1", "--kd-transition", "auto"],
     r"--kd-fused-linear does not go with --kd-transition auto \(reads the teacher's logits\)"),
])
def test_speed_and_memory_flags_that_cannot_work_are_refused(flags, message):
    with pytest.raises(UsageError, match=message):
        _args("--num-layers", "4", *flags, world_size=2)
