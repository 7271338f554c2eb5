"""The SALT flags of ``salt-megatron pretrain`` (the teacher, the KD schedule and loss, SALT_DS), shared with
``cache-teacher``, which must pick the KD phase's windows exactly as pretrain does."""

from __future__ import annotations

import argparse

from salt_megatron.data.scores import SCORE_NAMES
from salt_megatron.data.selection import MODES as SELECTION_MODES
from salt_megatron.kd.select import IMPLS as KD_IMPLS
from salt_megatron.kd.token_weights import TOKEN_WEIGHTINGS
from salt_megatron.schedule import TRANSITIONS


def add_salt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SALT (knowledge distillation from a small teacher)")
    g.add_argument("--teacher-load", default=None,
                   help="checkpoint dir of the trained small LM (salt_megatron's, import-hf's, or Megatron-LM's "
                        "torch_dist); enables SALT")
    g.add_argument("--teacher-model-config", default=None, metavar="YAML",
                   help="a Megatron-LM teacher's architecture (Megatron-LM flag names) instead of its saved args")
    g.add_argument("--teacher-tokenizer-model", default=None,
                   help="a Megatron-LM teacher's tokenizer, when the path in its args is not on this machine")
    g.add_argument("--kd-steps", type=int, default=None, help="n_KD: steps with distillation (= train iters: RKD)")
    g.add_argument("--kd-weight", type=float, default=0.5, help="ω: weight of the KD term during the KD phase")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="τ for the teacher's soft labels")
    g.add_argument("--kd-transition", choices=TRANSITIONS, default="step")
    g.add_argument("--kd-decay-steps", type=int, default=None, help="length of a linear/cosine ramp (default: n_KD)")
    g.add_argument("--kd-auto-window", type=int, default=20,
                   help="auto: KD steps over which student CE - teacher CE on the KD batches is averaged")
    g.add_argument("--kd-auto-margin", type=float, default=0.0,
                   help="auto: KD ends once that average is at most this many nats (--kd-steps stays the latest end)")
    g.add_argument("--kd-token-weighting", choices=TOKEN_WEIGHTINGS, default="none",
                   help="ω per token, scaled by whether the teacher's top-1 / top-k holds the true token or by its "
                        "probability of it at τ (mean ω unchanged)")
    g.add_argument("--kd-token-topk", type=int, default=10, help="k of teacher_topk")
    g.add_argument("--kd-no-temperature-squared", action="store_true", help="do not scale KD by τ²")
    g.add_argument("--kd-impl", choices=KD_IMPLS, default="auto", help="KD loss kernels")
    g.add_argument("--kd-fused-linear", action="store_true",
                   help="KD-phase loss from the student's and teacher's output-layer inputs, chunked over tokens: "
                        "neither [tokens, V/TP] logits tensor is held (salt_megatron.kd.fused_linear)")
    g.add_argument("--teacher-cache", default=None, metavar="PATH",
                   help="the teacher's top-K from `salt-megatron cache-teacher` (PATH.json ...): the KD phase reads it "
                        "instead of running the teacher (no --teacher-load)")
    add_selection_args(p)


def add_selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SALT_DS (data selection for the KD phase, from `salt-megatron score`)")
    g.add_argument("--kd-data-selection", choices=SELECTION_MODES, default="none",
                   help="top: the best-scored fraction; band: skip the very top, keep the next fraction")
    g.add_argument("--kd-select-fraction", type=float, default=0.2, help="share of the scored windows to keep")
    g.add_argument("--kd-select-skip-fraction", type=float, default=0.02, help="band: share of the top to skip")
    g.add_argument("--kd-select-by", choices=SCORE_NAMES, default="salt",
                   help="which score of the sidecar ranks the windows (salt: the paper's)")
    g.add_argument("--kd-scored-data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="the scored dataset or blend (default: the training data); each prefix's sidecar is "
                        "PREFIX.salt_scores.*")
    for old, new in (("--kd-score", "--kd-select-by"), ("--kd-scores", "--kd-scored-data-path")):
        g.add_argument(old, action=_Renamed, new_name=new, help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    """A flag that was renamed: one line naming the new spelling (the two old ones differed by one letter)."""

    def __init__(self, option_strings, dest, new_name, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.new_name}")
