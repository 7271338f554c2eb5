"""KD against a cached sparse teacher, and next-token CE, on vocab-parallel student logits in one pass.

The cache keeps, per token (row), the teacher's top K log-probabilities at temperature τ (``log p_k`` of ids
``id_k``) and one bucket for the rest, ``log r``, r = 1 - Σ_k p_k.  With the student's q = softmax(s/τ) over the real
vocabulary, Q = Σ_k q_{id_k} and q_r = 1 - Q, the sparse KL is::

    KD = Σ_k p_k (log p_k - log q_k)  +  r (log r - log q_r)          (0·log 0 = 0: r = 0 drops the bucket)

(K = V: exactly KL(softmax(t/τ) ‖ softmax(s/τ))).  Everything is relative to the student's row maxima: m over the
real vocabulary, m_r over the rest (the real columns outside the row's top K).  Then, with S = Σ_v exp((s_v - m)/τ),
S_r = Σ_{v∉K} exp((s_v - m_r)/τ) and E = Σ_k exp((s_k - m)/τ)::

    log q_k = (s_k - m)/τ - log S,   S = S_r·exp((m_r - m)/τ) + E,   log q_r = (m_r - m)/τ + log S_r - log S
    KD = Σ_k p_k (log p_k - (s_k - m)/τ) + P·log S + r (log r - log q_r),   P = Σ_k p_k
    CE = log S¹ - (s_label - m),   S¹ = Σ_v exp(s_v - m)   (= S at τ = 1; at τ ≠ 1 the same read gives both sums)

q_r is never formed as 1 - Q: S_r is summed over the rest columns themselves (the top-K columns set to -inf), so a
student that puts all but 1e-30 of its mass on the top K still gets an exact, finite log q_r.
Gradient wrt s_v, times the upstream g (KD) and h (CE), with q̃ = softmax over the rest set (q_v/q_r, formed as
exp((s_v - m_r)/τ - log S_r), which cannot overflow)::

    v in the top K:  g·((P + r)·q_v - p_v)/τ            v outside:  g·((P + r)·q_v - r·q̃_v)/τ
    plus h·(softmax(s)_v - [v = label])

(P + r = 1 for a consistent cache; keeping P + r makes the gradient exact for rounded bf16 log-probabilities too.)
A row whose rest set is empty (K = V) has no bucket: its r is taken as 0 whatever the cache says (rounding).

TP > 1: rank ρ holds columns [ρW, (ρ+1)W).  Each top-K id, and the label, is owned by exactly one shard.  One pass
per shard gives the local rest maximum and sums (relative to it) and the owned top-K logits; then exactly two
collectives: a MAX of ``[N, 2]`` (rest max, max of the owned top-K logits; m is the larger) and a SUM of ``[N, 4]``
(``[N, 6]`` at τ ≠ 1): the rest sums rescaled to the global m_r (a shard of padding or top-K only adds 0), E,
Σ_owned p_k (log p_k - (s_k - m)/τ), the label's s - m, and at τ ≠ 1 the same two sums at τ = 1.  The teacher side
(P, r, p_k) is on every rank.  Backward is local: the saved row statistics give q, q̃ and softmax(s) on each shard.
Memory: rows go in chunks (1 MiB on the CPU, ``torch_kernels``' budget on CUDA).  Forward holds one chunk-sized
fp32 temporary, reused by every chunk (two at τ ≠ 1).  Backward holds one as well (two at τ ≠ 1), or none without
TP, skipped rows or low-precision logits, where each chunk is computed where it lands in the gradient.  Each pass
reads the logits once (twice at τ ≠ 1): outside the top K, q_v = q_r·q̃_v, so the gradient there is q̃_v times one
number per row.
"""

from __future__ import annotations

import torch

from salt_megatron.kd.checks import LOGIT_DTYPES, check_temperature, compute_dtype
from salt_megatron.kd.torch_kernels import _row_chunks
from salt_megatron.kd.vocab_parallel import tp_rank_and_size, valid_columns

_INF = float("inf")


def _chunk_rows(student, row_index, lo, hi, w):
    """Rows lo:hi of the kept rows, real columns only (a view without a row index)."""
    if row_index is None:
        return student[lo:hi, :w]
    return student[:, :w].index_select(0, row_index[lo:hi])


# CPU chunks of 1 MiB (fp32): a buffer that stays in cache and is allocated once per call.  Logits-sized temporaries
# cost more in first-touch page faults than in arithmetic on the CPU (measured in a training step: 2x slower copies)
_CPU_CHUNK_ELEMENTS = 1 << 18


