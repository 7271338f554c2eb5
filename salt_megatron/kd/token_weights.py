"""Per-token KD weights from the teacher (``--kd-token-weighting``): distil where the teacher is right.

The paper's theory says KD helps "early, and where the teacher is right"; this scales ω token by token:

* ``teacher_top1``  1 where the teacher's arg-max is the true next token, else 0;
* ``teacher_topk``  1 where the true token is in the teacher's top-k (``k``, the scoring's k = 10 by default);
* ``teacher_prob``  the teacher's probability of the true token (at τ = 1);

then divided by their mean over the micro-batch's kept tokens, so the mean factor is 1 and the mean per-token ω is
ω (a micro-batch where the teacher is never right gets uniform factors).  On vocab-parallel logits: each rank
looks at its own columns (padding excluded) and two all-reduces of one number per token make the answer global.
"""

from __future__ import annotations

import torch

from salt_megatron.kd.vocab_parallel import tp_rank_and_size, valid_columns

TOKEN_WEIGHTINGS = ("none", "teacher_top1", "teacher_topk", "teacher_prob")


def _all_reduce(t: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_group is not None and torch.distributed.get_world_size(group=tp_group) > 1:
        torch.distributed.all_reduce(t, op=op, group=tp_group)
    return t


def teacher_correctness(teacher_logits: torch.Tensor, labels: torch.Tensor, mode: str, *, k: int = 10,
                        vocab_size: int | None = None, tp_group=None) -> torch.Tensor:
    """Per token (``labels.shape``, float32): how right the teacher is about the true next token (see above)."""
    if mode not in TOKEN_WEIGHTINGS[1:]:
        raise ValueError(f"token weighting must be one of {TOKEN_WEIGHTINGS[1:]}, got {mode!r}")
    rank, size = tp_rank_and_size(tp_group)
    width = teacher_logits.shape[-1]
    cols = valid_columns(width, vocab_size, rank, size)
    t = teacher_logits.detach().reshape(-1, width)[:, :cols].float()
    local = labels.reshape(-1) - rank * width
    mine = (local >= 0) & (local < cols)
    label_logit = torch.where(mine, t.gather(1, local.clamp(0, max(cols - 1, 0))[:, None]).squeeze(1)
                              if cols else torch.zeros_like(local, dtype=torch.float32), 0.0)
    if mode == "teacher_prob":
        top = _all_reduce(t.amax(1) if cols else torch.full_like(label_logit, -torch.inf),
                          torch.distributed.ReduceOp.MAX, tp_group)
        stats = torch.stack([label_logit, (t - top[:, None]).exp().sum(1)], 1)
        label_logit, sum_exp = _all_reduce(stats, torch.distributed.ReduceOp.SUM, tp_group).unbind(1)
        out = (label_logit - top - sum_exp.log()).exp()
    else:
        label_logit = _all_reduce(label_logit, torch.distributed.ReduceOp.SUM, tp_group)
        above = _all_reduce((t > label_logit[:, None]).sum(1).float(), torch.distributed.ReduceOp.SUM, tp_group)
        out = (above < (1 if mode == "teacher_top1" else k)).float()
    return out.view(labels.shape)


def kd_token_weights(teacher_logits: torch.Tensor, labels: torch.Tensor, mode: str, *, loss_mask: torch.Tensor,
                     k: int = 10, vocab_size: int | None = None, tp_group=None) -> torch.Tensor:
    """Factors of ω per token, mean 1 over the tokens ``loss_mask`` keeps (uniform where the teacher is never
    right)."""
    with torch.no_grad():
        g = teacher_correctness(teacher_logits, labels, mode, k=k, vocab_size=vocab_size, tp_group=tp_group)
        mask = loss_mask.float()
        mean = (g * mask).sum() / mask.sum().clamp(min=1.0)
        # no host sync: a micro-batch where the teacher is never right keeps uniform factors
        return torch.where(mean > 0, g / mean.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(g))
