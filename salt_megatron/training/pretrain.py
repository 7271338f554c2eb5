"""``salt-megatron pretrain``: GPT pretraining on megatron-core, with SALT when a teacher is given.

The path from flags to a trained model, top to bottom:

    flags → checks (before anything is built) → process groups → tokenizer + datasets → teacher (if SALT) →
    student (GPTModel in megatron-core DDP) → optimizer + LR schedule → resume → loop of train_step → save

``train_step`` is the whole step in one function: batch → student forward → teacher forward (only while ω > 0) →
SALT loss → backward (megatron-core's pipeline schedule) → optimizer step → numbers for the log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial

import torch

from salt_megatron import fingerprint
from salt_megatron.compat import ensure_megatron_runs_here
from salt_megatron.distributed import compute_device, initialize_distributed, to_device
from salt_megatron.kd_loss import salt_loss
from salt_megatron.model import (GPTArchitecture, build_gpt_model, causal_attention_mask, pad_vocab_size,
                                 whole_model_process_groups)
from salt_megatron.schedule import SaltSchedule
from salt_megatron.training import checkpointing
from salt_megatron.training.arguments import build_pretrain_parser, parse_with_config, validate_pretrain_args
from salt_megatron.training.metrics import MetricsWriter


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    args: object
    arch: GPTArchitecture
    model: object  # megatron-core DistributedDataParallel(GPTModel); with --deepspeed the engine's GPTModel
    optimizer: object
    scheduler: object
    schedule: SaltSchedule | None
    teacher: object | None
    train_ds: object
    valid_ds: object | None
    kd_ds: object | None  # SALT_DS: the selected windows the KD phase draws from (None: the ordinary data)
    tokenizer: object
    state: TrainState
    writer: MetricsWriter
    forward_backward: object
    init_fingerprint: list | None = None
    engine: object | None = None  # the DeepSpeed engine (--deepspeed)
    extra_valid: dict = dataclasses.field(default_factory=dict)  # --extra-valid-data-path: {name: dataset}


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


def _micro_batch_iterator(run: Run, dataset, consumed_samples: int):
    from megatron.core import parallel_state

    from salt_megatron.data.gpt_data import micro_batches

    return micro_batches(
        dataset, consumed_samples=consumed_samples, micro_batch_size=run.args.micro_batch_size,
        global_batch_size=run.args.global_batch_size, dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def _num_microbatches(args) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def _dp_mean(values: list[float]) -> list[float]:
    """Average numbers over the data-parallel group (each DP rank saw different samples)."""
    from megatron.core import parallel_state

    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        t /= parallel_state.get_data_parallel_world_size()
    return t.tolist()


def _step_plan(run: Run):
    """This step's ω, whether the teacher runs, and (SALT_DS) whether samples come from the selected windows."""
    omega = run.schedule.weight(run.state.step) if run.schedule is not None else 0.0
    use_teacher = omega > 0 and run.teacher is not None and run.teacher.loaded
    selected = run.kd_ds is not None and omega > 0
    return omega, use_teacher, selected


def _loss(run: Run, omega: float, batch: dict, student_logits, teacher_logits):
    from megatron.core import parallel_state

    args = run.args
    return salt_loss(
        student_logits, batch["labels"], teacher_logits, kd_weight=omega, temperature=args.kd_temperature,
        loss_mask=batch["loss_mask"], vocab_size=run.arch.vocab_size,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        scale_kd_by_temperature_squared=not args.kd_no_temperature_squared, impl=args.kd_impl,
    )


