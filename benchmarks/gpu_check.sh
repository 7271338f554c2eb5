#!/usr/bin/env bash
# The GPU check of the fused KL kernel, in one script for a GPU machine (no internet, no megatron-core needed):
#   1. environment (GPU, driver, nvcc, torch),
#   2. build: `python setup.py build_ext --inplace` (CPU + CUDA extensions; salt_megatron.kd.build falls back to a
#      JIT build of csrc/ if this fails),
#   3. the kernel tests: tests/test_kd_kernels.py (each test on cpu and cuda), test_kd_build.py (nvcc -c for
#      sm_80/sm_90), test_kd_tensor_parallel.py,
#   4. benchmarks/gpu_kd_loss.py (correctness check + N=8k, V=32k/128k bf16 timings vs naive and the HBM bound, and
#      salt_loss with CE from the KD pass vs CE apart vs naive).
# Usage, from anywhere:  bash benchmarks/gpu_check.sh        (PYTHON=... to pick the interpreter)
# Finishes in about 3-4 minutes on an H100/H200; every step prints its own output and the summary comes last.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-8}"
PY="${PYTHON:-python3}"
start=$(date +%s)
status=()

echo "== 1. environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
command -v nvcc && nvcc --version | tail -2
"$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "| capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
try:
    import megatron.core  # noqa: F401
    print("megatron-core: installed")
except ImportError:
    print("megatron-core: not installed (not needed here)")
EOF

echo; echo "== 2. build the extensions in place (setup.py build_ext --inplace)"
t0=$(date +%s)
if timeout 240 "$PY" setup.py -q build_ext --inplace > /tmp/salt_build.log 2>&1; then
  status+=("build_ext: ok ($(( $(date +%s) - t0 )) s)")
else
  status+=("build_ext: FAILED, see the log above (the JIT fallback is tried next)")
fi
grep -v -E "^(copying|running|creating)" /tmp/salt_build.log | tail -25
ls -la salt_megatron/_kl_*.so 2>/dev/null
"$PY" - <<'EOF'
import time
t0 = time.time()
from salt_megatron.kd import build
for kind, how in build.kernel_status().items():
    print(f"{kind}: {how}")
print(f"cuda_kernel_available={build.cuda_kernel_available()}  ({time.time() - t0:.1f} s)")
EOF

KERNEL_TESTS=(tests/test_kd_kernels.py tests/test_kd_build.py tests/test_kd_tensor_parallel.py)
echo; echo "== 3. ${KERNEL_TESTS[*]}"
t0=$(date +%s)
# the CUDA tests first (a crash elsewhere must not hide them), then the rest, verbose so a crash names its test
if timeout 100 "$PY" -m pytest -q -rs -p no:cacheprovider "${KERNEL_TESTS[@]}" -k cuda 2>&1 | tail -30 && \
   timeout 110 "$PY" -m pytest -v -rs -p no:cacheprovider "${KERNEL_TESTS[@]}" -k "not cuda" 2>&1 | \
   grep -v PASSED | tail -30; then
  status+=("tests: passed ($(( $(date +%s) - t0 )) s)")
else
  status+=("tests: FAILED")
fi

echo; echo "== 4. benchmarks/gpu_kd_loss.py"
if timeout 150 "$PY" benchmarks/gpu_kd_loss.py; then
  status+=("benchmark + correctness check: ok")
else
  status+=("benchmark + correctness check: FAILED")
fi

echo; echo "== summary ($(( $(date +%s) - start )) s)"
printf '%s\n' "${status[@]}"
