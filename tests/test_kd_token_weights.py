"""--kd-token-weighting: the teacher's top-1 / top-k / probability of the true token, measured inside the KD loss
(TP = 1 and 2, padding and masked rows excluded, τ = 1 and 2, every kernel set) against the gathered float64
answer, in exactly the KD loss's two collectives; factors of mean 1; the weighted loss against its formula; factors
that come out uniform give plain SALT (value and gradient, the one-pass CE+KD included); a run trains with it."""

from __future__ import annotations

import pytest
import torch

from salt_megatron.kd import salt_loss, vocab_parallel_kl_div
from salt_megatron.kd.token_weights import TokenCorrectness, normalised_weights
from tests.conftest import STUDENT, pretrain
from tests.dist_utils import run_workers
from tests.kd_cases import CountingAllReduce, fused_kernels_on, make_logits

SHAPE, VOCAB = (3, 5, 24), 21  # the last 3 columns are padding
MODES = [("teacher_top1", 1), ("teacher_topk", 4), ("teacher_prob", 1)]


def _reference(teacher, labels, mode, k, vocab, tau=1.0):
    t = teacher[..., :vocab].double()
    label_logit = t.gather(-1, labels[..., None]).squeeze(-1)
    if mode == "teacher_prob":
        return torch.softmax(t / tau, -1).gather(-1, labels[..., None]).squeeze(-1)
    above = (t > label_logit[..., None]).sum(-1)
    return (above < (1 if mode == "teacher_top1" else k)).double()


def _inputs():
    teacher = make_logits(SHAPE, 3)
    teacher[..., VOCAB:] = 50.0  # padding columns that would win every arg-max if they counted
    labels = torch.randint(0, VOCAB, SHAPE[:-1], generator=torch.Generator().manual_seed(4))
    labels[0, :3] = teacher[0, :3, :VOCAB].argmax(-1)  # some tokens the teacher gets right
    mask = torch.ones(SHAPE[:-1], dtype=torch.bool)
    mask[1, 1:3] = False
    return make_logits(SHAPE, 5), teacher, labels, mask


def _measure(student, teacher, labels, mask, mode, k, tau, impl, tp_group=None):
    _, answer = vocab_parallel_kl_div(student, teacher, temperature=tau, vocab_size=VOCAB, tp_group=tp_group,
                                      loss_mask=mask, impl=impl, correctness=TokenCorrectness(mode, labels, k))
    return answer


def _tp_worker(rank, world_size, student, teacher, labels, mask, cases):
    torch.distributed.init_process_group("gloo")
    out = []
    w = teacher.shape[-1] // world_size
    cols = slice(rank * w, (rank + 1) * w)
    for mode, k, tau in cases:
        with CountingAllReduce() as counter:
            answer = _measure(student[..., cols], teacher[..., cols], labels, mask, mode, k, tau, "torch",
                              torch.distributed.group.WORLD)
        out.append((answer, [shape for _, shape in counter.calls]))
    return out


CASES = [(mode, k, tau) for mode, k in MODES for tau in (1.0, 2.0)]


def test_correctness_matches_the_gathered_answer_in_the_kd_losss_two_collectives():
    student, teacher, labels, mask = _inputs()
    kept = int(mask.sum())
    tp2 = run_workers(_tp_worker, 2, student, teacher, labels, mask, CASES)
    for i, (mode, k, tau) in enumerate(CASES):
        want = _reference(teacher, labels, mode, k, VOCAB, tau) * mask
        assert want.sum() > 0 and (mode == "teacher_prob" or want.sum() < mask.sum())
        for impl in ("torch", "fused"):
            if impl == "fused":
                fused_kernels_on("cpu")
            for dtype in (torch.float64, torch.float32):
                got = _measure(student.to(dtype), teacher.to(dtype), labels, mask, mode, k, tau, impl)
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        for rank_results in tp2:
            answer, collectives = rank_results[i]
            torch.testing.assert_close(answer.double(), want, rtol=1e-5, atol=1e-6)
            # the KD loss's own MAX and SUM, each one column wider: nothing else crossed the group
            assert collectives == [(kept, 3), (kept, 4 if mode == "teacher_topk" else 3)], (mode, collectives)


def test_the_factors_have_mean_one_over_the_kept_tokens():
    _, teacher, labels, mask = _inputs()
    g = _reference(teacher, labels, "teacher_topk", 4, VOCAB).float()
    w = normalised_weights(g, mask)
    assert float((w * mask).sum() / mask.sum()) == pytest.approx(1.0)
    assert torch.equal(normalised_weights(torch.zeros(labels.shape), mask), torch.ones(labels.shape))


def _salt(student, teacher, labels, mask, tau, vocab, impl, **kwargs):
    x = student.clone().requires_grad_(True)
    r = salt_loss(x, labels, teacher, kd_weight=0.4, temperature=tau, loss_mask=mask, vocab_size=vocab, impl=impl,
                  **kwargs)
    r.loss.backward()
    return r, x.grad


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("tau, vocab", [(1.0, None), (1.0, VOCAB), (2.0, VOCAB)])  # None, τ = 1: the one-pass CE+KD
def test_the_weighted_loss_follows_its_formula_and_uniform_factors_are_plain_salt(impl, tau, vocab):
    student, teacher, labels, mask = _inputs()
    mask = mask.float()
    plain, plain_grad = _salt(student, teacher, labels, mask, tau, vocab, impl)
    # top-k with k = the whole vocabulary: the teacher is always "right", so the factors are all 1
    uniform, uniform_grad = _salt(student, teacher, labels, mask, tau, vocab, impl,
                                  kd_token_weighting="teacher_topk", kd_token_topk=SHAPE[-1])
    for a, b in ((plain.loss, uniform.loss), (plain.kd, uniform.kd), (plain_grad, uniform_grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    weighted, _ = _salt(student, teacher, labels, mask, tau, vocab, impl, kd_token_weighting="teacher_prob")
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, SHAPE[-1]), labels.reshape(-1), reduction="none")
    kd = vocab_parallel_kl_div(student, teacher, temperature=tau, vocab_size=vocab, impl="torch").reshape(-1)
    omega = 0.4 * normalised_weights(_reference(teacher, labels, "teacher_prob", 1, vocab or SHAPE[-1], tau), mask)
    per_token = (1 - omega).clamp(min=0).reshape(-1) * ce + tau**2 * omega.reshape(-1) * kd
    torch.testing.assert_close(weighted.loss.double(), (per_token * mask.reshape(-1)).sum() / mask.sum(),
                               rtol=1e-5, atol=1e-6)


def test_a_run_trains_with_token_weighting(corpus, teacher_dir):
    history, = pretrain(2, ["--data-path", corpus, *STUDENT, "--tensor-model-parallel-size", "2", "--train-iters",
                            "3", "--eval-iters", "1", "--teacher-load", teacher_dir, "--kd-steps", "2",
                            "--kd-token-weighting", "teacher_topk"])
    assert [r["kd_weight"] for r in history["train"]] == [0.5, 0.5, 0.0]
    assert all(r["loss"] == r["loss"] for r in history["train"])  # finite