def _step_metrics(run: Run, *, omega, use_teacher, selected, batches, start, lr, grad_norm, skipped) -> dict:
    args = run.args
    step_time = time.perf_counter() - start
    return {"kd_weight": omega, "lr": lr, "step_time_s": step_time, "data": "kd_selected" if selected else "full",
            "token_checksum": int(_dp_mean([sum(float(b["tokens"].sum()) for b in batches)])[0]
                                  * args.data_parallel_size),
            "tokens_per_s": args.global_batch_size * args.seq_length / step_time,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped": bool(skipped), "teacher_ran": use_teacher}


def train_step(run: Run) -> dict:
    from megatron.core import parallel_state

    args, state = run.args, run.state
    omega, use_teacher, selected = _step_plan(run)
    start = time.perf_counter()
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()

    def loss_func(batch, teacher_logits, student_logits):
        out = _loss(run, omega, batch, student_logits, teacher_logits)
        logs = {"loss": out.loss.detach(), "ce": out.ce, "kd": out.kd if out.kd is not None else out.ce * 0}
        return out.loss, logs

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        tokens, position_ids = batch["tokens"], batch["position_ids"]
        logits = model(tokens, position_ids, causal_attention_mask(tokens.shape[1], device=tokens.device))
        teacher_logits = None
        if use_teacher and parallel_state.is_pipeline_last_stage():
            teacher_logits = run.teacher.logits(tokens, position_ids)
        return logits, partial(loss_func, batch, teacher_logits)

    # SALT_DS: while the teacher is in use, samples come from the selected windows; afterwards the ordinary data
    batches = list(_micro_batch_iterator(run, run.kd_ds if selected else run.train_ds, state.consumed_samples))
    losses = run.forward_backward(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[run.model],
        num_microbatches=_num_microbatches(args), seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False,
    )
    update_successful, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=args.global_batch_size)
    state.step += 1
    state.consumed_samples += args.global_batch_size

    metrics = _step_metrics(run, omega=omega, use_teacher=use_teacher, selected=selected, batches=batches,
                            start=start, lr=run.optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                            skipped=not update_successful)
    if parallel_state.is_pipeline_last_stage():
        n = len(losses)
        means = _dp_mean([sum(float(x[k]) for x in losses) / n for k in ("loss", "ce", "kd")])
        metrics.update(loss=means[0], ce=means[1], kd=means[2] if omega > 0 else None)
    return metrics


def train_step_deepspeed(run: Run) -> dict:
    """The same step through a DeepSpeed engine: it accumulates over the micro-batches and steps at the boundary."""
    args, state, engine = run.args, run.state, run.engine
    omega, use_teacher, selected = _step_plan(run)
    start = time.perf_counter()
    batches = list(_micro_batch_iterator(run, run.kd_ds if selected else run.train_ds, state.consumed_samples))
    parts = []
    for cpu_batch in batches:
        batch = to_device(cpu_batch)
        tokens, position_ids = batch["tokens"], batch["position_ids"]
        logits = engine(tokens, position_ids, causal_attention_mask(tokens.shape[1], device=tokens.device))
        teacher_logits = run.teacher.logits(tokens, position_ids) if use_teacher else None
        out = _loss(run, omega, batch, logits, teacher_logits)
        engine.backward(out.loss)  # DeepSpeed divides by its gradient_accumulation_steps
        engine.step()  # an optimizer step only at the accumulation boundary
        parts.append([float(out.loss), float(out.ce), float(out.kd) if out.kd is not None else 0.0])
    run.scheduler.step(increment=args.global_batch_size)
    state.step += 1
    state.consumed_samples += args.global_batch_size
    metrics = _step_metrics(run, omega=omega, use_teacher=use_teacher, selected=selected, batches=batches,
                            start=start, lr=run.scheduler.optimizer.param_groups[0]["lr"],
                            grad_norm=engine.get_global_grad_norm(), skipped=getattr(engine, "skipped_steps", 0))
    means = _dp_mean([sum(p[i] for p in parts) / len(parts) for i in range(3)])
    metrics.update(loss=means[0], ce=means[1], kd=means[2] if omega > 0 else None)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (also used by `salt-megatron evaluate`)
# ---------------------------------------------------------------------------------------------------------------


