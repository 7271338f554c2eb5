"""The fused CPU top-k + log-sum-exp kernel (csrc/topk_cpu.cpp) that ``cache-teacher`` runs, against torch.topk and
the float64 log-sum-exp: fp32/bf16/fp16, temperatures, k from 1 to the width, ties, -inf and nan rows, strided
views; and ``teacher_topk`` through it against its torch path, padding and shards narrower than k included.
"""

from __future__ import annotations

import pytest
import torch

from salt_megatron.kd.teacher_topk import teacher_topk
from tests.kd_cases import DTYPES, fused_kernels_on, make_logits


@pytest.fixture(scope="module")
def kernels():
    return fused_kernels_on("cpu")


def _reference(x: torch.Tensor, k: int, temperature: float):
    """x/τ in fp32 (scaled as the kernel scales: the same values), its top k (values, columns) and log-sum-exp."""
    scaled = x.float() * (1.0 / temperature)
    values, columns = torch.topk(scaled, k, dim=-1)
    return scaled, values, columns, torch.logsumexp(scaled.double(), -1)


SHAPES_K = [(1, 1, 1), (3, 7, 7), (33, 1000, 3), (64, 4096, 64), (5, 3000, 1), (9, 2500, 2500), (4, 40000, 256),
            (2, 17, 16), (6, 129, 100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width,k", SHAPES_K)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_fused_top_k_and_log_sum_exp_match_torch(kernels, dtype, rows, width, k, temperature):
    x = make_logits((rows, width), seed=width + k).to(dtype)
    values, columns, lse = kernels.topk_logsumexp(x, k, temperature)
    scaled, ref_values, ref_columns, ref_lse = _reference(x, k, temperature)
    assert torch.equal(values, ref_values)  # the same k values, best first
    assert torch.equal(scaled.gather(1, columns), values)  # the columns holding them
    assert (columns.sort(-1).values.diff(dim=-1) > 0).all()  # each column once
    untied = (scaled.unsqueeze(1) == values.unsqueeze(-1)).sum(-1) == 1  # a value no other entry has: one column
    assert torch.equal(columns[untied], ref_columns[untied])
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=2e-6)


def test_ties_rank_the_lower_column_first(kernels):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [5.0] * 6, [-0.0, 0.0, -0.0, 0.0, -1.0, -2.0]])
    _, columns, _ = kernels.topk_logsumexp(x, 4, 1.0)
    assert columns.tolist() == [[1, 2, 4, 5], [0, 1, 2, 3], [0, 1, 2, 3]]
    long_row = torch.zeros(1, 5000)  # every set maximum equal to the bar: all 5000 entries are candidates
    values, columns, lse = kernels.topk_logsumexp(long_row, 64, 1.0)
    assert columns.tolist() == [list(range(64))] and (values == 0).all()
    torch.testing.assert_close(lse, torch.tensor([5000.0]).log())


def test_minus_inf_and_nan_rows(kernels):
    x = torch.full((3, 300), -torch.inf)
    x[1, 7], x[1, 200] = 2.0, 1.0  # two finite entries among -inf (padding-like)
    x[2] = torch.randn(300)
    x[2, 5] = torch.nan
    values, columns, lse = kernels.topk_logsumexp(x, 3, 1.0)
    assert (values[0] == -torch.inf).all() and lse[0] == -torch.inf
    assert values[1].tolist() == [2.0, 1.0, -torch.inf] and columns[1, :2].tolist() == [7, 200]
    torch.testing.assert_close(lse[1], torch.logsumexp(x[1], -1))
    assert lse[2].isnan()  # a nan logit poisons its row's log-sum-exp, as in torch


@pytest.mark.parametrize("k", [8, 64, 256])
def test_rows_that_take_each_way_to_the_bar_and_to_the_order(kernels, k):
    """The bar from the histogram of set maxima (with sets of -inf left out of its range), the exact selection
    (equal maxima, an infinite or a subnormal range), the radix sort (over 64 candidates) and nth_element + sort: the same k entries
    in the same order as a stable descending sort (ties: the lower column first)."""
    g = torch.Generator().manual_seed(k)
    rows = torch.randn(8, 4096, generator=g)
    rows[0, 2048:] = -torch.inf  # padding-like: half the sets' maxima are -inf
    rows[1, 100] = torch.inf  # an infinite range of maxima
    rows[2] = torch.randint(0, 5, (4096,), generator=g).float()  # few distinct values: ties everywhere
    rows[3, ::7] = 3.0  # 586 entries tie for the top
    rows[4] *= 1e30  # a finite range near the float limit
    rows[5] = rows[5].round(decimals=1)  # many ties among the candidates
    rows[6, :3000] = -torch.inf
    rows[7] = 0.0
    rows[7, 5], rows[7, 3001] = 2.8e-45, 1.4e-45  # maxima a subnormal step apart: 255 / (hi - lo) is inf
    values, columns, lse = kernels.topk_logsumexp(rows, k, 1.0)
    ref_values, ref_columns = torch.sort(rows, dim=-1, descending=True, stable=True)
    assert torch.equal(values, ref_values[:, :k]) and torch.equal(columns, ref_columns[:, :k])
    torch.testing.assert_close(lse[[0, 2, 3, 5, 6]].double(), torch.logsumexp(rows[[0, 2, 3, 5, 6]].double(), -1),
                               rtol=2e-6, atol=2e-6)


def test_strided_rows_and_threads(kernels):
    base = make_logits((8, 3000), seed=3).float()
    view = base[::2, 100:2100]  # every other row, a window of columns: read where they lie
    ref = kernels.topk_logsumexp(view.contiguous(), 32, 1.0)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = kernels.topk_logsumexp(view, 32, 1.0)
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
    finally:
        torch.set_num_threads(before)


def test_bad_k_is_refused(kernels):
    x = torch.zeros(2, 10)
    for k in (0, 11):
        with pytest.raises(RuntimeError, match="k must be in"):
            kernels.topk_logsumexp(x, k, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,vocab", [(8, 1000), (64, 1000), (1000, 1000), (40, 30)])
def test_teacher_topk_fused_equals_its_torch_path(kernels, dtype, k, vocab):
    logits = make_logits((2, 5, 1024), seed=k).to(dtype)
    logits[..., vocab:] = 100.0  # padding columns: never in the top k
    fused = teacher_topk(logits, k=k, temperature=1.5, vocab_size=vocab, impl="fused")
    plain = teacher_topk(logits, k=k, temperature=1.5, vocab_size=vocab, impl="torch")
    ids, logprobs, rest = fused
    assert (ids >= 0).sum(-1).eq(min(k, vocab)).all() and (ids < vocab).all()  # never a padding column
    if dtype == torch.float32:  # distinct values: the same ids (bf16/fp16 rows have ties in any order)
        assert torch.equal(ids, plain[0])
    # the log-sum-exps differ by an ulp (the kernel's exp), so the log-probabilities and the mass outside do too
    torch.testing.assert_close(logprobs, plain[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rest, plain[2], rtol=1e-5, atol=1e-6)
