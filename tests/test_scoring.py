"""SALT_DS: scoring with the SLM, the sidecar, and selection of the KD phase's data."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from salt_megatron.errors import SaltError
from tests.conftest import STUDENT, pretrain
from tests.dist_utils import run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_dataset(corpus: str, dest) -> str:
    os.makedirs(dest, exist_ok=True)
    for path in glob.glob(corpus + "*"):
        if os.path.isfile(path) and ".salt_scores" not in path:
            shutil.copy(path, dest)
    return os.path.join(str(dest), os.path.basename(corpus))


def _score_worker(rank, world_size, argv):
    from salt_megatron.scoring import build_parser, score

    headers = score(build_parser().parse_args(argv))
    return headers and headers[0]


def _score(world_size, corpus, teacher_dir, *extra):
    return run_workers(_score_worker, world_size, ["--load", teacher_dir, "--data-path", corpus, "--no-progress",
                                                    "--score-chunk-windows", "16", *extra])[0]


@pytest.fixture(scope="module")
def scored(corpus, teacher_dir, tmp_path_factory):
    prefix = _copy_dataset(corpus, tmp_path_factory.mktemp("scored"))
    header = _score(2, prefix, teacher_dir)  # DP=2
    return prefix, header


# ---------------------------------------------------------------------------------------------------------------
# Per-token numbers
# ---------------------------------------------------------------------------------------------------------------


def _direct_token_stats(logits, labels, k, vocab_size):
    x = logits[..., :vocab_size].double()
    loss = F.cross_entropy(x.reshape(-1, vocab_size), labels.reshape(-1), reduction="none").view(labels.shape)
    in_topk = (torch.topk(x, k, dim=-1).indices == labels[..., None]).any(-1)
    return loss, in_topk


def test_token_loss_and_topk_single_shard():
    from salt_megatron.scoring import token_loss_and_topk

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 40, generator=g) * 3
    logits[..., 37:] = 50.0  # padding columns must not count, however large
    labels = torch.randint(0, 37, (3, 7), generator=g)
    loss, in_topk = token_loss_and_topk(logits, labels, k=5, vocab_size=37)
    ref_loss, ref_topk = _direct_token_stats(logits, labels, 5, 37)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(in_topk, ref_topk)


def _tp_topk_worker(rank, world_size, logits, labels, k, vocab):
    from salt_megatron.scoring import token_loss_and_topk

    torch.distributed.init_process_group("gloo")
    w = logits.shape[-1] // world_size
    return token_loss_and_topk(logits[..., rank * w:(rank + 1) * w], labels, k=k, vocab_size=vocab,
                               tp_group=torch.distributed.group.WORLD)


def test_top_k_filter_is_right_at_tp2():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 64, generator=g) * 2
    labels = torch.randint(0, 60, (4, 9), generator=g)
    labels[0, 0] = 40  # a label on the second shard
    results = run_workers(_tp_topk_worker, 2, logits, labels, 10, 60)
    ref_loss, ref_topk = _direct_token_stats(logits, labels, 10, 60)
    for loss, in_topk in results:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.equal(in_topk, ref_topk)
    assert ref_topk.any() and not ref_topk.all()


# ---------------------------------------------------------------------------------------------------------------
# The sidecar against a direct recomputation
# ---------------------------------------------------------------------------------------------------------------


def _recompute_worker(rank, world_size, prefix, teacher_dir, seq_length, seed):
    from salt_megatron.data import scores as S
    from salt_megatron.data.gpt_data import build_gpt_datasets
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture, build_gpt_model, causal_attention_mask
    from salt_megatron.data.windows import UnshuffledWindows
    from salt_megatron import checkpointing

    from megatron.core import tensor_parallel

    initialize_distributed(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    meta = checkpointing.read_meta(teacher_dir)
    arch = GPTArchitecture.from_dict(meta["arch"])
    ds, _ = build_gpt_datasets(prefix + "_train", None, load_tokenizer(meta["tokenizer_model"]),
                               seq_length=seq_length, seed=seed, train_samples=None, valid_samples=None)
    windows = UnshuffledWindows(ds)
    model = build_gpt_model(arch)
    checkpointing.load_model_weights(meta["path"], model)
    model.eval()
    per_window, doc_tokens = [], {}
    for w in range(len(windows)):
        item = windows.item(w)
        with torch.no_grad():
            logits = model(item["tokens"][None], item["position_ids"][None], causal_attention_mask(seq_length))[0]
        x = logits[:, :arch.vocab_size].double()
        loss = F.cross_entropy(x, item["labels"], reduction="none").numpy()
        in_topk = (torch.topk(x, 10, dim=-1).indices == item["labels"][:, None]).any(-1).numpy()
        keep = item["loss_mask"].numpy() > 0
        per_window.append(S.score_unit(loss[keep], in_topk[keep]))
        for d, l, t in zip(windows.target_documents(w, seq_length)[keep], loss[keep], in_topk[keep]):
            doc_tokens.setdefault(int(d), []).append((l, t))
    docs = {d: S.score_unit(np.array([l for l, _ in v]), np.array([t for _, t in v])) for d, v in doc_tokens.items()}
    return np.array(per_window), docs


def test_scores_equal_a_direct_recomputation(scored, teacher_dir):
    from salt_megatron.data import scores as S

    prefix, header = scored
    got_header, samples, documents = S.load_sidecar(prefix + "_train", seq_length=32)
    assert got_header["num_windows"] == samples.shape[0] > 16  # more than one chunk, spread over 2 DP ranks
    windows, docs = run_workers(_recompute_worker, 1, prefix, teacher_dir, 32, header["seed"])[0]
    np.testing.assert_allclose(samples, windows, rtol=1e-4, atol=1e-4)
    assert (samples[:, 0] > 0).any()  # real salt scores, not only the no-learnable-token value
    for d, ref in docs.items():
        np.testing.assert_allclose(documents[d], ref, rtol=1e-4, atol=1e-4)


def test_mismatched_sidecar_is_refused(scored, tmp_path, corpus):
    from salt_megatron.data import scores as S

    prefix, _ = scored
    with pytest.raises(S.SidecarMismatch, match="seq-length"):
        S.load_sidecar(prefix + "_train", seq_length=64)
    other = _copy_dataset(corpus, tmp_path / "other")
    for path in glob.glob(prefix + "_train.salt_scores*"):
        shutil.copy(path, os.path.dirname(other))
    # the sidecar of the train split, placed beside the valid split: another .idx
    for path in glob.glob(os.path.dirname(other) + "/*_train.salt_scores*"):
        os.rename(path, path.replace("_train.salt_scores", "_valid.salt_scores"))
    with pytest.raises(S.SidecarMismatch, match="another dataset"):
        S.load_sidecar(other + "_valid", seq_length=32)


def test_killed_scoring_resumes_to_an_identical_sidecar(scored, teacher_dir, tmp_path, corpus):
    from salt_megatron.data import scores as S

    prefix, _ = scored
    fresh = _copy_dataset(corpus, tmp_path / "resume")
    cmd = [sys.executable, "-m", "salt_megatron.cli", "score", "--load", teacher_dir, "--data-path", fresh,
           "--no-progress", "--score-chunk-windows", "4", "--micro-batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = S.sidecar_paths(fresh + "_train")["partial"]
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(glob.glob(os.path.join(partial, "chunk_*.npz"))) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    done_before = len(glob.glob(os.path.join(partial, "chunk_*.npz")))
    assert 2 <= done_before and not os.path.exists(S.sidecar_paths(fresh + "_train")["header"])
    # DP=2 rerun with the same chunking continues from the finished chunks
    _score(2, fresh, teacher_dir, "--score-chunk-windows", "4", "--micro-batch-size", "1")
    # an uninterrupted single-process run with the same settings
    clean = _copy_dataset(corpus, tmp_path / "clean")
    _score(1, clean, teacher_dir, "--score-chunk-windows", "4", "--micro-batch-size", "1")
    for key in ("samples", "documents"):
        a = open(S.sidecar_paths(fresh + "_train")[key], "rb").read()
        b = open(S.sidecar_paths(clean + "_train")[key], "rb").read()
        assert a == b


# ---------------------------------------------------------------------------------------------------------------
# Selection in training
# ---------------------------------------------------------------------------------------------------------------


def test_select_top_and_band():
    from salt_megatron.data.selection import select_windows

    scores = np.array([0.5, 3.0, -1.0, 2.0, 2.0, 9.0, 1.0, 0.1, 4.0, 0.0])
    assert select_windows(scores, mode="top", fraction=0.3).tolist() == [5, 8, 1]
    assert select_windows(scores, mode="band", fraction=0.3, skip_fraction=0.1).tolist() == [8, 1, 3]
    with pytest.raises(ValueError, match="fraction"):
        select_windows(scores, mode="top", fraction=0.0)


def _expected_checksums(prefix, header, gbs, kd_steps, total, fraction):
    """Token sums of each step's global batch: selected windows during KD, the ordinary dataset after."""
    from salt_megatron.data.gpt_data import build_gpt_datasets
    from salt_megatron.data.scores import load_sidecar
    from salt_megatron.data.selection import SelectedWindows
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.data.windows import UnshuffledWindows

    tok = load_tokenizer(prefix + ".model")
    hdr, samples, _ = load_sidecar(prefix + "_train", seq_length=32)
    scored_ds, _ = build_gpt_datasets(prefix + "_train", None, tok, seq_length=32, seed=hdr["seed"],
                                      train_samples=None, valid_samples=None)
    sel = SelectedWindows(UnshuffledWindows(scored_ds), hdr, samples, score="salt", mode="top", fraction=fraction,
                          skip_fraction=0.0, seed=1234)
    train_ds, _ = build_gpt_datasets(prefix + "_train", None, tok, seq_length=32, seed=1234,
                                     train_samples=total * gbs, valid_samples=None)
    out = []
    for step in range(total):
        ds = sel if step < kd_steps else train_ds
        out.append(int(sum(int(ds[i]["tokens"].sum()) for i in range(step * gbs, (step + 1) * gbs))))
    return out, set(sel.selected.tolist()), sel


