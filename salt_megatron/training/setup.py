"""Everything before the first step of ``pretrain``, one concern per function.

    check_inputs (files, tokenizer, teacher metadata, resume point: cheap, before anything is built)
    → process groups → build_data → build_student → build_teacher → resume

Refusals happen in ``check_inputs`` and the flag validation before it, before any model is trained or file written.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from salt_megatron import checkpointing
from salt_megatron.config import BatchConfig, SaltConfig
from salt_megatron.distributed import initialize_distributed
from salt_megatron.data import scores
from salt_megatron.errors import DataError, UsageError
from salt_megatron.model import GPTArchitecture, build_gpt_model, pad_vocab_size, whole_model_process_groups
from salt_megatron.training.arguments import params_dtype
from salt_megatron.training.backends import DeepSpeedBackend, MegatronBackend, build_lr_scheduler
from salt_megatron.training.consistency import check_resume, run_record
from salt_megatron.training.evaluate import model_fingerprint
from salt_megatron.training.metrics import MetricsWriter
from salt_megatron.training.performance_arguments import transformer_config_kwargs
from salt_megatron.training.state import Data, Run, TrainState


@dataclasses.dataclass
class Inputs:
    """What the cheap checks found: the run's files, tokenizer, architecture and the checkpoints it reads."""

    sources: object  # salt_megatron.data.blend.DataSources: the training and validation blends
    tokenizer: object
    arch: GPTArchitecture
    resume_meta: dict | None  # the checkpoint to resume from
    teacher_meta: dict | None  # the teacher's checkpoint metadata (checked against the student)
    sidecars: dict | None  # SALT_DS: {scored prefix: (header, window scores, document scores)}
    scored_weights: tuple | None  # SALT_DS: the scored blend's weights (None: by size)
    record: dict  # what this run is, as a checkpoint records it (training.consistency.run_record)
    overrides: list  # changes against the resumed checkpoint that an override flag accepted
    teacher_cache: object | None = None  # --teacher-cache: salt_megatron.data.teacher_cache.TeacherCache

    @property
    def start_step(self) -> int:
        return int(self.resume_meta["step"]) if self.resume_meta else 0


def _prepared_tokenizer_hash(prefix: str) -> str | None:
    """The tokenizer hash ``prepare`` recorded for a dataset prefix (``P_train``/``P_valid`` → ``P.json``), if any."""
    for candidate in (prefix + ".json", prefix.rsplit("_", 1)[0] + ".json"):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f).get("tokenizer_hash")
    return None


