#!/usr/bin/env bash
# The trainer on a GPU with megatron-core 0.19 (Python 3.12): teacher → score → SALT_DS student, bf16, nccl, the
# fused CUDA KL kernel through --kd-impl auto; then the step-overhead benchmark.  Needs:
#   .whl/megatron_core-0.19.*.whl   (no registry on the GPU machine)
#   .gpu_data/sotu{.model,_train.*,_valid.*}   (a prepared dataset: `salt-megatron prepare` here)
# Usage: bash benchmarks/gpu_e2e.sh            (run benchmarks/gpu_check.sh first: it builds the CUDA kernel)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried megatron-core wheel"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
W=/tmp/salt_e2e; rm -rf "$W"; mkdir -p "$W"
python3 -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())"
status=()
run() {  # name, command...
  local name=$1; shift; local t0; t0=$(date +%s)
  echo; echo "== $name"; echo "\$ $*"
  if timeout 150 "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^\s*$" | tail -25; then
    status+=("$name: ok ($(( $(date +%s) - t0 )) s)")
  else
    status+=("$name: FAILED")
  fi
}
MODEL=(--seq-length 256 --micro-batch-size 32 --log-interval 10 --eval-iters 2 --bf16)
run "teacher (2x256, 40 steps)" python3 -m salt_megatron.cli pretrain --data-path .gpu_data/sotu --num-layers 2 \
  --hidden-size 256 --num-attention-heads 4 "${MODEL[@]}" --train-iters 40 --lr 3e-3 --save "$W/teacher"
run "score (train split)" python3 -m salt_megatron.cli score --load "$W/teacher" --data-path .gpu_data/sotu \
  --seq-length 256 --micro-batch-size 64 --no-progress
run "SALT_DS student (6x512, 30 steps, KD 10)" python3 -m salt_megatron.cli pretrain --data-path .gpu_data/sotu \
  --num-layers 6 --hidden-size 512 --num-attention-heads 8 "${MODEL[@]}" --train-iters 30 --lr 1e-3 \
  --teacher-load "$W/teacher" --kd-steps 10 --kd-weight 0.5 --kd-data-selection top --kd-select-fraction 0.3 \
  --save "$W/student" --save-interval 15
run "evaluate the student" python3 -m salt_megatron.cli evaluate --load "$W/student" --data-path .gpu_data/sotu --eval-iters 4
mkdir -p "$W/bench" && cp .gpu_data/* "$W/bench/"
run "step overhead (GPU, tiny models)" python3 benchmarks/step_overhead.py --workdir "$W/bench" --steps 20 --repeats 2
echo; echo "== summary"; printf '%s\n' "${status[@]}"
