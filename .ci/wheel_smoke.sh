#!/usr/bin/env bash
# The package as a user gets it, not the checkout: an isolated wheel build (no torch at build time: the kernel
# sources ship in the wheel), installed with its declared dependencies only (pinned by constraints.txt) into a fresh
# virtual environment, used from a folder outside the repository.  There: `salt-megatron report`, the fused CPU
# kernel (compiled just in time from the shipped sources) against the PyTorch path on a random batch, and
# prepare -> pretrain (3 steps) -> score -> evaluate -> a SALT student (2 steps) on a tiny dataset.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
PYTHON="${PYTHON:-python3}"
start=$(date +%s)
say() { echo "[wheel-smoke $(( $(date +%s) - start )) s] $*"; }

say "isolated wheel build"
"$PYTHON" -m venv "$work/build-env"
"$work/build-env/bin/pip" install -q --disable-pip-version-check build
"$work/build-env/bin/python" -m build --wheel --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/salt_megatron-*.whl)
say "built $(basename "$wheel")"
# the listing is read whole first: `unzip -l | grep -q` under pipefail fails at random (grep quits at the first
# match, unzip dies of SIGPIPE)
listing="$(unzip -l "$wheel")"
for part in salt_megatron/csrc/kl_div_cpu.cpp salt_megatron/csrc/kl_div_cuda.cu salt_megatron/csrc/salt_kl.h \
            salt_megatron/kd/kernel_flags.py; do
  grep -qF "$part" <<< "$listing" || { echo "the wheel lacks $part"; exit 1; }
done

say "fresh venv: the wheel and its declared dependencies only"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check -c "$repo/constraints.txt" "$wheel"
cd "$work"  # outside the repository: nothing of the checkout is importable from here
bin="$work/venv/bin"
"$bin/python" -c "import salt_megatron, sys; assert '$repo' not in salt_megatron.__file__, salt_megatron.__file__"
"$bin/salt-megatron" report

say "the fused CPU kernel (just in time) against the PyTorch path"
TORCH_EXTENSIONS_DIR="$work/torch_extensions" "$bin/python" - <<'PY'
import torch
from salt_megatron.kd import build, vocab_parallel_kl_div
from salt_megatron.kd.reference import reference_kl
g = torch.Generator().manual_seed(0)
s, t = torch.randn(64, 3000, generator=g) * 3, torch.randn(64, 3000, generator=g) * 3
out = {}
for impl in ("fused", "torch"):
    x = s.clone().requires_grad_(True)
    kl = vocab_parallel_kl_div(x, t, temperature=1.5, vocab_size=2990, impl=impl)
    kl.sum().backward()
    out[impl] = (kl.detach(), x.grad)
torch.testing.assert_close(out["fused"][0], out["torch"][0], rtol=1e-4, atol=1e-5)
torch.testing.assert_close(out["fused"][1], out["torch"][1], rtol=1e-4, atol=1e-6)
torch.testing.assert_close(out["fused"][0].double(), reference_kl(s, t, 1.5, 2990), rtol=1e-4, atol=1e-5)
print("fused CPU kernel:", build.kernel_status()["cpu"], "| matches the PyTorch path and the float64 reference")
PY

say "prepare -> pretrain -> score -> evaluate -> SALT student"
"$bin/python" - <<'PY'
import json, random
random.seed(0)
words = "the state of the union is strong and the congress shall make laws for the people of this nation".split()
with open("docs.jsonl", "w") as f:
    for _ in range(60):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(120))}) + "\n")
PY
model=(--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 --micro-batch-size 4
       --make-vocab-size-divisible-by 16 --eval-iters 1 --log-interval 1)
"$bin/salt-megatron" prepare --input docs.jsonl --output-prefix data/docs --vocab-size 300 --valid-fraction 0.1 \
  --workers 1
"$bin/salt-megatron" pretrain --data-path data/docs "${model[@]}" --train-iters 3 --save ckpt/slm
"$bin/salt-megatron" score --load ckpt/slm --data-path data/docs --no-progress
"$bin/salt-megatron" evaluate --load ckpt/slm --data-path data/docs --eval-iters 2
"$bin/salt-megatron" pretrain --data-path data/docs "${model[@]}" --hidden-size 64 --train-iters 2 \
  --teacher-load ckpt/slm --kd-steps 1 --kd-data-selection top --kd-select-fraction 0.5
say "passed"
