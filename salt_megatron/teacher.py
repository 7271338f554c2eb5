"""The frozen teacher (the small LM): checked, built from its own saved config, loaded, run, and released.

* Its architecture (depth, width, heads, ...) comes from its checkpoint's metadata, not from the student's flags; it
  shares the student's TP group and padded vocabulary, so its logits are vocab shards laid out exactly like the
  student's and feed ``vocab_parallel_kl_div`` without a gather.
* With pipeline parallelism the whole teacher lives on the last stage, where the student's loss is computed (its
  own pipeline would only add bubbles: it is small).  Weights load through ``dist_checkpointing``, so a teacher
  saved at any TP/PP size loads.
* Frozen: ``requires_grad=False``, eval mode, run under ``torch.no_grad``; outside DDP, the optimizer and the
  student's checkpoints.  ``release()`` drops it when ω reaches 0.
"""

from __future__ import annotations

import gc
import os

import torch

from salt_megatron import fingerprint, megatron_lm
from salt_megatron.model import GPTArchitecture, build_gpt_model, causal_attention_mask, output_layer_inputs
from salt_megatron.checkpointing import DIST_CHECKPOINT_FAILURES, _root_cause, load_model_weights, read_meta
from salt_megatron.errors import CheckpointError, TeacherRefused


def check_teacher_checkpoint(load_dir: str, *, tokenizer_hash: str, padded_vocab_size: int,
                             vocab_size: int | None = None, model_config: str | None = None,
                             tokenizer_model: str | None = None) -> dict:
    """Validate the teacher's checkpoint metadata against the student (cheap: builds nothing).  Returns the meta.

    A Megatron-LM checkpoint (``megatron_lm``) is described by the args saved in it or ``model_config``, its
    tokenizer by its args or ``tokenizer_model``; ``vocab_size`` is the student's tokenizer's."""
    if megatron_lm.is_megatron_lm_checkpoint(load_dir):
        try:
            meta = megatron_lm.teacher_meta(load_dir, vocab_size=vocab_size or padded_vocab_size,
                                            model_config=model_config, tokenizer_model=tokenizer_model)
        except CheckpointError as e:
            raise TeacherRefused(f"teacher checkpoint: {e}") from None
        return _check_against_student(meta, tokenizer_hash, padded_vocab_size)
    if model_config is not None or tokenizer_model is not None:
        raise TeacherRefused("--teacher-model-config / --teacher-tokenizer-model are for Megatron-LM checkpoints; "
                             f"{load_dir} is a salt_megatron checkpoint, which describes itself")
    try:
        meta = read_meta(load_dir)
    except CheckpointError as e:
        raise TeacherRefused(f"teacher checkpoint: {e}") from None
    meta = _check_against_student(meta, tokenizer_hash, padded_vocab_size)
    if (int(meta.get("step", 0)) <= 0 and not meta.get("imported_from")) or "fingerprint" not in meta:
        raise TeacherRefused(f"the teacher checkpoint {meta['path']} is at step 0: it was never trained")
    init_fp = meta.get("init_fingerprint")
    if init_fp is not None and fingerprint.matches(meta["fingerprint"], init_fp, rtol=1e-6):
        raise TeacherRefused(f"the teacher checkpoint {meta['path']} is still at its random initialisation")
    return meta


def _check_against_student(meta: dict, tokenizer_hash: str, padded_vocab_size: int) -> dict:
    if meta.get("tokenizer_hash") != tokenizer_hash:
        raise TeacherRefused(
            f"the teacher in {meta['path']} was trained with another tokenizer (hash "
            f"{str(meta.get('tokenizer_hash'))[:12]}…, the student's is {tokenizer_hash[:12]}…); teacher and student "
            "must share the tokenizer: pass the teacher's --tokenizer-model and data prepared with it"
        )
    teacher_padded = meta.get("arch", {}).get("padded_vocab_size")
    if teacher_padded != padded_vocab_size:
        raise TeacherRefused(
            f"padded vocab sizes differ: teacher {teacher_padded}, student {padded_vocab_size}; use the same "
            "--make-vocab-size-divisible-by (and a TP size it divides) for both"
        )
    return meta


