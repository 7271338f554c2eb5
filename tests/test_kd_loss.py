"""vocab_parallel_kl_div and salt_loss (PyTorch kernels, one shard) against the float64 reference: values,
gradients, padding, masks, extreme rows, argument checks.  Other devices, the fused kernels and tensor parallelism
have their own files (test_kd_kernels.py, test_kd_tensor_parallel.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salt_megatron import salt_loss, vocab_parallel_kl_div
from salt_megatron.kd.reference import reference_grad, reference_kl
from tests.kd_cases import check_one_pass_equals_separate, make_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 50), (3, 5, 64), (1, 1), (33, 1000)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_single_shard_matches_float64_reference(dtype, shape, temperature):
    s64, t64 = make_logits(shape, 0), make_logits(shape, 1)
    s = s64.to(dtype).requires_grad_(True)
    t = t64.to(dtype)
    kl = vocab_parallel_kl_div(s, t, temperature=temperature, impl="torch")
    assert kl.dtype == torch.float32 and kl.shape == shape[:-1]
    # the reference sees exactly the (rounded) inputs the kernel saw
    ref = reference_kl(s.detach(), t, temperature)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-5)
    g = torch.rand(shape[:-1], dtype=torch.float64)
    kl.backward(g.float())
    ref_grad = reference_grad(s.detach(), t, temperature, grad_out=g)
    assert s.grad.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 1e-2 * max(1.0, ref_grad.abs().max().item())
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-2 if dtype != torch.float32 else 1e-4, atol=atol)


def test_gradcheck_small_shapes():
    for shape, tau, vocab in [((3, 6), 1.0, None), ((2, 3, 5), 2.0, 4), ((4, 9), 0.7, 7)]:
        s = make_logits(shape, 2).requires_grad_(True)
        t = make_logits(shape, 3)
        assert torch.autograd.gradcheck(
            lambda x: vocab_parallel_kl_div(x, t, temperature=tau, vocab_size=vocab, impl="torch"), (s,)
        )


def test_teacher_gets_no_gradient():
    s = make_logits((4, 10), 0).float().requires_grad_(True)
    t = make_logits((4, 10), 1).float().requires_grad_(True)
    vocab_parallel_kl_div(s, t, impl="torch").sum().backward()
    assert s.grad is not None and t.grad is None


def test_padding_columns_count_for_neither_model():
    s, t = make_logits((5, 12), 0), make_logits((5, 12), 1)
    s2, t2 = s.clone(), t.clone()
    s2[:, 9:] = 1e4  # huge padded logits must not change anything
    t2[:, 9:] = -7.0
    a = vocab_parallel_kl_div(s.float(), t.float(), vocab_size=9, impl="torch")
    x = s2.float().requires_grad_(True)
    b = vocab_parallel_kl_div(x, t2.float(), vocab_size=9, impl="torch")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.double(), reference_kl(s, t, vocab_size=9), rtol=1e-5, atol=1e-6)
    b.sum().backward()
    assert torch.all(x.grad[:, 9:] == 0)


def test_loss_mask_rows_are_zero_and_others_unchanged():
    s, t = make_logits((6, 20), 0).float(), make_logits((6, 20), 1).float()
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    x = s.clone().requires_grad_(True)
    kl = vocab_parallel_kl_div(x, t, loss_mask=mask, impl="torch")
    full = vocab_parallel_kl_div(s, t, impl="torch")
    assert torch.all(kl[~mask] == 0)
    torch.testing.assert_close(kl[mask], full[mask])
    kl.sum().backward()
    assert torch.all(x.grad[~mask] == 0)
    ref = reference_grad(s, t)
    torch.testing.assert_close(x.grad[mask].double(), ref[mask], rtol=1e-4, atol=1e-6)


def test_extreme_rows():
    v = 16
    s = make_logits((5, v), 0)
    t = make_logits((5, v), 1)
    s[0], t[0] = 1e4 * torch.sign(s[0]), -1e4 * torch.sign(t[0])  # ±1e4 logits
    t[1, :5] = float("-inf")  # teacher assigns zero probability somewhere
    s[2, :3] = float("-inf")
    t[2, :3] = float("-inf")  # both -inf at the same columns
    s[3] = 2.5
    t[3] = 2.5  # all-equal rows: KL exactly 0
    s[4] = 0.0  # uniform student, peaked teacher
    x = s.float().requires_grad_(True)
    kl = vocab_parallel_kl_div(x, t.float(), impl="torch")
    ref = reference_kl(s.float(), t.float())
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-4)
    assert kl[3].item() == pytest.approx(0.0, abs=1e-7)
    kl.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), reference_grad(s.float(), t.float()), rtol=1e-4, atol=1e-6)


def test_student_minus_inf_where_teacher_has_mass_is_infinite():
    s = torch.zeros(1, 4)
    s[0, 1] = float("-inf")
    assert torch.isinf(vocab_parallel_kl_div(s, torch.zeros(1, 4), impl="torch")).all()


def test_empty_batch():
    s = torch.zeros(0, 32, requires_grad=True)
    kl = vocab_parallel_kl_div(s, torch.zeros(0, 32), impl="torch")
    assert kl.shape == (0,)
    kl.sum().backward()
    assert s.grad.shape == (0, 32)


def test_chunking_does_not_change_results(monkeypatch):
    import salt_megatron.kd.torch_kernels as kd

    s, t = make_logits((37, 300), 0).float(), make_logits((37, 300), 1).float()
    whole = vocab_parallel_kl_div(s, t, impl="torch")
    monkeypatch.setattr(kd, "_CHUNK_ELEMENTS", 1000)  # 3 rows per chunk
    torch.testing.assert_close(vocab_parallel_kl_div(s, t, impl="torch"), whole)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(vocab_size=41), "vocab_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    s = torch.zeros(3, 40)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_kl_div(s, s, **kwargs)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="teacher_logits"):
        vocab_parallel_kl_div(torch.zeros(3, 40), torch.zeros(3, 41))


@pytest.mark.parametrize("omega", [-0.1, 1.5])
def test_salt_loss_refuses_bad_kd_weight(omega):
    with pytest.raises(ValueError, match="kd_weight"):
        salt_loss(torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 8), kd_weight=omega)


# ---------------------------------------------------------------------------------------------------------------
# The SALT loss (single shard)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("omega", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("squared", [True, False])
def test_salt_loss_combines_ce_and_kd(omega, squared):
    b, s_len, v, tau = 2, 5, 11, 2.0
    student = make_logits((b, s_len, v), 0).float().requires_grad_(True)
    teacher = make_logits((b, s_len, v), 1).float()
    labels = torch.randint(0, v, (b, s_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, s_len)
    mask[1, 3:] = 0
    out = salt_loss(student, labels, teacher, kd_weight=omega, temperature=tau, loss_mask=mask,
                    scale_kd_by_temperature_squared=squared, impl="torch")
    keep = mask.bool()
    ce_ref = F.cross_entropy(student.detach()[keep].double(), labels[keep])
    kd_ref = reference_kl(student.detach()[keep], teacher[keep], tau).mean()
    factor = tau**2 if squared else 1.0
    expected = (1 - omega) * ce_ref + omega * factor * kd_ref
    torch.testing.assert_close(out.ce.double(), ce_ref, rtol=1e-5, atol=1e-6)
    if omega > 0:
        torch.testing.assert_close(out.kd.double(), kd_ref, rtol=1e-5, atol=1e-6)
    else:
        assert out.kd is None
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.num_tokens.item() == keep.sum().item()
    out.loss.backward()
    assert torch.all(student.grad[~keep] == 0)


def test_salt_loss_needs_teacher_when_kd_weight_positive():
    with pytest.raises(ValueError, match="teacher_logits"):
        salt_loss(torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), None, kd_weight=0.5)


# ---------------------------------------------------------------------------------------------------------------
# CE and KD from one pass (any τ, padding; TP: test_kd_tensor_parallel.py)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("omega", [0.3, 1.0])
@pytest.mark.parametrize("tau,vocab_size", [(1.0, None), (2.0, None), (1.0, 290), (0.7, 293)])
def test_salt_loss_one_pass_ce_and_kd_equals_the_separate_terms(monkeypatch, dtype, omega, tau, vocab_size):
    """salt_loss takes CE from the KD pass; it must equal CE + KD computed apart (CE over every column, padding
    included, as megatron-core's), at τ = 1 and not, with and without padding.  (The fused kernels' one pass, on
    every device: test_kd_kernels.py.)"""
    b, s_len, v = 3, 7, 300
    student = make_logits((b, s_len, v), 0).to(dtype)
    teacher = make_logits((b, s_len, v), 1).to(dtype)
    student[0, 0, :5] = 1e4  # extreme logits on one row
    student[1, 1, -1] = 60.0  # a padding logit far above the real ones (where there is padding)
    labels = torch.randint(0, vocab_size or v, (b, s_len), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(b, s_len)
    mask[2, 4:] = 0
    check_one_pass_equals_separate(monkeypatch, student, teacher, labels, mask, omega, "torch", tau, vocab_size)


@pytest.mark.parametrize("tau,vocab_size", [(1.0, None), (1.7, None), (1.0, 37), (0.6, 33)])
def test_salt_loss_one_pass_matches_the_float64_reference(tau, vocab_size):
    from tests.kd_cases import reference_salt_loss

    s, t = make_logits((2, 5, 40), 3), make_logits((2, 5, 40), 4)
    s[0, 1, 39] = 30.0  # padding above every real logit of its row
    t[1, 2, :10] = float("-inf")
    labels = torch.randint(0, vocab_size or 40, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    x = s.float().clone().requires_grad_(True)
    out = salt_loss(x, labels, t.float(), kd_weight=0.6, temperature=tau, loss_mask=mask, vocab_size=vocab_size,
                    impl="torch")
    out.loss.backward()
    loss, ce, kd, grad = reference_salt_loss(s.float(), t.float(), labels, mask, 0.6, tau, vocab_size)
    for got, want in ((out.loss, loss), (out.ce, ce), (out.kd, kd)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-5, atol=1e-6)


def test_salt_loss_keeps_ce_separate_when_asked_or_without_kd(monkeypatch):
    import salt_megatron.kd.loss as kd

    def fail(*a):
        raise AssertionError("fused CE+KD used where it must not be")

    monkeypatch.setattr(kd.KLAndCrossEntropy, "apply", fail)
    s, t = make_logits((2, 3, 40), 0).float(), make_logits((2, 3, 40), 1).float()
    labels = torch.zeros(2, 3, dtype=torch.long)
    salt_loss(s, labels, t, kd_weight=0.5, temperature=2.0, fuse_ce_with_kd=False)
    salt_loss(s, labels, None, kd_weight=0.0)  # the LM phase: no KD pass to share
