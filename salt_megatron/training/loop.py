"""``salt-megatron pretrain``: GPT pretraining on megatron-core, with SALT when a teacher is given.

The path from flags to a trained model, top to bottom:

    flags → checks (before anything is built) → process groups → tokenizer + datasets → student (GPTModel in its
    backend) + optimizer + LR schedule → teacher (if SALT) → resume → loop of train_step → save

``setup`` (``salt_megatron.training.setup``) builds the run; ``train_step`` (``salt_megatron.training.step``) is
the whole step in one function; this module runs the loop: when to evaluate, when the teacher is released, when to
save.
"""

from __future__ import annotations

import time

from salt_megatron.data.tokenizer_types import checkpoint_record
from salt_megatron.training.arguments import build_pretrain_parser, params_dtype, parse_with_config, \
    validate_pretrain_args
from salt_megatron.training.evaluate import evaluate, model_fingerprint
from salt_megatron.training.guards import StopRequests, check_finite
from salt_megatron.training.setup import from_last_rank, setup
from salt_megatron.training.state import Run
from salt_megatron.training.step import train_step


def checkpoint_meta(run: Run) -> dict:
    """What ``salt_meta.json`` records beside the weights: enough to rebuild, resume and check the run."""
    args = run.args
    return {
        "arch": run.arch.to_dict(),
        "consumed_samples": run.state.consumed_samples,
        "kd_gaps": run.state.kd_gaps, "kd_ended_at": run.state.kd_ended_at,
        "opt_param_scheduler": run.scheduler.state_dict(),
        "salt_schedule": run.salt.schedule.state_dict() if run.salt.schedule is not None else None,
        "tokenizer_hash": run.tokenizer.hash,
        "tokenizer_model": checkpoint_record(run.tokenizer),
        "fingerprint": from_last_rank(model_fingerprint(run.backend.model, run.arch)),
        "init_fingerprint": run.init_fingerprint,
        "params_dtype": str(params_dtype(args)),
        "transformer_impl": args.transformer_impl,  # the layer spec (either reads the other's checkpoints)
        "run_record": run.record,
        "overrides": run.overrides,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }


def save(run: Run) -> str:
    path = run.backend.save(run.args.save, run.state.step, checkpoint_meta(run))
    run.writer.message(f"saved checkpoint {path}")
    return path


def evaluate_all(run: Run) -> dict | None:
    """The validation loss, and ``val_loss_NAME`` of each extra held-out set; on the last rank, else None."""
    args = run.args
    m = evaluate(run.backend.model, run.data.valid, run.batch, args.eval_iters)
    for name, dataset in run.data.extra_valid.items():
        extra = evaluate(run.backend.model, dataset, run.batch, args.eval_iters)
        if m is not None and extra is not None:
            m[f"val_loss_{name}"] = extra["val_loss"]
    if m is not None:
        m.update(run.data.eval_windows)
    return m


def train(run: Run, start_time: float | None = None) -> dict:
    args = run.args
    history = {"train": [], "eval": []}
    stop = StopRequests(exit_duration_in_mins=args.exit_duration_in_mins, exit_interval=args.exit_interval,
                        start_time=start_time or time.time())
    try:
        _loop(run, history, stop)
    finally:
        stop.close()
    history["teacher_forward_calls"] = run.teacher.forward_calls if run.teacher is not None else 0
    history["kd_ended_at"] = run.state.kd_ended_at
    return history


def _auto_switch(run: Run, gap: float) -> None:
    """--kd-transition auto: record this KD step's gap (the same number on every rank: the step all-reduced it) and
    end KD from the next step once the window's mean is within the margin."""
    state, schedule = run.state, run.salt.schedule
    state.kd_gaps = [*state.kd_gaps, gap][-schedule.auto_window:]
    if state.kd_ended_at is None and schedule.auto_switch_due(state.kd_gaps):
        state.kd_ended_at = state.step
        run.writer.message(f"step {state.step}: the student's CE on the KD batches is within {schedule.auto_margin} "
                           f"nats of the teacher's over the last {schedule.auto_window} KD steps (mean gap "
                           f"{sum(state.kd_gaps) / len(state.kd_gaps):+.4f}): KD ends, auto switch at step "
                           f"{state.step}")


def _loop(run: Run, history: dict, stop: StopRequests) -> None:
    args, state = run.args, run.state
    last_saved = run.resume_path

    def run_eval():
        m = evaluate_all(run)
        if m is not None:
            run.writer.eval(state.step, m)
            history["eval"].append({"step": state.step, **m})

    has_valid = run.data.valid is not None
    if has_valid and args.eval_interval and state.step == 0:
        run_eval()
    while state.step < args.train_iters:
        if run.teacher is not None and run.teacher.loaded and \
                not run.salt.teacher_needed(state.step, state.kd_ended_at):
            run.teacher.release()
            run.writer.message(f"step {state.step}: KD phase over (ω = 0); teacher released")
        m = train_step(run)
        if m.get("kd_gap") is not None:
            _auto_switch(run, m["kd_gap"])
        if args.check_for_nan_in_loss_and_grad:
            check_finite(state.step, m, last_saved)  # before this step can be saved
        if "loss" in m:
            history["train"].append({"step": state.step, **m})
            run.writer.train(state.step, args.train_iters, m,
                             echo=state.step % args.log_interval == 0 or state.step == args.train_iters)
        last = state.step == args.train_iters
        if has_valid and (last or (args.eval_interval and state.step % args.eval_interval == 0)):
            run_eval()
        saved_now = bool(args.save and (last or (args.save_interval and state.step % args.save_interval == 0)))
        if saved_now:
            last_saved = save(run)
        reason = stop.reason(state.step) if not last else None  # collective: every rank stops at the same step
        if reason is not None:
            if args.save and not saved_now:
                last_saved = save(run)
            run.writer.message(f"step {state.step}: {reason}; stopping"
                               + (f" (resume with --load {args.save})" if args.save else " (no --save: nothing kept)"))
            history["exit_reason"] = reason
            return


def pretrain(args, start_time: float | None = None) -> dict:
    start_time = start_time or time.time()
    run = setup(args)
    try:
        return train(run, start_time)
    finally:
        run.writer.close()


def main_returning(argv=None) -> dict:
    """Parse, check and run; returns the run's history (train/eval metrics per step) for scripts and tests."""
    from salt_megatron.distributed import world_size_from_launcher

    from salt_megatron.config import SaltConfig
    from salt_megatron.training.setup import check_inputs

    start_time = time.time()  # --exit-duration-in-mins counts from here, as Megatron-LM's from its start
    args = parse_with_config(build_pretrain_parser(), argv)
    validate_pretrain_args(args, world_size=world_size_from_launcher())
    if args.check_only:
        inputs = check_inputs(args, SaltConfig.from_args(args))
        print(f"salt-megatron pretrain: the checks passed (data {inputs.sources.train}, "
              + (f"resuming {inputs.resume_meta['path']})" if inputs.resume_meta else "a fresh start)"))
        return {"train": [], "eval": []}
    return pretrain(args, start_time)


def main(argv=None) -> None:
    main_returning(argv)