def test_kd_phase_draws_only_selected_windows_and_resume_is_exact(scored, teacher_dir, tmp_path):
    prefix, header = scored
    save = str(tmp_path / "run")
    common = ["--data-path", prefix, *STUDENT, "--global-batch-size", "4", "--train-iters", "8", "--eval-iters",
              "1", "--teacher-load", teacher_dir, "--kd-steps", "4", "--kd-weight", "0.5",
              "--kd-data-selection", "top", "--kd-select-fraction", "0.25", "--tensor-model-parallel-size", "2"]
    straight, = pretrain(2, [*common, "--save", save, "--save-interval", "1"])
    expected, selected, sel = _expected_checksums(prefix, header, 4, 4, 8, 0.25)
    assert [h["data"] for h in straight["train"]] == ["kd_selected"] * 4 + ["full"] * 4
    assert [h["token_checksum"] for h in straight["train"]] == expected
    assert all(sel.window_of(i) in selected for i in range(16))
    resumed = pretrain(2, *[[*common, "--load", os.path.join(save, f"iter_{k:07d}")] for k in (3, 4)])
    full = [h["loss"] for h in straight["train"]]
    for k, h in zip((3, 4), resumed):
        assert [x["loss"] for x in h["train"]] == pytest.approx(full[k:], rel=1e-6)
        assert [x["token_checksum"] for x in h["train"]] == expected[k:]


def test_selection_refuses_a_sidecar_of_another_seq_length(scored, teacher_dir):
    from salt_megatron.training.loop import main

    prefix, _ = scored
    argv = ["--data-path", prefix, *STUDENT, "--train-iters", "4", "--teacher-load", teacher_dir, "--kd-steps", "2",
            "--kd-data-selection", "top"]
    argv[argv.index("--seq-length") + 1] = "16"
    with pytest.raises(SaltError, match="seq-length 32"):
        main(argv)
