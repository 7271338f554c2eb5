"""The teacher's top-K at τ per token: what the offline teacher's cache stores (``cache-teacher``,
``score --cache-topk``; read back by ``kd.sparse_kl``).

Per token: the K best vocabulary ids (best first), their log-probabilities at τ and the log of the mass outside them.
Each TP shard finds its own k best and its log-sum-exp from one read of its logits; the shards then meet in
collectives on per-token numbers only (a MAX and a SUM for the log-sum-exp, an all-gather of each shard's k best).

``teacher_topk_from_hidden`` never materialises the logits: it multiplies the output layer's input by its weight a
few hundred tokens of one window at a time into one reused buffer, and takes each block's top-K while the block is
still in cache.  On a CPU the whole-batch logits are a fresh logits-sized allocation each micro-batch, whose page
faults cost more than the top-K (README, "The offline teacher").  The blocks depend only on the window, never on the
micro-batch, so a cache comes out byte-identical at any micro-batch size.
"""

from __future__ import annotations

import torch

from salt_megatron.errors import DataError
from salt_megatron.kd.vocab_parallel import tp_rank_and_size, valid_columns

# the logits block one window contributes at a time: about this many bytes (and at least _MIN_BLOCK_ROWS rows, so
# the matrix product stays efficient).  On a CPU, what its caches hold; on a GPU, large enough that the kernel
# launches stay few, small beside a whole batch's logits
_BLOCK_BYTES = {"cpu": 4 << 20}
_BLOCK_BYTES_ELSEWHERE = 256 << 20
_MIN_BLOCK_ROWS = 64


def _log_sum_exp(x: torch.Tensor, row_max: torch.Tensor, rows_per_chunk: int = 32) -> torch.Tensor:
    """log Σ exp(x) over the last dimension of ``[rows, W]``, given its maximum, through one small reused buffer:
    torch.logsumexp writes a logits-sized temporary, and on the CPU its first touch costs more than the arithmetic
    (measured: 3.6x slower on [2048, 4096] fp32)."""
    sums = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    buf = torch.empty(min(rows_per_chunk, x.shape[0]), x.shape[1], dtype=x.dtype, device=x.device)
    for lo in range(0, x.shape[0], rows_per_chunk):
        hi = min(lo + rows_per_chunk, x.shape[0])
        chunk = torch.sub(x[lo:hi], row_max[lo:hi, None], out=buf[:hi - lo])
        torch.sum(chunk.exp_(), dim=-1, out=sums[lo:hi])
    return sums.log() + row_max


def _columns_topk(x: torch.Tensor, k: int, temperature: float, impl: str):
    """The ``k`` best of ``x/τ`` for ``[rows, W]`` (fp32 values, int64 columns, best first) and each row's
    log-sum-exp at τ; ``1 <= k <= W``.  The fused CPU kernel reads the logits once, where they lie (any float dtype,
    padding columns sliced off as a view); the torch path reads them twice."""
    if impl != "torch" and x.device.type == "cpu":
        from salt_megatron.kd.fused_kernels import kernels_for

        kernels = kernels_for(x.device, required=impl == "fused")
        if kernels is not None and kernels.handles_topk(x):
            return kernels.topk_logsumexp(x, k, temperature)
    if impl == "fused":
        raise RuntimeError(f"no fused top-k kernel for {x.dtype} logits on {x.device.type}")
    if x.dtype != torch.float32:
        x = x.float()
    if temperature != 1.0:
        x = x * (1.0 / temperature)  # as the kernels scale: the same values either way
    values, columns = torch.topk(x, k, dim=-1)
    # (the small reused buffer is for the CPU's page faults; on a GPU it would only add kernel launches)
    return values, columns, _log_sum_exp(x, values[:, 0]) if x.device.type == "cpu" else torch.logsumexp(x, -1)


