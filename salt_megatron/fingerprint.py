"""A model's logits fingerprint: a few numbers that identify its weights, computed on a fixed probe batch.

Saved with every checkpoint (and the fingerprint of the random init beside it).  When a teacher is loaded, its
fingerprint must match the saved one: that catches weights that silently did not load, and a checkpoint that was
never trained (its fingerprint equals its init's).
"""

from __future__ import annotations

import math

import torch

PROBE_LENGTH = 32


def probe_batch(vocab_size: int, seq_length: int):
    """Fixed tokens ``[1, L]``, position ids and causal mask: the same on every machine."""
    length = min(PROBE_LENGTH, seq_length)
    tokens = (torch.arange(length, dtype=torch.long) * 7919 + 13) % vocab_size
    return tokens[None], torch.arange(length)[None]


def summarize(logits_shard: torch.Tensor, tp_group=None) -> list[float]:
    """[count, Σ logits, Σ logits², Σ logits·position-weight] over the whole vocabulary (summed over TP shards)."""
    x = logits_shard.detach().double().reshape(-1, logits_shard.shape[-1])
    weights = torch.linspace(-1.0, 1.0, x.shape[0], dtype=torch.float64, device=x.device)[:, None]
    stats = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(),
                         x.square().sum(), (x * weights).sum()])
    if tp_group is not None and torch.distributed.get_world_size(group=tp_group) > 1:
        torch.distributed.all_reduce(stats, group=tp_group)
    return [float(v) for v in stats]


def matches(a: list[float], b: list[float], rtol: float = 2e-2) -> bool:
    """Equal up to dtype noise (a bf16 run and its fp32 reload give slightly different logits)."""
    if len(a) != 4 or len(b) != 4 or a[0] != b[0]:
        return False
    square = max(abs(a[2]), abs(b[2]), 1e-12)
    linear = math.sqrt(a[0] * square)  # bound on |Σ x| and |Σ x·w| (Cauchy-Schwarz)
    return (abs(a[2] - b[2]) <= rtol * square and abs(a[1] - b[1]) <= rtol * linear
            and abs(a[3] - b[3]) <= rtol * linear)
