#!/usr/bin/env bash
# One prepared script for a lent GPU (about 8 minutes on an H100/H200): the fused kernel's check, then the step at a
# realistic size (benchmarks/gpu_scale.py: a ~350M student with a ~125M teacher, seq 2048, bf16, TE where installed,
# the distributed optimizer; tokens/s, MFU, the KD-phase step against its FLOP bound, peak memory with and without
# the teacher and --kd-fused-linear).  Logs go to docs/gpu/gpu_check.log and docs/gpu/gpu_scale.log (commit them).
# Needs, carried in the working tree: .whl/megatron_core-*.whl (no package index on the GPU machine).
# Usage: bash benchmarks/gpu_scale.sh          (TINY=1: a CPU dry run of gpu_scale.py at tiny sizes, nothing else)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
mkdir -p docs/gpu
if [ "${TINY:-0}" = 1 ]; then
  exec "${PYTHON:-python3}" benchmarks/gpu_scale.py --tiny
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried megatron-core wheel"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
start=$(date +%s)
timeout 300 bash benchmarks/gpu_check.sh 2>&1 | tee docs/gpu/gpu_check.log | tail -30
echo "== gpu_check: $(( $(date +%s) - start )) s"
timeout 360 python3 benchmarks/gpu_scale.py --workdir /tmp/salt_scale 2>&1 | tee docs/gpu/gpu_scale.log
echo "== total: $(( $(date +%s) - start )) s"