def evaluate(model, dataset, args, forward_backward, eval_iters: int) -> dict | None:
    """Mean next-token loss over ``eval_iters`` global batches of ``dataset`` from its start (the same samples every
    time, so curves are comparable).  Returns {"val_loss", "val_ppl", "val_tokens"} on the last stage, else None."""
    from megatron.core import parallel_state

    from salt_megatron.data.gpt_data import micro_batches

    def loss_func(batch, logits):
        ce = salt_loss(logits, batch["labels"], kd_weight=0.0, loss_mask=batch["loss_mask"],
                       tp_group=parallel_state.get_tensor_model_parallel_group())
        return ce.loss, {"ce_sum": (ce.ce * ce.num_tokens).item(), "tokens": ce.num_tokens.item()}

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        tokens = batch["tokens"]
        logits = model(tokens, batch["position_ids"], causal_attention_mask(tokens.shape[1], device=tokens.device))
        return logits, partial(loss_func, batch)

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=compute_device())
    with torch.no_grad():
        for i in range(eval_iters):
            batches = micro_batches(
                dataset, consumed_samples=i * args.global_batch_size, micro_batch_size=args.micro_batch_size,
                global_batch_size=args.global_batch_size, dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(),
            )
            out = forward_backward(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                num_microbatches=_num_microbatches(args), seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=True,
            )
            for x in out or []:
                total += torch.tensor([float(x["ce_sum"]), float(x["tokens"])], dtype=torch.float64, device=total.device)
    if was_training:
        model.train()
    if not parallel_state.is_pipeline_last_stage():
        return None
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss = float(total[0] / total[1].clamp(min=1))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1])}


def model_fingerprint(model, arch: GPTArchitecture, args, forward_backward) -> list | None:
    """The logits fingerprint (see ``salt_megatron.fingerprint``), through the pipeline; on the last stage."""
    from megatron.core import parallel_state

    probe = to_device(dict(zip(("tokens", "position_ids"), fingerprint.probe_batch(arch.vocab_size, arch.seq_length))))
    tokens, position_ids = probe["tokens"], probe["position_ids"]
    result = {}

    def forward_step(data_iterator, model_chunk):
        logits = model_chunk(tokens, position_ids, causal_attention_mask(tokens.shape[1], device=tokens.device))

        def loss_func(out):
            result["fp"] = fingerprint.summarize(out, parallel_state.get_tensor_model_parallel_group())
            return out.float().sum() * 0, {}

        return logits, loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        forward_backward(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                         num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=1, forward_only=True)
    if was_training:
        model.train()
    return result.get("fp")


def _from_last_rank(obj):
    """Send a picklable object from the last rank (the last pipeline stage, where logits live) to every rank."""
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=torch.distributed.get_world_size() - 1)
    return holder[0]


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------


def _params_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _checkpoint_meta(run: Run) -> dict:
    args = run.args
    return {
        "arch": run.arch.to_dict(),
        "consumed_samples": run.state.consumed_samples,
        "opt_param_scheduler": run.scheduler.state_dict(),
        "salt_schedule": run.schedule.state_dict() if run.schedule is not None else None,
        "tokenizer_hash": run.tokenizer.hash,
        "tokenizer_model": os.path.abspath(run.tokenizer.model_path),
        "fingerprint": _from_last_rank(model_fingerprint(run.model, run.arch, args, run.forward_backward)),
        "init_fingerprint": run.init_fingerprint,
        "params_dtype": str(_params_dtype(args)),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }


def save(run: Run) -> str:
    write_extra = None
    if run.engine is not None:
        from salt_megatron.training.deepspeed_engine import save_engine_state

        write_extra = partial(save_engine_state, run.engine)
    optimizer = None if run.engine is not None else run.optimizer  # DeepSpeed keeps its optimizer state itself
    path = checkpointing.save_checkpoint(run.args.save, run.state.step, run.model, optimizer,
                                         _checkpoint_meta(run), write_extra=write_extra)
    run.writer.message(f"saved checkpoint {path}")
    return path