def _chunks(num_rows: int, width: int, device: torch.device):
    if device.type == "cuda":
        yield from _row_chunks(num_rows, width, device)
        return
    step = max(1, _CPU_CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


class _Scratch:
    """One fp32/fp64 buffer reused by every chunk of a call, ``columns`` wide."""

    def __init__(self, columns: int, compute: torch.dtype, device: torch.device):
        self.columns, self.compute, self.device, self.buf = columns, compute, device, None

    def filled(self, rows: torch.Tensor, spare: bool) -> torch.Tensor:
        """A copy of ``rows`` in compute precision; with ``spare``, one more column of -inf after the real ones, where
        ids a shard does not own point (no branch, no sync)."""
        n, w = rows.shape
        if self.buf is None or self.buf.shape[0] < n:
            self.buf = torch.empty(n, self.columns, dtype=self.compute, device=self.device)
        out = self.buf[:n, :w + 1] if spare else self.buf[:n, :w]
        out[:, :w].copy_(rows)
        if spare:
            out[:, w] = -_INF
        return out


def _finite_or(x, fallback):
    return torch.where(torch.isfinite(x), x, fallback)


class _SparseKDAndCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, local_ids, logprobs, rest_logprob, row_index, w, temperature, tp_group):
        # student [N, W], real columns [0, w); local_ids [n, K+1]: shard columns of the kept rows' top-K ids and
        # label (w = not owned); logprobs [n, K], rest_logprob [n]: their teacher; row_index: kept rows (None = all)
        n_all = student.shape[0]
        compute, inv_t, tau_one = compute_dtype(student), 1.0 / temperature, temperature == 1.0
        n, k = logprobs.shape
        dev = student.device
        logit_k = torch.empty(n, k + 1, dtype=compute, device=dev)  # owned top-K and label logits, -inf elsewhere
        rest_max = torch.empty(n, dtype=compute, device=dev)
        rest_sums = torch.empty(n, 1 if tau_one else 2, dtype=compute, device=dev)
        spare = tp_group is not None  # without TP every id is owned: no spare column
        scratch = _Scratch(w + spare, compute, dev)
        for lo, hi in _chunks(n, w + 1, dev):
            buf = scratch.filled(_chunk_rows(student, row_index, lo, hi, w), spare)
            logit_k[lo:hi] = buf.gather(1, local_ids[lo:hi])
            buf.scatter_(1, local_ids[lo:hi, :k], -_INF)  # the rest set: top-K columns out
            m_loc = buf.amax(dim=1, keepdim=True)
            rest_max[lo:hi] = m_loc.squeeze(1)
            shifted = buf.sub_(_finite_or(m_loc, torch.zeros_like(m_loc)))  # all -inf: shift by 0, sums are 0
            if tau_one:  # in place: nothing else reads the shifted logits
                rest_sums[lo:hi, 0] = shifted.exp_().sum(dim=1)
            else:
                e = torch.mul(shifted, inv_t).exp_()
                rest_sums[lo:hi, 0] = e.sum(dim=1)
                rest_sums[lo:hi, 1] = torch.exp(shifted, out=e).sum(dim=1)  # the CE's sum at τ = 1, same read
                del e
            del shifted
        maxima = torch.stack((rest_max, logit_k[:, :k].amax(dim=1)), dim=1)
        if tp_group is not None and n > 0:  # every TP rank keeps the same rows: skipping is consistent
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        m_rest = maxima[:, 0]
        m = maxima.amax(dim=1)
        present = torch.isfinite(rest_max)
        # rest sums of this shard, moved from its own rest max to the global one (a shard without rest adds 0)
        shift = torch.where(present, rest_max - m_rest, torch.zeros_like(rest_max))
        rest_sums[:, 0] *= (shift * inv_t).exp()
        if not tau_one:
            rest_sums[:, 1] *= shift.exp()
        p = logprobs.exp()
        a_k = (logit_k[:, :k] - m[:, None]) * inv_t  # -inf where not owned
        owned = local_ids[:, :k] < w
        cross = torch.where(owned & (p > 0), p * (logprobs - a_k), torch.zeros_like(p)).sum(dim=1)
        label = torch.where(local_ids[:, k] < w, logit_k[:, k] - m, torch.zeros_like(m))
        columns = [rest_sums[:, 0], a_k.exp().sum(dim=1), cross, label]
        if not tau_one:
            columns += [rest_sums[:, 1], (logit_k[:, :k] - m[:, None]).exp().sum(dim=1)]
        sums = torch.stack(columns, dim=1)
        if tp_group is not None and n > 0:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=tp_group)

        rest_gap = m_rest - m  # <= 0, -inf without a rest set
        log_sum = torch.log(sums[:, 0] * (rest_gap * inv_t).exp() + sums[:, 1])
        log_sum_rest = torch.log(sums[:, 0])
        log_q_rest = rest_gap * inv_t + log_sum_rest - log_sum
        r = rest_logprob.exp()
        bucket = (r > 0) & torch.isfinite(m_rest)
        r = torch.where(bucket, r, torch.zeros_like(r))
        total_p = p.sum(dim=1)
        kd = sums[:, 2] + total_p * log_sum + torch.where(bucket, r * (rest_logprob - log_q_rest), torch.zeros_like(r))
        log_sum_1 = log_sum if tau_one else torch.log(sums[:, 4] * rest_gap.exp() + sums[:, 5])
        ce = log_sum_1 - sums[:, 3]
        # rows without a bucket: normalise q̃ like q (finite, at most 1); its coefficient is 0 there anyway
        m_rest_safe = torch.where(bucket, m_rest, m)
        log_sum_rest_safe = torch.where(bucket, log_sum_rest, log_sum)
        row_stats = torch.stack((m, log_sum, log_sum_1, m_rest_safe, log_sum_rest_safe, total_p + r, r), dim=1)
        ctx.save_for_backward(student, local_ids, p, row_index, row_stats)
        ctx.temperature, ctx.w, ctx.spare = temperature, w, spare
        if row_index is None:
            return kd, ce
        zeros = torch.zeros(n_all, dtype=compute, device=dev)
        return zeros.index_copy(0, row_index, kd), zeros.index_copy(0, row_index, ce)

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        student, local_ids, p, row_index, row_stats = ctx.saved_tensors
        w, inv_t, tau_one = ctx.w, 1.0 / ctx.temperature, ctx.temperature == 1.0
        compute, (n, k) = compute_dtype(student), p.shape
        g, h = grad_kd.to(compute), grad_ce.to(compute)
        if row_index is not None:
            g, h = g.index_select(0, row_index), h.index_select(0, row_index)
        m, log_sum, log_sum_1, m_rest, log_sum_rest, p_plus_r, r = (x[:, None] for x in row_stats.unbind(1))
        g_t = g[:, None] * inv_t
        coef_q = g_t * p_plus_r + (h[:, None] if tau_one else 0.0)  # at τ = 1 the CE's softmax is q
        # outside the top K, q_v = q_r·q̃_v: the gradient coef_q·q_v - g·r·q̃_v/τ is q̃_v times a per-row number, so
        # one exp per column (q̃ relative to the rest's own max and sum: no underflow where q_r is tiny)
        q_r = ((m_rest - m) * inv_t + log_sum_rest - log_sum).exp()
        rest_coef = coef_q * q_r - g_t * r
        partial = row_index is not None or w < student.shape[1]  # skipped rows and padding columns stay 0
        grad = torch.zeros_like(student) if partial else torch.empty_like(student)
        # without TP, skipped rows or a lower-precision gradient, each chunk is computed where it lands in grad
        in_place = not ctx.spare and row_index is None and student.dtype == compute
        scratch = _Scratch(w + 1, compute, student.device)
        for lo, hi in _chunks(n, w + 1, student.device):
            rows = _chunk_rows(student, row_index, lo, hi, w)
            ids = local_ids[lo:hi]
            if in_place:
                acc = grad[lo:hi, :w]
                q_k = rows.gather(1, ids[:, :k]).sub_(m[lo:hi]).mul_(inv_t).sub_(log_sum[lo:hi]).exp_()
                top = q_k.mul_(coef_q[lo:hi]).sub_(g_t[lo:hi] * p[lo:hi])
                if tau_one:  # one read of the logits, written once: exp(s - m_r - log S_r)·rest_coef
                    torch.sub(rows, m_rest[lo:hi] + log_sum_rest[lo:hi], out=acc).exp_().mul_(rest_coef[lo:hi])
                else:
                    torch.sub(rows, m_rest[lo:hi], out=acc).mul_(inv_t).sub_(log_sum_rest[lo:hi]).exp_()
                    acc.mul_(rest_coef[lo:hi])
                acc.scatter_(1, ids[:, :k], top)
                if not tau_one:  # the CE's softmax at τ = 1, from a second read
                    acc.add_(rows.sub(m[lo:hi]).sub_(log_sum_1[lo:hi]).exp_().mul_(h[lo:hi, None]))
                acc.scatter_add_(1, ids[:, k:], -h[lo:hi, None])
                continue
            acc = scratch.filled(rows, True)
            # the top-K columns from their own logits: coef_q·q_k - g·p_k/τ (not owned: the spare column, dropped)
            q_k = acc.gather(1, ids[:, :k]).sub_(m[lo:hi]).mul_(inv_t).sub_(log_sum[lo:hi]).exp_()
            top = q_k.mul_(coef_q[lo:hi]).sub_(g_t[lo:hi] * p[lo:hi])
            acc.sub_(m_rest[lo:hi]).mul_(inv_t).sub_(log_sum_rest[lo:hi]).exp_().mul_(rest_coef[lo:hi])
            acc.scatter_(1, ids[:, :k], top)
            if not tau_one:  # the CE's softmax at τ = 1, from a second read
                acc[:, :w].add_(rows.to(compute).sub(m[lo:hi]).sub_(log_sum_1[lo:hi]).exp_().mul_(h[lo:hi, None]))
            acc.scatter_add_(1, ids[:, k:], -h[lo:hi, None])  # the CE's -1 at the label (owned)
            if row_index is None:
                grad[lo:hi, :w].copy_(acc[:, :w])
            else:
                grad[:, :w].index_copy_(0, row_index[lo:hi], acc[:, :w].to(student.dtype))
        return grad, None, None, None, None, None, None, None