def _default_tokenizer(train_prefix: str) -> str:
    from salt_megatron.hf.tokenizer import SPEC_SUFFIX

    prefixes = [train_prefix, train_prefix.rsplit("_train", 1)[0]]
    candidates = [p + ext for p in prefixes for ext in (".model", SPEC_SUFFIX)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise DataError(f"no tokenizer: pass --tokenizer-model (looked for {', '.join(candidates)})")


def student_architecture(args, vocab_size: int) -> GPTArchitecture:
    padded = pad_vocab_size(vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by)
    return GPTArchitecture(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, seq_length=args.seq_length, vocab_size=vocab_size,
        padded_vocab_size=padded, num_query_groups=args.num_query_groups, normalization=args.normalization,
        activation="swiglu" if args.swiglu else "gelu", position_embedding_type=args.position_embedding_type,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
    )


def check_inputs(args, salt: SaltConfig) -> Inputs:
    """Data files, tokenizer, resume point, teacher metadata and score sidecar: cheap, nothing is built."""
    from salt_megatron.data.blend import data_sources
    from salt_megatron.data.gpt_data import check_indexed_dataset
    from salt_megatron.data.tokenizer_types import tokenizer_from_flags
    from salt_megatron.teacher import check_teacher_checkpoint

    sources = data_sources(args)
    for prefix in (*sources.prefixes, *args.extra_valid.values()):
        check_indexed_dataset(prefix)
    tokenizer = tokenizer_from_flags(args, lambda: _default_tokenizer(sources.train.prefixes[0]))
    arch = student_architecture(args, tokenizer.vocab_size)
    # nothing to resume (no --load directory yet, or an empty one) starts fresh, as Megatron-LM does; a directory
    # that holds something it cannot follow is refused (find_latest_checkpoint)
    latest = checkpointing.find_latest_checkpoint(args.load) if args.load else None
    resume_meta = checkpointing.read_meta(latest) if latest else None
    teacher_meta = None
    if salt.teacher_load:
        teacher_meta = check_teacher_checkpoint(salt.teacher_load, tokenizer_hash=tokenizer.hash,
                                                padded_vocab_size=arch.padded_vocab_size,
                                                vocab_size=tokenizer.vocab_size,
                                                model_config=args.teacher_model_config,
                                                tokenizer_model=args.teacher_tokenizer_model)
    sidecars, scored_weights = None, None
    if salt.data_selection is not None:
        sidecars, scored_weights = _score_sidecars(args, salt, sources, tokenizer.hash)
    teacher_cache = _open_teacher_cache(args, salt, sources, tokenizer, sidecars) if salt.teacher_cache else None
    for name, prefix in args.extra_valid.items():
        other = _prepared_tokenizer_hash(prefix)
        if other is not None and other != tokenizer.hash:
            raise DataError(f"extra validation set {name} ({prefix}) was tokenized with another tokenizer")
    record = run_record(args, arch=arch, tokenizer_hash=tokenizer.hash, sources=sources,
                        teacher_fingerprint=(teacher_meta or {}).get("fingerprint")
                        or (teacher_cache and teacher_cache.header["teacher_fingerprint"]),
                        sidecar_hash=sidecars and scores.blend_sidecar_hash(
                            [h for h, _, _ in sidecars.values()], scored_weights))
    overrides = check_resume(resume_meta, record, args) if resume_meta else []
    if args.save:
        start = int(resume_meta["step"]) if resume_meta else 0
        checkpointing.check_save_directory(args.save, resuming_from=resume_meta and resume_meta["path"],
                                           steps=checkpointing.steps_to_save(start, args.train_iters,
                                                                             args.save_interval))
    return Inputs(sources, tokenizer, arch, resume_meta, teacher_meta, sidecars, scored_weights, record, overrides,
                  teacher_cache)


def _open_teacher_cache(args, salt: SaltConfig, sources, tokenizer, sidecars):
    """--teacher-cache: the cache, checked against the dataset its windows come from (the scored one under SALT_DS),
    the tokenizer, the sequence length and τ (its windows are checked in build_data, against the KD phase's)."""
    from salt_megatron.data.teacher_cache import TeacherCache

    prefixes = list(sidecars) if sidecars else sources.train.prefixes
    if len(prefixes) != 1 or sources.split is not None:
        raise UsageError("--teacher-cache reads the KD phase from one dataset (no blend, no --split)")
    cache = TeacherCache(salt.teacher_cache)
    cache.check_run(prefix=prefixes[0], seq_length=args.seq_length, temperature=salt.temperature,
                    tokenizer_hash=tokenizer.hash, vocab_size=tokenizer.vocab_size)
    return cache


def _score_sidecars(args, salt: SaltConfig, sources, tokenizer_hash: str):
    """SALT_DS: the sidecar of every prefix of the scored blend (``--kd-scored-data-path``, default the training
    blend), each checked against its dataset, the run's sequence length and tokenizer, and (for a dataset the run
    cuts with ``--split``) the same split, so that no selected window lies in the validation documents."""
    from salt_megatron.data.blend import parse_blend, require_blend

    words = salt.data_selection.scored_data_path
    blend = require_blend(parse_blend(words, "--kd-scored-data-path"), "--kd-scored-data-path") if words \
        else sources.train
    sidecars = {}
    for prefix in blend.prefixes:
        header, windows, documents = scores.load_sidecar(prefix, seq_length=args.seq_length)
        if header.get("tokenizer_hash") != tokenizer_hash:
            raise DataError(f"the score sidecar of {prefix} was made with another tokenizer: rescore it with this "
                            "run's tokenizer")
        if sources.split is not None and prefix in sources.train.prefixes and header.get("split") != sources.split:
            raise scores.SidecarMismatch(
                f"the score sidecar of {prefix} scored {'its ' + header['split'] if header.get('split') else 'all'} "
                f"windows, this run cuts it with --split {sources.split}: rescore with `salt-megatron score --split "
                f"{sources.split}`")
        sidecars[prefix] = (header, windows, documents)
    return sidecars, blend.weights


def build_data(args, inputs: Inputs, salt: SaltConfig, writer: MetricsWriter) -> Data:
    """GPTDatasets (train, valid, extra held-out sets) and, for SALT_DS, the selected windows of the KD phase.
    Collective: every rank builds (rank 0 writes megatron-core's index cache, the others wait)."""
    from salt_megatron.data.gpt_data import build_gpt_datasets, windows_hash

    def datasets(train, valid, seed, train_samples, valid_samples=None, split=None):
        return build_gpt_datasets(train, valid, inputs.tokenizer, seq_length=args.seq_length, seed=seed,
                                  train_samples=train_samples, valid_samples=valid_samples,
                                  cache_dir=args.data_cache_path, split=split, valid_seed=args.eval_seed)

    # held-out windows are shuffled by --eval-seed, not --seed: every run evaluates the same text
    eval_samples = max(args.eval_iters, 1) * args.global_batch_size
    sources = inputs.sources
    train, valid = datasets(sources.train, sources.valid, args.seed, args.train_iters * args.global_batch_size,
                            eval_samples, split=sources.split)
    extra_valid = {name: datasets(prefix, None, args.eval_seed, eval_samples)[0]
                   for name, prefix in args.extra_valid.items()}
    eval_windows = {f"val_windows{'_' + name if name else ''}": windows_hash(dataset, eval_samples)
                    for name, dataset in {"": valid, **extra_valid}.items() if dataset is not None}
    if eval_windows:
        writer.message(f"evaluation: {eval_samples} windows per held-out set (--eval-seed {args.eval_seed}): "
                       + ", ".join(f"{k} {v}" for k, v in eval_windows.items()))
    kd = None
    if inputs.sidecars is not None:
        from salt_megatron.data.selection import BlendedSelection, SelectedWindows
        from salt_megatron.data.windows import UnshuffledWindows

        selection, parts = salt.data_selection, []
        for prefix, (header, window_scores, _) in inputs.sidecars.items():
            # the windows that were scored: one epoch of the dataset (of its train split) with the sidecar's seed
            scored, _ = datasets(prefix, None, header["seed"], None, split=header.get("split"))
            parts.append(SelectedWindows(UnshuffledWindows(scored), header, window_scores, score=selection.select_by,
                                         mode=selection.mode, fraction=selection.fraction,
                                         skip_fraction=selection.skip_fraction, seed=args.seed,
                                         cache_dir=args.data_cache_path))
        # megatron-core's rule for a blend without weights: by size (here: scored windows)
        weights = inputs.scored_weights or [h["num_windows"] for h, _, _ in inputs.sidecars.values()]
        kd = parts[0] if len(parts) == 1 else BlendedSelection(parts, weights, inputs.record["score_sidecar"])
        scored_windows = sum(h["num_windows"] for h, _, _ in inputs.sidecars.values())
        writer.message(f"SALT_DS: KD phase draws from {kd.num_selected} of {scored_windows} windows "
                       f"({selection.mode}, score {selection.select_by}, sidecar {kd.sidecar_hash}"
                       + (f"; {len(parts)} prefixes, weights {', '.join(f'{w:.3g}' for w in kd.weights)})"
                          if len(parts) > 1 else ")"))
    if inputs.teacher_cache is not None:
        kd = _with_cached_teacher(args, inputs, salt, train, kd,
                                  lambda prefix: datasets(prefix, None, args.seed, None)[0], writer)
    return Data(train=train, valid=valid, kd=kd, extra_valid=extra_valid, eval_windows=eval_windows)


def _with_cached_teacher(args, inputs: Inputs, salt: SaltConfig, train, selection, one_epoch, writer):
    """--teacher-cache: the KD phase's samples (the selection's under SALT_DS, else the training data's) with the
    teacher's cached top-K attached; refused (one line) where the cache lacks a window the KD phase reads."""
    import numpy as np

    from salt_megatron.data.teacher_cache import CacheMismatch, CachedTeacherSamples
    from salt_megatron.data.windows import UnshuffledWindows

    cache = inputs.teacher_cache
    if selection is not None:  # SALT_DS: the selected windows of the scored one-epoch dataset
        source, window_of = selection, selection.window_of
        window_seed = next(iter(inputs.sidecars.values()))[0]["seed"]
    else:  # the training data: its windows are the one-epoch dataset's, in the same order, while it has one epoch
        prefix = inputs.sources.train.prefixes[0]
        epoch, ran = UnshuffledWindows(one_epoch(prefix)), UnshuffledWindows(train)
        if not (np.array_equal(ran.sample_index, epoch.sample_index)
                and np.array_equal(ran.shuffle_to_window, epoch.shuffle_to_window)):
            raise CacheMismatch(f"this run reads more than one epoch of {prefix} (--train-iters x --global-batch-size "
                                "samples), and a teacher cache is keyed by one epoch's windows: use SALT_DS "
                                "(--kd-data-selection) or fewer samples")
        order = epoch.shuffle_to_window
        source, window_of, window_seed = train, (lambda i: int(order[i % order.size])), args.seed
    gbs = args.global_batch_size
    first = (inputs.resume_meta or {}).get("consumed_samples", inputs.start_step * gbs)
    last = salt.schedule.kd_steps * gbs
    cache.check_windows(window_seed, np.array([window_of(i) for i in range(first, last)], dtype=np.int64),
                        first_sample=first, global_batch_size=gbs)
    h = cache.header
    writer.message(f"teacher cache: {cache.path} (top-{h['topk']} at τ={h['temperature']}, {h['num_windows']} "
                   f"windows, teacher {h['teacher_checkpoint']} step {h['teacher_step']}): the KD phase runs no "
                   "teacher")
    return CachedTeacherSamples(source, window_of, cache)


def build_student(args, arch: GPTArchitecture):
    """The student GPTModel in its backend, and megatron-core's LR schedule over the backend's optimizer."""
    layers = dict(use_transformer_engine=args.transformer_impl == "transformer_engine",
                  config_overrides=transformer_config_kwargs(args))
    if args.deepspeed:
        # fp32 weights: DeepSpeed casts the module to the JSON's precision itself
        backend = DeepSpeedBackend.build(build_gpt_model(arch, params_dtype=torch.float32, **layers), args)
    else:
        dtype = params_dtype(args)
        backend = MegatronBackend.build(build_gpt_model(arch, params_dtype=dtype, **layers), args, dtype)
    return backend, build_lr_scheduler(backend.optimizer, args)


def build_teacher(args, salt: SaltConfig, inputs: Inputs, writer: MetricsWriter):
    """The frozen teacher, when the KD phase is not over at the start step (else None)."""
    from megatron.core import parallel_state

    from salt_megatron.teacher import Teacher

    ended_at = inputs.resume_meta.get("kd_ended_at") if inputs.resume_meta else None
    if inputs.teacher_meta is None or not salt.teacher_needed(inputs.start_step, ended_at):
        return None
    meta = inputs.teacher_meta
    rng = checkpointing.rng_state()  # building the teacher draws init numbers: keep the student's stream
    pgs = whole_model_process_groups() if args.pipeline_model_parallel_size > 1 else None
    teacher = Teacher(meta, params_dtype=params_dtype(args), is_last_stage=parallel_state.is_pipeline_last_stage(),
                      tp_group=parallel_state.get_tensor_model_parallel_group(), pg_collection=pgs,
                      use_transformer_engine=args.transformer_impl == "transformer_engine")
    checkpointing.set_rng_state(rng)
    schedule = salt.schedule
    origin = (f"imported from {meta['imported_from']['path']}" if meta.get("imported_from")
              else f"step {meta['step']}")
    writer.message(f"teacher: {teacher.arch.num_layers} layers x {teacher.arch.hidden_size} from {meta['path']} "
                   f"({origin}); KD for steps [0, {schedule.kd_steps}), ω={schedule.kd_weight}, "
                   f"τ={salt.temperature}, {schedule.transition}")
    return teacher


def from_last_rank(obj):
    """Send a picklable object from the last rank (the last pipeline stage, where logits live) to every rank."""
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=torch.distributed.get_world_size() - 1)
    return holder[0]