def _build_optimizer(args, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, params_dtype=_params_dtype(args), use_distributed_optimizer=False,
    )
    return get_megatron_optimizer(config, [model])


def build_lr_scheduler(optimizer, args):
    """megatron-core's warmup + decay schedule (steps counted in samples, as Megatron does), for either optimizer."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=args.lr_decay_iters * args.global_batch_size, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant",
    )


def _wrap_ddp(model, args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False),
        module=model,
    )
    # what Megatron-LM's training loop wires into the config: no_sync for gradient accumulation and the
    # end-of-step gradient reduction (DP all-reduce, tied-embedding sync across pipeline stages)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def setup(args) -> Run:
    """Everything before the first step.  Refusals happen here, before any model is trained or file written."""
    ensure_megatron_runs_here()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from salt_megatron.data.gpt_data import build_gpt_datasets, resolve_data_prefixes
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.teacher import Teacher, check_teacher_checkpoint

    # cheap checks first: data files, tokenizer, teacher metadata, resume point
    try:
        train_prefix, valid_prefix = resolve_data_prefixes(args.data_path, args.train_data_path,
                                                           args.valid_data_path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"salt-megatron: refusing to start: {e}") from None
    tokenizer_model = args.tokenizer_model or _default_tokenizer(args, train_prefix)
    tokenizer = load_tokenizer(tokenizer_model)
    padded = pad_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by)
    arch = GPTArchitecture(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, seq_length=args.seq_length, vocab_size=tokenizer.vocab_size,
        padded_vocab_size=padded, num_query_groups=args.num_query_groups, normalization=args.normalization,
        activation="swiglu" if args.swiglu else "gelu", position_embedding_type=args.position_embedding_type,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
    )
    resume_meta = None
    if args.load:
        try:
            resume_meta = checkpointing.read_meta(args.load)
        except checkpointing.CheckpointError:
            resume_meta = None  # nothing to resume from yet: start fresh (Megatron's behaviour)
        if resume_meta is not None and resume_meta.get("tokenizer_hash") != tokenizer.hash:
            raise SystemExit(f"salt-megatron: refusing to resume from {resume_meta['path']}: another tokenizer")
    start_step = int(resume_meta["step"]) if resume_meta else 0
    schedule = None
    teacher_meta = None
    if args.teacher_load:
        schedule = SaltSchedule(kd_weight=args.kd_weight, kd_steps=args.kd_steps, transition=args.kd_transition,
                                decay_steps=args.kd_decay_steps)
        teacher_meta = check_teacher_checkpoint(args.teacher_load, tokenizer_hash=tokenizer.hash,
                                                padded_vocab_size=padded)

    sidecar = None
    if args.kd_data_selection != "none":
        from salt_megatron.data import scores

        scored_prefix = args.kd_scores or train_prefix
        try:
            sidecar = scores.load_sidecar(scored_prefix, seq_length=args.seq_length)
        except (FileNotFoundError, scores.SidecarMismatch) as e:
            raise SystemExit(f"salt-megatron: refusing to start: {e}") from None
        if sidecar[0].get("tokenizer_hash") != tokenizer.hash:
            raise SystemExit("salt-megatron: refusing to start: the score sidecar was made with another tokenizer")

    extra_valid_prefixes = getattr(args, "extra_valid", {})
    for name, prefix in extra_valid_prefixes.items():
        other = _prepared_tokenizer_hash(prefix)
        if other is not None and other != tokenizer.hash:
            raise SystemExit(f"salt-megatron: refusing to start: extra validation set {name} ({prefix}) was "
                             f"tokenized with another tokenizer")

    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes)
    last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    writer = MetricsWriter(enabled=last_rank, tensorboard_dir=args.tensorboard_dir, metrics_file=args.metrics_file)

    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

    train_ds, valid_ds = build_gpt_datasets(
        train_prefix, valid_prefix, tokenizer, seq_length=args.seq_length, seed=args.seed,
        train_samples=args.train_iters * args.global_batch_size,
        valid_samples=max(args.eval_iters, 1) * args.global_batch_size, cache_dir=args.data_cache_path,
    )

    extra_valid = {
        name: build_gpt_datasets(prefix, None, tokenizer, seq_length=args.seq_length, seed=args.seed,
                                 train_samples=max(args.eval_iters, 1) * args.global_batch_size, valid_samples=None,
                                 cache_dir=args.data_cache_path)[0]
        for name, prefix in extra_valid_prefixes.items()
    }

    kd_ds = None
    if sidecar is not None:
        from salt_megatron.data.selection import SelectedWindows
        from salt_megatron.scoring import ScoredWindows

        header, window_scores, _ = sidecar
        scored_ds, _ = build_gpt_datasets(args.kd_scores or train_prefix, None, tokenizer, seq_length=args.seq_length,
                                          seed=header["seed"], train_samples=None, valid_samples=None,
                                          cache_dir=args.data_cache_path)
        kd_ds = SelectedWindows(ScoredWindows(scored_ds), header, window_scores, score=args.kd_score,
                                mode=args.kd_data_selection, fraction=args.kd_select_fraction,
                                skip_fraction=args.kd_select_skip_fraction, seed=args.seed,
                                cache_dir=args.data_cache_path)
        writer.message(f"SALT_DS: KD phase draws from {kd_ds.num_selected} of {window_scores.shape[0]} windows "
                       f"({args.kd_data_selection}, score {args.kd_score}, sidecar {kd_ds.sidecar_hash})")

    # the student first, so its initialisation is the baseline's whatever the teacher is (paired comparisons)
    forward_backward = get_forward_backward_func()
    engine = None
    if args.deepspeed:
        from salt_megatron.training.deepspeed_engine import build_engine

        # fp32 weights: DeepSpeed casts the module to the JSON's precision itself
        model = build_gpt_model(arch, params_dtype=torch.float32)
        engine, optimizer = build_engine(model, args)
        ddp = engine.module
    else:
        model = build_gpt_model(arch, params_dtype=_params_dtype(args))
        ddp = _wrap_ddp(model, args)
        optimizer = _build_optimizer(args, ddp)
    scheduler = build_lr_scheduler(optimizer, args)

    teacher = None
    if teacher_meta is not None and schedule.teacher_needed(start_step):
        rng = checkpointing.rng_state()  # building the teacher draws init numbers: keep the student's stream
        pgs = whole_model_process_groups() if args.pipeline_model_parallel_size > 1 else None
        teacher = Teacher(teacher_meta, params_dtype=_params_dtype(args),
                          is_last_stage=parallel_state.is_pipeline_last_stage(),
                          tp_group=parallel_state.get_tensor_model_parallel_group(), pg_collection=pgs)
        checkpointing.set_rng_state(rng)
        writer.message(f"teacher: {teacher.arch.num_layers} layers x {teacher.arch.hidden_size} from "
                       f"{teacher_meta['path']} (step {teacher_meta['step']}); KD for steps [0, {args.kd_steps}), "
                       f"ω={args.kd_weight}, τ={args.kd_temperature}, {args.kd_transition}")

    run = Run(args=args, arch=arch, model=ddp, optimizer=optimizer, scheduler=scheduler, schedule=schedule,
              teacher=teacher, train_ds=train_ds, valid_ds=valid_ds, kd_ds=None, tokenizer=tokenizer,
              state=TrainState(),
              writer=writer, forward_backward=forward_backward, engine=engine, extra_valid=extra_valid)
    run.kd_ds = kd_ds
    if resume_meta is not None:
        checkpointing.load_checkpoint(resume_meta["path"], ddp, None if engine is not None else optimizer)
        if engine is not None:
            from salt_megatron.training.deepspeed_engine import load_engine_state

            load_engine_state(engine, resume_meta["path"])
        scheduler.load_state_dict(resume_meta["opt_param_scheduler"])
        run.state = TrainState(step=start_step, consumed_samples=int(resume_meta["consumed_samples"]))
        run.init_fingerprint = resume_meta.get("init_fingerprint")
        writer.message(f"resumed from {resume_meta['path']} at step {start_step}")
    else:
        run.init_fingerprint = _from_last_rank(model_fingerprint(ddp, arch, args, forward_backward))
    params = sum(p.numel() for p in model.parameters())
    writer.message(f"model: {arch.num_layers} layers x {arch.hidden_size}, {params / 1e6:.2f}M parameters on "
                   f"rank {torch.distributed.get_rank()}; TP={args.tensor_model_parallel_size} "
                   f"PP={args.pipeline_model_parallel_size} DP={args.data_parallel_size}; vocab {arch.vocab_size} "
                   f"(padded {padded})")
    return run


def _prepared_tokenizer_hash(prefix: str) -> str | None:
    """The tokenizer hash ``prepare`` recorded for a dataset prefix (``P_train``/``P_valid`` → ``P.json``), if any."""
    for candidate in (prefix + ".json", prefix.rsplit("_", 1)[0] + ".json"):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f).get("tokenizer_hash")
    return None


def _default_tokenizer(args, train_prefix: str) -> str:
    candidates = [p + ".model" for p in (args.data_path, train_prefix) if p]
    candidates.append(train_prefix.rsplit("_train", 1)[0] + ".model")
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise SystemExit(f"salt-megatron: no tokenizer: pass --tokenizer-model (looked for {', '.join(candidates)})")


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def train(run: Run) -> dict:
    args, state = run.args, run.state
    history = {"train": [], "eval": []}

    def run_eval():
        m = evaluate(run.model, run.valid_ds, args, run.forward_backward, args.eval_iters)
        for name, dataset in run.extra_valid.items():
            extra = evaluate(run.model, dataset, args, run.forward_backward, args.eval_iters)
            if m is not None and extra is not None:
                m[f"val_loss_{name}"] = extra["val_loss"]
        if m is not None:
            run.writer.eval(state.step, m)
            history["eval"].append({"step": state.step, **m})

    has_valid = run.valid_ds is not None
    if has_valid and args.eval_interval and state.step == 0:
        run_eval()
    while state.step < args.train_iters:
        if run.teacher is not None and run.teacher.loaded and not run.schedule.teacher_needed(state.step):
            run.teacher.release()
            run.writer.message(f"step {state.step}: KD phase over (ω = 0); teacher released")
        m = train_step_deepspeed(run) if run.engine is not None else train_step(run)
        if "loss" in m:
            history["train"].append({"step": state.step, **m})
            run.writer.train(state.step, args.train_iters, m,
                             echo=state.step % args.log_interval == 0 or state.step == args.train_iters)
        if has_valid and (state.step == args.train_iters or (args.eval_interval and state.step % args.eval_interval == 0)):
            run_eval()
        if args.save and (state.step == args.train_iters or (args.save_interval and state.step % args.save_interval == 0)):
            save(run)
    history["teacher_forward_calls"] = run.teacher.forward_calls if run.teacher is not None else 0
    return history


def pretrain(args) -> dict:
    run = setup(args)
    try:
        return train(run)
    finally:
        run.writer.close()


def main_returning(argv=None) -> dict:
    """Parse, check and run; returns the run's history (train/eval metrics per step) for scripts and tests."""
    args = parse_with_config(build_pretrain_parser(), argv)
    validate_pretrain_args(args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    return pretrain(args)


def main(argv=None) -> None:
    main_returning(argv)
