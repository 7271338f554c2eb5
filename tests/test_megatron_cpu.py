"""megatron-core runs on this CPU: a tiny GPTModel with TP=2 in 2 processes, forward and backward."""

from __future__ import annotations

import torch

from tests.dist_utils import run_workers


def _tp2_gpt_worker(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel

    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture, build_gpt_model, causal_attention_mask, pad_vocab_size

    initialize_distributed(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    arch = GPTArchitecture(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16,
                           vocab_size=100, padded_vocab_size=pad_vocab_size(100, 2, divisible_by=8))
    model = build_gpt_model(arch)
    b, s = 3, 16
    tokens = torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(s)[None].expand(b, s)
    logits = model(tokens, position_ids, causal_attention_mask(s))
    logits.float().square().mean().backward()
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    return {
        "logits_shape": tuple(logits.shape),
        "padded": arch.padded_vocab_size,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "grads_ok": grads_ok,
        # the tracker must give each TP rank its own init for sharded weights
        "qkv_weight_sum": float(model.decoder.layers[0].self_attention.linear_qkv.weight.sum()),
    }


def test_gpt_model_tp2_forward_backward_on_cpu():
    r0, r1 = run_workers(_tp2_gpt_worker, 2)
    for r in (r0, r1):
        assert r["tp"] == 2 and r["grads_ok"]
        # GPTModel returns the vocab-parallel logits transposed to [b, s, padded_vocab / TP]
        assert r["logits_shape"] == (3, 16, r["padded"] // 2)
    assert r0["qkv_weight_sum"] != r1["qkv_weight_sum"]


def test_a_missing_private_name_fails_at_import_with_one_line_naming_the_version():
    """Every patch of a megatron-core internal checks the name first: a release without it fails at
    `import salt_megatron` with one line naming the installed megatron-core, not deep inside a training step."""
    import subprocess
    import sys
    from importlib.metadata import version

    code = ("import megatron.core.tensor_parallel.random as r; del r._get_cuda_rng_state; import salt_megatron")
    env = dict(__import__("os").environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "MegatronCoreIncompatible" in last and f"megatron-core {version('megatron-core')}" in last
    assert "_get_cuda_rng_state" in last and "supported: megatron-core 0.16-0.19" in last


def test_patches_are_applied_once_by_the_package_and_nowhere_else():
    """`import salt_megatron` applies them; no other module of the package calls the entry point again."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "salt_megatron"
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if "ensure_megatron_runs_here()" in p.read_text() and p.parent.name != "compat")
    assert callers == ["__init__.py"], callers