def resume(run: Run, resume_meta: dict | None, overrides: list) -> None:
    """Weights, optimizer, RNG, LR schedule and counters from the checkpoint (its record checked already, with the
    overrides the flags accepted); a fresh run records its init's fingerprint instead."""
    if resume_meta is None:
        run.init_fingerprint = from_last_rank(model_fingerprint(run.backend.model, run.arch))
        return
    step = int(resume_meta["step"])
    run.overrides = list(resume_meta.get("overrides", [])) + [dict(o, at_step=step) for o in overrides]
    for o in overrides:
        changes = ", ".join(f"{k} {now!r} (checkpoint: {then!r})" for k, (then, now) in o["changes"].items())
        run.writer.message(f"resuming with another {o['group']} than the checkpoint's, as asked: {changes}")
    run.backend.load(resume_meta["path"])
    run.resume_path = resume_meta["path"]
    if run.args.override_opt_param_scheduler:
        # megatron-core's param groups carry their own max/min LR, restored from the checkpoint with the optimizer:
        # the flags must win there too, or the scheduler keeps computing the checkpoint's LR
        for group in run.scheduler.optimizer.param_groups:
            group.update({k: v for k, v in (("max_lr", run.args.lr), ("min_lr", run.args.min_lr)) if k in group})
    run.scheduler.load_state_dict(resume_meta["opt_param_scheduler"])
    run.state = TrainState(step=int(resume_meta["step"]), consumed_samples=int(resume_meta["consumed_samples"]),
                           kd_gaps=list(resume_meta.get("kd_gaps") or []), kd_ended_at=resume_meta.get("kd_ended_at"))
    run.init_fingerprint = resume_meta.get("init_fingerprint")
    run.writer.message(f"resumed from {resume_meta['path']} at step {run.state.step}")


