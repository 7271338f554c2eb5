"""The two ways the student is trained, behind one small interface, so there is one train step for both.

* :class:`MegatronBackend`: the GPTModel in megatron-core's ``DistributedDataParallel``, the megatron-core optimizer,
  megatron-core's pipeline schedules (``get_forward_backward_func``: gradient accumulation, PP).
* :class:`DeepSpeedBackend`: the same GPTModel inside ``deepspeed.initialize`` (ZeRO-1/2, the JSON's precision),
  megatron-core's ``parallel_state`` as its ``mpu`` so that it reduces over the data-parallel group only and TP
  works.  No pipeline parallelism.

The interface (what ``salt_megatron.training.step.train_step`` calls):

``model``            the model chunk that evaluation, the fingerprint and checkpoints use
``optimizer``        the optimizer megatron-core's ``OptimizerParamScheduler`` drives (both backends)
``zero_grad()``      before a step
``forward_backward(forward_step, batches, seq_length=, micro_batch_size=)``
                     forward and backward over this rank's micro-batches; ``forward_step(data_iterator, model)``
                     returns ``(output, loss_func)`` and ``loss_func(output)`` returns ``(loss, logs)``, as in
                     megatron-core's schedules; returns the ``logs`` of each micro-batch (last pipeline stage)
``optimizer_step()`` → ``(update_applied, grad_norm)``
``save(save_dir, step, meta)`` / ``load(checkpoint_path)``  through ``salt_megatron.checkpointing``
"""

from __future__ import annotations

from functools import partial

import torch

from salt_megatron import checkpointing

DEEPSPEED_STATE_TAG = "deepspeed"


def build_lr_scheduler(optimizer, args):
    """megatron-core's warmup + decay schedule (steps counted in samples, as Megatron does), for either optimizer."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=args.lr_decay_iters * args.global_batch_size, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant",
        # a resume checks the LR flags against the checkpoint first (training.consistency); here the flags win only
        # when --override-opt_param-scheduler says so
        # (megatron-core asserts that at most one of the two is set)
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


class MegatronBackend:
    name = "megatron-core"

    def __init__(self, ddp_model, optimizer):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model = ddp_model
        self.optimizer = optimizer
        self._schedule = get_forward_backward_func()

    @classmethod
    def build(cls, gpt_model, args, params_dtype: torch.dtype) -> "MegatronBackend":
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from salt_megatron.training.performance_arguments import ddp_and_optimizer_kwargs

        ddp_kwargs, optimizer_kwargs = ddp_and_optimizer_kwargs(args)
        ddp = DistributedDataParallel(
            config=gpt_model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, **ddp_kwargs),
            module=gpt_model,
        )
        # what Megatron-LM's training loop wires into the config: no_sync for gradient accumulation and the
        # end-of-step gradient reduction (DP all-reduce, tied-embedding sync across pipeline stages)
        gpt_model.config.no_sync_func = ddp.no_sync
        gpt_model.config.finalize_model_grads_func = finalize_model_grads
        config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
            bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype, **optimizer_kwargs,
        )
        return cls(ddp, get_megatron_optimizer(config, [ddp]))

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(self, forward_step, batches, *, seq_length: int, micro_batch_size: int) -> list[dict]:
        return self._schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
                              num_microbatches=len(batches), seq_length=seq_length,
                              micro_batch_size=micro_batch_size, forward_only=False)

    def optimizer_step(self) -> tuple[bool, float | None]:
        update_successful, grad_norm, _ = self.optimizer.step()
        return update_successful, grad_norm

    def save(self, save_dir: str, step: int, meta: dict) -> str:
        return checkpointing.save_checkpoint(save_dir, step, self.model, self.optimizer, meta)

    def load(self, checkpoint_path: str) -> None:
        checkpointing.load_checkpoint(checkpoint_path, self.model, self.optimizer)


class MegatronMPU:
    """megatron-core's parallel_state as the ``mpu`` object DeepSpeed expects."""

    def __getattr__(self, name):
        from megatron.core import parallel_state

        return getattr(parallel_state, name)

    @staticmethod
    def get_model_parallel_world_size():
        from megatron.core import parallel_state

        return torch.distributed.get_world_size(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_rank():
        from megatron.core import parallel_state

        return torch.distributed.get_rank(group=parallel_state.get_model_parallel_group())


class DeepSpeedBackend:
    """The teacher stays outside the engine; checkpoints hold the weights through ``dist_checkpointing`` (so the
    teacher and ``evaluate`` load them like any other) and the engine's optimizer / ZeRO state beside them."""

    name = "deepspeed"

    def __init__(self, engine, optimizer):
        self.engine = engine
        self.model = engine.module
        self.optimizer = optimizer

    @classmethod
    def build(cls, gpt_model, args) -> "DeepSpeedBackend":
        """``deepspeed.initialize`` around the student (fp32 weights: DeepSpeed casts to the JSON's precision)."""
        import deepspeed

        cfg = args.deepspeed_config_dict
        optimizer = None
        if "optimizer" not in cfg:
            # a client optimizer from the flags; torch's AdamW avoids DeepSpeed's JIT-built fused Adam
            decay = [p for n, p in gpt_model.named_parameters() if p.requires_grad and p.dim() > 1]
            no_decay = [p for n, p in gpt_model.named_parameters() if p.requires_grad and p.dim() <= 1]
            optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
            )
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=gpt_model, optimizer=optimizer,
            model_parameters=None if optimizer else gpt_model.parameters(), config=cfg, mpu=MegatronMPU(),
        )
        return cls(engine, ds_optimizer)

    def zero_grad(self) -> None:
        self._skipped_before = getattr(self.engine, "skipped_steps", 0)  # the engine zeroes gradients itself

    def forward_backward(self, forward_step, batches, *, seq_length: int, micro_batch_size: int) -> list[dict]:
        logs = []
        for batch in batches:
            output, loss_func = forward_step(iter([batch]), self.engine)
            loss, micro_logs = loss_func(output)
            self.engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
            self.engine.step()  # DeepSpeed wants a step after every backward; it updates at the accumulation boundary
            logs.append(micro_logs)
        return logs

    def optimizer_step(self) -> tuple[bool, float | None]:
        skipped = getattr(self.engine, "skipped_steps", 0) > getattr(self, "_skipped_before", 0)
        return not skipped, self.engine.get_global_grad_norm()

    def save(self, save_dir: str, step: int, meta: dict) -> str:
        # the engine's optimizer / ZeRO partitions (and its own module copy) go into the checkpoint being written
        write_engine_state = partial(self.engine.save_checkpoint, tag=DEEPSPEED_STATE_TAG, save_latest=False)
        return checkpointing.save_checkpoint(save_dir, step, self.model, None, meta, write_extra=write_engine_state)

    def load(self, checkpoint_path: str) -> None:
        checkpointing.load_checkpoint(checkpoint_path, self.model, None)
        path, _ = self.engine.load_checkpoint(checkpoint_path, tag=DEEPSPEED_STATE_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine state under {checkpoint_path}/{DEEPSPEED_STATE_TAG}")