def _shard_layout(width: int, vocab_size: int, tp_group):
    """(first global id of this shard, its columns that are real vocabulary, TP size)."""
    rank, world = tp_rank_and_size(tp_group)
    return rank * width, valid_columns(width, vocab_size, rank, world), world


def _shard_topk_into(logits: torch.Tensor, out: tuple, *, k: int, temperature: float, start: int, valid: int,
                     impl: str) -> None:
    """This shard's ``k`` best (values, global ids) and log-sum-exp of the rows ``[rows, W]`` into ``out`` (padding
    columns ignored; -inf / -1 past the entries of a shard narrower than ``k``, -inf log-sum-exp for an all-padding
    shard)."""
    values, ids, lse = out
    mine = min(k, valid)
    if mine < k:
        values.fill_(-torch.inf)
        ids.fill_(-1)
        lse.fill_(-torch.inf)
    if mine:
        v, columns, s = _columns_topk(logits[:, :valid], mine, temperature, impl)
        values[:, :mine], ids[:, :mine], lse[:] = v, columns + start, s


def _merge_shards(values: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, *, k: int, vocab_size: int,
                  tp_group, world: int):
    """The shards' ``[N, k]`` candidates and ``[N]`` log-sum-exps → (ids, log-probabilities, log of the rest)."""
    if world > 1:
        top = lse.clone()
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        total = (lse - top).exp()
        torch.distributed.all_reduce(total, group=tp_group)
        lse = top + total.log()
        if vocab_size >= 1 << 24:  # the ids travel as fp32 beside the values: exact below 2^24
            raise DataError("the teacher cache under TP handles vocabularies below 16.7M tokens")
        pairs = torch.cat((values, ids.float()), dim=-1)
        gathered = [torch.empty_like(pairs) for _ in range(world)]
        torch.distributed.all_gather(gathered, pairs, group=tp_group)
        all_values = torch.cat([g[:, :k] for g in gathered], dim=-1)
        all_ids = torch.cat([g[:, k:] for g in gathered], dim=-1).long()
        values, at = torch.topk(all_values, k, dim=-1)
        ids = all_ids.gather(-1, at)
    logprobs = values - lse[:, None]
    if k >= vocab_size:
        rest = torch.full(lse.shape, -torch.inf, device=lse.device)
    else:
        # the mass outside the top k, 1 - Σ p_k, in float64 from the k log-probabilities (k numbers a token)
        inside = logprobs.double().exp().sum(-1)
        rest = torch.log1p(-inside.clamp(max=1.0)).float()
    return ids, logprobs, rest


def _empty_candidates(rows: int, k: int, device):
    return (torch.empty(rows, k, device=device), torch.empty(rows, k, dtype=torch.int64, device=device),
            torch.empty(rows, device=device))


def teacher_topk(logits: torch.Tensor, *, k: int, temperature: float, vocab_size: int, tp_group=None,
                 impl: str = "auto"):
    """The teacher's top-``k`` at τ from vocab-parallel logits ``[..., W]`` (padding columns ignored).

    Returns global ids (int64 ``[..., k]``, best first), their log-probabilities at τ (fp32 ``[..., k]``) and the
    log of the mass outside them (fp32 ``[...]``, -inf when k covers the vocabulary).  ``impl``: "auto" the fused
    CPU kernel where there is one, "torch", or "fused".
    """
    lead, width = logits.shape[:-1], logits.shape[-1]
    start, valid, world = _shard_layout(width, vocab_size, tp_group)
    flat = logits.reshape(-1, width)
    out = _empty_candidates(flat.shape[0], k, logits.device)
    _shard_topk_into(flat, out, k=k, temperature=temperature, start=start, valid=valid, impl=impl)
    ids, logprobs, rest = _merge_shards(*out, k=k, vocab_size=vocab_size, tp_group=tp_group, world=world)
    return ids.view(*lead, k), logprobs.view(*lead, k), rest.view(lead)


