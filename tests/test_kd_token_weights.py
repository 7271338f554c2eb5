"""--kd-token-weighting: the teacher's top-1 / top-k / probability of the true token on vocab-parallel logits (TP = 1
and 2, padding excluded) against the gathered float64 answer; factors of mean 1; uniform factors give plain SALT
(value and gradient, every kernel set); a run trains with it."""

from __future__ import annotations

import pytest
import torch

from salt_megatron.kd import salt_loss
from salt_megatron.kd.token_weights import kd_token_weights, teacher_correctness
from tests.conftest import STUDENT, pretrain
from tests.dist_utils import run_workers
from tests.kd_cases import make_logits

SHAPE, VOCAB = (3, 5, 24), 21  # the last 3 columns are padding


def _reference(teacher, labels, mode, k, vocab):
    t = teacher[..., :vocab].double()
    label_logit = t.gather(-1, labels[..., None]).squeeze(-1)
    if mode == "teacher_prob":
        return torch.softmax(t, -1).gather(-1, labels[..., None]).squeeze(-1)
    above = (t > label_logit[..., None]).sum(-1)
    return (above < (1 if mode == "teacher_top1" else k)).double()


def _inputs():
    teacher = make_logits(SHAPE, 3)
    teacher[..., VOCAB:] = 50.0  # padding columns that would win every arg-max if they counted
    labels = torch.randint(0, VOCAB, SHAPE[:-1], generator=torch.Generator().manual_seed(4))
    labels[0, :3] = teacher[0, :3, :VOCAB].argmax(-1)  # some tokens the teacher gets right
    return teacher, labels


def _tp_worker(rank, world_size, teacher, labels, mode, k):
    torch.distributed.init_process_group("gloo")
    w = teacher.shape[-1] // world_size
    return teacher_correctness(teacher[..., rank * w:(rank + 1) * w], labels, mode, k=k, vocab_size=VOCAB,
                               tp_group=torch.distributed.group.WORLD)


@pytest.mark.parametrize("mode, k", [("teacher_top1", 1), ("teacher_topk", 4), ("teacher_prob", 1)])
def test_teacher_correctness_matches_the_gathered_answer(mode, k):
    teacher, labels = _inputs()
    want = _reference(teacher, labels, mode, k, VOCAB)
    assert want.sum() > 0 and (mode == "teacher_prob" or want.sum() < want.numel())
    got = teacher_correctness(teacher, labels, mode, k=k, vocab_size=VOCAB)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for shard in run_workers(_tp_worker, 2, teacher, labels, mode, k):
        torch.testing.assert_close(shard.double(), want, rtol=1e-5, atol=1e-6)


def test_the_factors_have_mean_one_over_the_kept_tokens():
    teacher, labels = _inputs()
    mask = torch.ones(labels.shape)
    mask[2] = 0
    w = kd_token_weights(teacher, labels, "teacher_topk", loss_mask=mask, k=4, vocab_size=VOCAB)
    assert float((w * mask).sum() / mask.sum()) == pytest.approx(1.0)
    never = torch.full_like(labels, 0)
    flat = teacher.clone()
    flat[..., 0] = -1e4  # the teacher never ranks token 0 first
    assert torch.equal(kd_token_weights(flat, never, "teacher_top1", loss_mask=mask, vocab_size=VOCAB),
                       torch.ones(labels.shape))


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("tau, vocab", [(1.0, None), (1.0, VOCAB), (2.0, VOCAB)])  # None, τ = 1: the one-pass CE+KD
def test_uniform_factors_are_plain_salt(impl, tau, vocab):
    student, teacher = make_logits(SHAPE, 5), make_logits(SHAPE, 6)
    labels = torch.randint(0, VOCAB, SHAPE[:-1], generator=torch.Generator().manual_seed(7))
    mask = torch.ones(labels.shape)
    mask[1, 2] = 0
    out = {}
    for name, weights in (("plain", None), ("uniform", torch.ones(labels.shape))):
        x = student.clone().requires_grad_(True)
        r = salt_loss(x, labels, teacher, kd_weight=0.4, temperature=tau, loss_mask=mask, vocab_size=vocab,
                      impl=impl, kd_token_weights=weights)
        r.loss.backward()
        out[name] = (r.loss.detach(), r.kd, x.grad)
    for a, b in zip(out["plain"], out["uniform"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_run_trains_with_token_weighting(corpus, teacher_dir):
    history, = pretrain(2, ["--data-path", corpus, *STUDENT, "--tensor-model-parallel-size", "2", "--train-iters",
                            "3", "--eval-iters", "1", "--teacher-load", teacher_dir, "--kd-steps", "2",
                            "--kd-token-weighting", "teacher_topk"])
    assert [r["kd_weight"] for r in history["train"]] == [0.5, 0.5, 0.0]
    assert all(r["loss"] == r["loss"] for r in history["train"])  # finite
