"""Per-token KD weights from the teacher (``--kd-token-weighting``): distil where the teacher is right.

The paper's theory says KD helps "early, and where the teacher is right"; this scales ω token by token:

* ``teacher_top1``  1 where the teacher's arg-max is the true next token, else 0;
* ``teacher_topk``  1 where the true token is in the teacher's top-k (``k``, the scoring's k = 10 by default);
* ``teacher_prob``  the teacher's probability of the true token at the KD temperature τ (the distribution KD
  distils; at τ = 1 the teacher's own prediction);

then divided by their mean over the micro-batch's kept tokens, so the mean factor is 1 and the mean per-token ω is
ω (a micro-batch where the teacher is never right gets uniform factors).

No collective of its own: the numbers ride on the KD loss's two (``vocab_parallel.combine_across_shards``).  The
true token's teacher logit lives on one vocabulary shard; every other shard offers -inf, so it travels in the MAX
beside the maxima.  top-1 then needs only the global max; top-k counts, per shard, the logits above the true
token's, a count that travels in the SUM beside the sums; the probability comes from the teacher's global max and
log-sum, which the KD loss has anyway.
"""

from __future__ import annotations

import dataclasses

import torch

TOKEN_WEIGHTINGS = ("none", "teacher_top1", "teacher_topk", "teacher_prob")


@dataclasses.dataclass
class TokenCorrectness:
    """What the KD loss should also measure, per row: how right the teacher is about ``labels`` (global ids)."""

    mode: str
    labels: torch.Tensor  # [N] global vocabulary ids, one per row of the logits the KD loss sees
    k: int = 10

    def __post_init__(self):
        if self.mode not in TOKEN_WEIGHTINGS[1:]:
            raise ValueError(f"token weighting must be one of {TOKEN_WEIGHTINGS[1:]}, got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"the k of teacher_topk must be >= 1, got {self.k}")

    def on_shard(self, teacher: torch.Tensor, first_column: int, row_index: torch.Tensor | None) -> ShardProbe:
        """The probe for one vocabulary shard: ``teacher`` its real columns (global ids from ``first_column``), one
        row per kept row (``row_index`` picks the kept rows' labels; None: every row)."""
        labels = self.labels if row_index is None else self.labels.index_select(0, row_index)
        return ShardProbe(self.mode, self.k, labels, teacher, first_column)


@dataclasses.dataclass
class ShardProbe:
    """One shard's part of :class:`TokenCorrectness`, called by ``combine_across_shards`` around its collectives."""

    mode: str
    k: int
    labels: torch.Tensor
    teacher: torch.Tensor
    first_column: int

    def local_label_logit(self, dtype: torch.dtype) -> torch.Tensor:
        """[N]: the teacher's logit of the true token where this shard holds it, else -inf (for the MAX)."""
        local = self.labels - self.first_column
        width = self.teacher.shape[1]
        if width == 0:
            return torch.full(local.shape, -torch.inf, dtype=dtype, device=self.teacher.device)
        mine = (local >= 0) & (local < width)
        picked = self.teacher.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1).to(dtype)
        return torch.where(mine, picked, torch.full_like(picked, -torch.inf))

    def local_count_above(self, label_logit: torch.Tensor) -> torch.Tensor | None:
        """[N]: this shard's logits above the true token's (global ``label_logit``), for the SUM; top-k only."""
        if self.mode != "teacher_topk":
            return None
        # the label logit was read from these logits, so casting it back to their dtype is exact
        return (self.teacher > label_logit[:, None].to(self.teacher.dtype)).sum(1).to(label_logit.dtype)

    def finish(self, label_logit, count_above, max_t, log_sum_t, temperature: float) -> torch.Tensor:
        """[N] from the global numbers: 1/0 for top-1 and top-k, the probability at τ for ``teacher_prob``."""
        if self.mode == "teacher_top1":
            return (label_logit >= max_t).to(max_t.dtype)
        if self.mode == "teacher_topk":
            return (count_above < self.k).to(max_t.dtype)
        return ((label_logit - max_t) / temperature - log_sum_t).exp()


def normalised_weights(correctness: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Factors of ω per token, mean 1 over the tokens ``loss_mask`` keeps (uniform where the teacher is never
    right)."""
    with torch.no_grad():
        g, mask = correctness.float(), loss_mask.float()
        mean = (g * mask).sum() / mask.sum().clamp(min=1.0)
        # no host sync: a micro-batch where the teacher is never right keeps uniform factors
        return torch.where(mean > 0, g / mean.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(g))