def read_checkpoint(args) -> tuple[dict, object]:
    """score / evaluate: the metadata and tokenizer of the checkpoint ``--load``.  Ours describes itself; a
    Megatron-LM ``torch_dist`` one is described by the args saved in it (or ``--model-config`` YAML), its tokenizer
    by ``--tokenizer-model`` or the ``tokenizer_model`` those args name."""
    from salt_megatron.data.tokenizer_types import tokenizer_from_flags

    if not megatron_lm.is_megatron_lm_checkpoint(args.load):
        if args.model_config is not None:
            raise CheckpointError(f"--model-config is for Megatron-LM checkpoints; {args.load} describes itself")
        meta = read_meta(args.load)
        return meta, tokenizer_from_flags(args, lambda: meta["tokenizer_model"])

    def named_tokenizer():
        named = megatron_lm.model_args(args.load, args.model_config, flag="--model-config")[0].get("tokenizer_model")
        if not named or not os.path.exists(named):
            raise TeacherRefused(f"the tokenizer of {args.load} ({named or 'none named in its args'}) is not on this "
                                 "machine: pass it with --tokenizer-model")
        return named

    try:
        tokenizer = tokenizer_from_flags(args, named_tokenizer)
        meta = megatron_lm.teacher_meta(args.load, vocab_size=tokenizer.vocab_size, model_config=args.model_config,
                                        tokenizer_model=tokenizer.model_path)
    except CheckpointError as e:  # neither ours (no salt_meta.json) nor a readable Megatron-LM one
        raise CheckpointError(f"no complete checkpoint in {args.load}: {e}") from None
    return dict(meta, tokenizer_hash=tokenizer.hash), tokenizer


class Teacher:
    """A frozen GPT model producing vocab-parallel logits for the KD loss."""

    def __init__(self, meta: dict, *, params_dtype: torch.dtype, is_last_stage: bool, tp_group,
                 pg_collection=None, use_transformer_engine: bool | None = None):
        self.meta = meta
        self.arch = GPTArchitecture.from_dict(meta["arch"])
        self.forward_calls = 0
        self.tp_group = tp_group
        # (either layer spec reads either's checkpoints: megatron-core maps the norm names)
        model = build_gpt_model(self.arch, params_dtype=params_dtype, pre_process=True, post_process=True,
                                whole_model=True, pg_collection=pg_collection,
                                use_transformer_engine=use_transformer_engine)
        self.model = model
        before = self.probe_fingerprint() if meta["fingerprint"] is None else None  # (collective under TP)
        # collective: every rank loads, then the stages before the last drop it
        try:
            load_model_weights(meta["path"], model, replicated_on_every_stage=pg_collection is not None)
        except DIST_CHECKPOINT_FAILURES as e:  # missing or mis-shaped tensors: never train against half a teacher
            raise TeacherRefused(f"the teacher's weights did not load from {meta['path']}: {_root_cause(e)}") from e
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.model = model if is_last_stage else None
        if self.model is not None and meta["fingerprint"] is None:  # a Megatron-LM checkpoint saves no fingerprint
            if fingerprint.matches(self.probe_fingerprint(), before, rtol=1e-6):
                raise TeacherRefused(f"the teacher's weights did not load from {meta['path']}: its logits are its "
                                     "random initialisation's")
        elif self.model is not None:
            got = self.probe_fingerprint()
            if not fingerprint.matches(got, meta["fingerprint"]):
                raise TeacherRefused(
                    f"the teacher's weights did not load from {meta['path']}: its logits fingerprint {got} differs "
                    f"from the one saved with the checkpoint {meta['fingerprint']}"
                )
        else:
            del model
            gc.collect()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def probe_fingerprint(self) -> list[float]:
        tokens, position_ids = fingerprint.probe_batch(self.arch.vocab_size, self.arch.seq_length)
        with torch.inference_mode():
            logits = self._forward(tokens, position_ids)
        return fingerprint.summarize(logits, self.tp_group)

    def _forward(self, tokens, position_ids):
        device = next(self.model.parameters()).device
        mask = causal_attention_mask(tokens.shape[1], device=device)
        return self.model(tokens.to(device), position_ids.to(device), mask)

    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[b, s, padded_vocab/TP]`` (no autograd graph)."""
        if self.model is None:
            raise RuntimeError("the teacher is not held on this rank (released, or not the last pipeline stage)")
        self.forward_calls += 1
        # no_grad, not inference_mode: the KD loss's autograd saves these logits for its backward
        with torch.no_grad():
            return self._forward(tokens, position_ids)

    def hidden(self, tokens: torch.Tensor, position_ids: torch.Tensor):
        """The teacher's output-layer input ``[b, s, h_t]`` and its output weight ``[V/TP, h_t]`` (no autograd graph),
        for a loss that forms the logits itself chunk by chunk (``--kd-fused-linear``)."""
        with output_layer_inputs(self.model) as captured:  # (nothing to swap on a rank without the teacher)
            return self.logits(tokens, position_ids), captured["weight"]

    def release(self) -> None:
        """Free the teacher's memory (ω has reached 0 for good)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
