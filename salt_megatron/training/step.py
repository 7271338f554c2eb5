"""One training step, top to bottom, the same for both backends (``salt_megatron.training.backends``).

batch → student forward → teacher logits (only while ω > 0) → SALT loss → backward → optimizer step → numbers for
the log.  It reads the typed configuration of the run (``run.salt``, ``run.batch``), never the flags.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import torch

from salt_megatron.distributed import compute_device, to_device
from salt_megatron.kd import fused_linear_salt_loss, salt_loss
from salt_megatron.kd.loss import cached_salt_loss, masked_mean_cross_entropy
from salt_megatron.model import causal_attention_mask, output_layer_inputs
from salt_megatron.training.state import Run


def dp_mean(values: list[float]) -> list[float]:
    """Average numbers over the data-parallel group (each DP rank saw different samples)."""
    from megatron.core import parallel_state

    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        t /= parallel_state.get_data_parallel_world_size()
    return t.tolist()


def train_step(run: Run) -> dict:
    from megatron.core import parallel_state

    from salt_megatron.data.gpt_data import micro_batches

    salt, batch, state = run.salt, run.batch, run.state
    omega = salt.kd_weight(state.step, state.kd_ended_at)
    use_teacher = omega > 0 and run.teacher is not None and run.teacher.loaded
    measure_gap = salt.auto_switch and omega > 0  # the auto switch compares the student's CE with the teacher's
    # SALT_DS: while the teacher is in use, samples come from the selected windows; afterwards the ordinary data.
    # With --teacher-cache, the KD-phase samples carry the teacher's top-K (data.teacher_cache)
    selected = run.data.kd is not None and omega > 0
    start = time.perf_counter()
    batches = list(micro_batches(
        run.data.kd if selected else run.data.train, consumed_samples=state.consumed_samples,
        micro_batch_size=batch.micro_batch_size, global_batch_size=batch.global_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
    ))

    # --kd-fused-linear: while the teacher runs, the models hand over their output layers' inputs and weights and
    # the loss forms the logits chunk by chunk (kd.fused_linear)
    fused_linear = salt.fused_linear and use_teacher

    def loss_func(data, teacher_logits, student_weight, student_logits):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if fused_linear:  # student_logits / teacher_logits: the hidden states; the weights beside them
            (teacher_hidden, teacher_weight) = teacher_logits
            out = fused_linear_salt_loss(
                student_logits, student_weight, data["labels"], teacher_hidden, teacher_weight, kd_weight=omega,
                temperature=salt.temperature, loss_mask=data["loss_mask"], vocab_size=run.arch.vocab_size,
                tp_group=tp_group, scale_kd_by_temperature_squared=salt.scale_kd_by_temperature_squared,
                impl=salt.kernel_impl,
            )
        elif "teacher_ids" in data:  # --teacher-cache: the teacher's top-K came with the batch
            out = cached_salt_loss(
                student_logits, data["labels"], data, kd_weight=omega, temperature=salt.temperature,
                loss_mask=data["loss_mask"], vocab_size=run.arch.vocab_size, tp_group=tp_group,
                scale_kd_by_temperature_squared=salt.scale_kd_by_temperature_squared,
            )
        else:
            out = salt_loss(
                student_logits, data["labels"], teacher_logits, kd_weight=omega, temperature=salt.temperature,
                loss_mask=data["loss_mask"], vocab_size=run.arch.vocab_size, tp_group=tp_group,
                scale_kd_by_temperature_squared=salt.scale_kd_by_temperature_squared, impl=salt.kernel_impl,
                fuse_ce_with_kd=salt.fuse_ce_with_kd, kd_token_weighting=salt.token_weighting,
                kd_token_topk=salt.token_topk,
            )
        # a copy: megatron-core's schedule scales the returned loss in place (÷ micro-batches) after this returns
        logs = {"loss": out.loss.detach().clone(), "ce": out.ce, "kd": out.kd if out.kd is not None else out.ce * 0}
        if measure_gap:
            logs["teacher_ce"] = masked_mean_cross_entropy(teacher_logits, data["labels"], data["loss_mask"],
                                                           tp_group)
        return out.loss, logs

    def forward_step(data_iterator, model):
        data = to_device(next(data_iterator))
        tokens, position_ids = data["tokens"], data["position_ids"]
        with output_layer_inputs(model) if fused_linear else contextlib.nullcontext() as student_weight:
            logits = model(tokens, position_ids, causal_attention_mask(tokens.shape[1], device=tokens.device))
        teacher_logits = None
        if use_teacher and parallel_state.is_pipeline_last_stage():
            teacher_logits = (run.teacher.hidden if fused_linear else run.teacher.logits)(tokens, position_ids)
        return logits, partial(loss_func, data, teacher_logits, (student_weight or {}).get("weight"))

    run.backend.zero_grad()
    losses = run.backend.forward_backward(forward_step, batches, seq_length=batch.seq_length,
                                          micro_batch_size=batch.micro_batch_size)
    update_applied, grad_norm = run.backend.optimizer_step()
    run.scheduler.step(increment=batch.global_batch_size)
    state.step += 1
    state.consumed_samples += batch.global_batch_size

    step_time = time.perf_counter() - start
    metrics = {
        "kd_weight": omega, "lr": run.scheduler.optimizer.param_groups[0]["lr"], "step_time_s": step_time,
        "data": "kd_selected" if selected else "full",
        "token_checksum": int(dp_mean([sum(float(b["tokens"].sum()) for b in batches)])[0] * batch.data_parallel_size),
        "tokens_per_s": batch.global_batch_size * batch.seq_length / step_time,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "grad_norm_measured": grad_norm is not None,  # NaN above means "not available", not a NaN gradient
        "consumed_samples": state.consumed_samples, "global_batch_size": batch.global_batch_size,
        "skipped": not update_applied, "teacher_ran": use_teacher,
    }
    if torch.cuda.is_available():  # this rank's peak of allocated GPU memory since it started, in GiB
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if parallel_state.is_pipeline_last_stage():  # where the loss lives
        n = len(losses)
        means = dp_mean([sum(float(x[k]) for x in losses) / n for k in ("loss", "ce", "kd")])
        metrics.update(loss=means[0], ce=means[1], kd=means[2] if omega > 0 else None)
    if measure_gap:
        metrics["kd_gap"] = _kd_gap(losses)
    return metrics


def _kd_gap(losses: list[dict]) -> float:
    """Student CE - teacher CE on this step's KD batches, the same number on every rank: the last pipeline stage
    (where the losses live) has it data-parallel averaged; one all-reduce hands it to the other stages."""
    from megatron.core import parallel_state

    t = torch.zeros(2, dtype=torch.float64, device=compute_device())
    if parallel_state.is_pipeline_last_stage():
        n = len(losses)
        t[0] = dp_mean([sum(float(x["ce"]) - float(x["teacher_ce"]) for x in losses) / n])[0]
        t[1] = 1.0
    torch.distributed.all_reduce(t)
    return float(t[0] / t[1])