def block_rows(seq_length: int, width: int, element_size: int, device_type: str = "cpu") -> int:
    """Rows of one window that ``logit_blocks`` multiplies at a time: a function of the window's length,
    the logits' width and the device only (not of the micro-batch), so every batch layout computes the same blocks."""
    budget = _BLOCK_BYTES.get(device_type, _BLOCK_BYTES_ELSEWHERE)
    return max(1, min(seq_length, max(_MIN_BLOCK_ROWS, budget // max(1, width * element_size))))


def logit_blocks(hidden: torch.Tensor, weight: torch.Tensor, *, rows: int | None = None,
                 logits_out: torch.Tensor = None):
    """Yield ``(tokens, block)``: the logits ``hidden @ weight.T`` of ``block_rows`` tokens of one window at a time
    (``tokens``: their slice of the flattened ``[b * s]``), each block written into one reused buffer, or into
    ``logits_out`` (``[b, s, W]``) when given.  ``hidden``: ``[b, s, h]``; ``weight``: ``[W, h]``."""
    b, s, _ = hidden.shape
    width = weight.shape[0]
    rows = rows or block_rows(s, width, hidden.element_size(), hidden.device.type)
    buf = torch.empty(rows, width, dtype=hidden.dtype, device=hidden.device) if logits_out is None else None
    weight_t = weight.t()
    for window in range(b):
        for lo in range(0, s, rows):
            hi = min(s, lo + rows)
            target = buf[:hi - lo] if logits_out is None else logits_out[window, lo:hi]
            yield slice(window * s + lo, window * s + hi), torch.mm(hidden[window, lo:hi], weight_t, out=target)


def teacher_topk_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, *, k: int, temperature: float,
                             vocab_size: int, tp_group=None, impl: str = "auto", logits_out: torch.Tensor = None,
                             rows: int | None = None):
    """``teacher_topk(hidden @ weight.T)`` without the logits-sized tensor.

    ``hidden``: the output layer's input ``[b, s, h]``; ``weight``: its (vocab-parallel) weight ``[W, h]``.  The
    logits are formed block by block (``logit_blocks``); ``logits_out`` (``[b, s, W]``), when given, receives them
    too (``score --cache-topk`` needs the whole logits for its scores).  ``rows``: the block's rows (default
    ``block_rows``; tests make it small).
    """
    b, s, _ = hidden.shape
    start, valid, world = _shard_layout(weight.shape[0], vocab_size, tp_group)
    out = _empty_candidates(b * s, k, hidden.device)
    for tokens, block in logit_blocks(hidden, weight, rows=rows, logits_out=logits_out):
        _shard_topk_into(block, tuple(t[tokens] for t in out), k=k, temperature=temperature, start=start,
                         valid=valid, impl=impl)
    ids, logprobs, rest = _merge_shards(*out, k=k, vocab_size=vocab_size, tp_group=tp_group, world=world)
    return ids.view(b, s, k), logprobs.view(b, s, k), rest.view(b, s)


def forward_topk(model, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int,
                 temperature: float, vocab_size: int, tp_group=None, keep_logits: bool = False):
    """The teacher ``model``'s top-``k`` for a batch through ``teacher_topk_from_hidden`` (no autograd graph):
    ``(ids, logprobs, rest)``, and with ``keep_logits`` ``((ids, logprobs, rest), logits [b, s, W])``."""
    from salt_megatron.model import output_layer_inputs

    with torch.inference_mode(), output_layer_inputs(model) as captured:
        hidden = model(tokens, position_ids, attention_mask)
        weight = captured["weight"]
        logits = torch.empty(*hidden.shape[:2], weight.shape[0], dtype=hidden.dtype,
                             device=hidden.device) if keep_logits else None
        rows = teacher_topk_from_hidden(hidden, weight, k=k, temperature=temperature, vocab_size=vocab_size,
                                        tp_group=tp_group, logits_out=logits)
    return (rows, logits) if keep_logits else rows