def setup(args) -> Run:
    """Everything before the first step, from validated flags."""
    from megatron.core import tensor_parallel

    salt = SaltConfig.from_args(args)
    inputs = check_inputs(args, salt)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes)
    last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    writer = MetricsWriter(enabled=last_rank, tensorboard_dir=args.tensorboard_dir, metrics_file=args.metrics_file,
                           log_format=args.log_format)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

    data = build_data(args, inputs, salt, writer)
    # the student before the teacher, so its initialisation is the baseline's whatever the teacher is (paired runs)
    backend, scheduler = build_student(args, inputs.arch)
    teacher = build_teacher(args, salt, inputs, writer)
    run = Run(args=args, salt=salt, batch=BatchConfig.from_args(args), arch=inputs.arch, backend=backend,
              scheduler=scheduler, teacher=teacher, data=data, tokenizer=inputs.tokenizer, writer=writer,
              record=inputs.record)
    resume(run, inputs.resume_meta, inputs.overrides)
    arch = inputs.arch
    params = sum(p.numel() for p in backend.model.parameters())
    writer.message(f"model: {arch.num_layers} layers x {arch.hidden_size}, {params / 1e6:.2f}M parameters on "
                   f"rank {torch.distributed.get_rank()}; TP={args.tensor_model_parallel_size} "
                   f"PP={args.pipeline_model_parallel_size} DP={args.data_parallel_size}; vocab {arch.vocab_size} "
                   f"(padded {arch.padded_vocab_size})")
    return run