def sparse_kd_and_cross_entropy(student_logits, labels, topk_ids, topk_logprobs, rest_logprob, *, temperature=1.0,
                                vocab_size=None, tp_group=None, loss_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (KD, CE) against a cached sparse teacher, each of shape ``labels.shape``, identical on every TP rank.

    Args:
        student_logits: this rank's vocabulary shard, shape ``labels.shape + (W,)``; fp32/bf16/fp16 (math in fp32)
            or fp64 (math in fp64).  Columns with global id >= ``vocab_size`` are padding and count for nothing.
        labels: global ids of the true next tokens.
        topk_ids: ``labels.shape + (K,)`` int32/int64 global ids of the teacher's top K (distinct, < vocab_size).
        topk_logprobs: the same shape, the teacher's log p_k at temperature τ.
        rest_logprob: ``labels.shape``, log(1 - Σ_k p_k) (-inf when the top K hold all the mass).
        temperature: τ > 0 of the KD term; CE is at τ = 1.
        vocab_size: the real vocabulary size (None: every column is real).
        tp_group: the tensor-parallel group the shards are spread over (None or a group of one: no TP).
        loss_mask: optional, ``labels.shape``; rows where it is 0 are skipped (KD = CE = 0, zero gradient).

    Returns:
        ``(kd, ce)``, float32 (float64 for fp64 logits); the gradient flows to ``student_logits`` from both.
    """
    check_temperature(temperature)
    if student_logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"student_logits must be float32, bfloat16, float16 or float64, got {student_logits.dtype}")
    lead = labels.shape
    if student_logits.dim() != len(lead) + 1 or student_logits.shape[:-1] != lead:
        raise ValueError(f"student_logits must have shape labels.shape + (W,) = {tuple(lead)} + (W,), got "
                         f"{tuple(student_logits.shape)}")
    if topk_ids.dim() != len(lead) + 1 or topk_ids.shape[:-1] != lead:
        raise ValueError(f"topk_ids must have shape labels.shape + (K,) = {tuple(lead)} + (K,), got "
                         f"{tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs must have topk_ids' shape {tuple(topk_ids.shape)}, got "
                         f"{tuple(topk_logprobs.shape)}")
    if rest_logprob.shape != lead:
        raise ValueError(f"rest_logprob must have shape {tuple(lead)}, got {tuple(rest_logprob.shape)}")
    if loss_mask is not None and loss_mask.shape != lead:
        raise ValueError(f"loss_mask must have shape {tuple(lead)}, got {tuple(loss_mask.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    width, k = student_logits.shape[-1], topk_ids.shape[-1]
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    w = valid_columns(width, vocab_size, tp_rank, tp_size)
    vocab = width * tp_size if vocab_size is None else vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"the number of top-K entries must be in [1, vocab_size = {vocab}], got {k}")
    if tp_size == 1:
        tp_group = None  # a group of one needs no collectives

    student = student_logits.reshape(-1, width)
    ids = torch.cat((topk_ids.reshape(-1, k).long(), labels.reshape(-1, 1).long()), dim=1)
    compute = compute_dtype(student)
    logprobs = topk_logprobs.detach().reshape(-1, k).to(compute)
    rest = rest_logprob.detach().reshape(-1).to(compute)
    row_index = None
    if loss_mask is not None:
        flat_mask = loss_mask.reshape(-1)
        if not bool(flat_mask.all()):
            row_index = flat_mask.nonzero().squeeze(-1)
            ids, logprobs, rest = ids.index_select(0, row_index), logprobs.index_select(0, row_index), rest[row_index]
    # shard columns of the ids this rank owns; the others point at the spare column w (see _Scratch)
    local = ids - tp_rank * width
    local_ids = torch.where((local >= 0) & (local < w), local, torch.full_like(local, w))
    kd, ce = _SparseKDAndCE.apply(student, local_ids, logprobs, rest, row_index, w, float(temperature), tp_group)
    return kd.view(lead), ce.view(lead)
