"""`salt-megatron report` tells the truth about this installation, and an unavailable fused kernel says why in one
line (for the API, for `pretrain --kd-impl fused`, and in the report) while impl="torch"/"auto" keep working."""

from __future__ import annotations

import json
import os
import re
from importlib import metadata

import pytest
import torch

from salt_megatron import report, vocab_parallel_kl_div
from salt_megatron.kd import TORCH_KERNELS, build, fused_kernels, select_kernels
from tests.cli_run import refused_in_process, run_cli


@pytest.fixture
def forget_kernels(monkeypatch):
    """A process that has not loaded any fused kernel yet (restored afterwards)."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(fused_kernels, "_kernels", {})


def test_report_json_is_true_to_this_installation():
    proc = run_cli("report", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["torch"] == torch.__version__
    assert info["megatron-core"].split()[0] == metadata.version("megatron-core")
    assert info["numpy"] == metadata.version("numpy")
    assert info["sentencepiece"] == metadata.version("sentencepiece")
    assert info["torch CUDA"] == (torch.version.cuda or "none (a CPU build)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = info[f"fused kernel ({device})"].split(":")[0]
    assert state == build.availability(device)[0]
    auto_is_fused = select_kernels("auto", torch.device(device)) is not TORCH_KERNELS
    assert info[f"--kd-impl auto on this device ({device})"].startswith("fused" if auto_is_fused else "torch")
    assert info["kernel sources"] == str(build.CSRC) and os.path.isfile(build.CSRC / "kl_div_cpu.cpp")


def test_report_table_names_every_field(capsys):
    info = report.main([])
    out = capsys.readouterr().out
    for key, value in info.items():
        assert any(line.startswith(key) and line.rstrip().endswith(str(value)) for line in out.splitlines()), key


@pytest.mark.parametrize("env, reason", [
    ({"SALT_MEGATRON_NO_JIT": "1"}, r"JIT builds are turned off \(SALT_MEGATRON_NO_JIT\)"),
    ({"CXX": "no-such-compiler-xyz"}, r"no C\+\+ compiler \(no-such-compiler-xyz is not on PATH"),
])
def test_a_kernel_that_cannot_be_built_says_why_in_one_line(monkeypatch, forget_kernels, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(build, "import_installed", lambda kind: (None, f"salt_megatron._kl_{kind} is not importable"))
    state, detail = build.availability("cpu")
    assert state == "unavailable"
    assert re.search(reason, detail), detail
    info = report.collect()
    if not torch.cuda.is_available():
        assert info["--kd-impl auto on this device (cpu)"].startswith("torch")
    s, t = torch.randn(4, 50), torch.randn(4, 50)
    with pytest.raises(RuntimeError) as exc:
        vocab_parallel_kl_div(s, t, temperature=2.0, impl="fused")
    message = str(exc.value)
    assert "\n" not in message and "impl='torch' works without it" in message
    assert re.search(reason, message), message
    # the PyTorch path, and "auto" falling back to it, still work
    torch.testing.assert_close(vocab_parallel_kl_div(s, t, temperature=2.0, impl="auto"),
                               vocab_parallel_kl_div(s, t, temperature=2.0, impl="torch"))


def test_a_kernel_that_can_be_built_is_reported_buildable(monkeypatch, forget_kernels):
    monkeypatch.delenv("SALT_MEGATRON_NO_JIT", raising=False)
    monkeypatch.setattr(build, "import_installed", lambda kind: (None, f"salt_megatron._kl_{kind} is not importable"))
    if build.jit_blocker("cpu") is not None:
        pytest.skip(f"this machine cannot JIT-build: {build.jit_blocker('cpu')}")
    state, detail = build.availability("cpu")
    assert state == "JIT-buildable" and "compiles on first use" in detail
    assert build._loaded == {}  # reporting compiles nothing


def test_pretrain_kd_impl_fused_is_refused_before_training_when_unavailable(monkeypatch, forget_kernels, capfd,
                                                                           tmp_path):
    monkeypatch.setattr(build, "_loaded", {"cpu": (None, "no C++ compiler (test)"), "cuda": (None, "no nvcc (test)")})
    line = refused_in_process(capfd, ["pretrain", "--data-path", tmp_path / "d", "--train-iters", "4",
                                      "--teacher-load", tmp_path / "t", "--kd-steps", "2", "--kd-impl", "fused"],
                              r"--kd-impl fused: the fused KL kernel for (cpu|cuda) is not available: no")
    assert not any(tmp_path.iterdir()), line


def test_nvcc_is_found_where_a_user_would_look(monkeypatch, tmp_path):
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(build, "_cuda_home", lambda: None)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    found = report._nvcc()
    assert found.startswith(str(fake))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    if not any(os.path.exists(p) for p in ("/usr/bin/nvcc", "/bin/nvcc")):
        assert report._nvcc() == "none (no CUDA toolkit)"
