#!/usr/bin/env bash
# pretrain_salt_gpt.sh: train the SALT student under torchrun (Rawat et al. 2024, arXiv 2410.18779): knowledge
# distillation from a small, already trained teacher (train_teacher.sh) for the first KD_STEPS steps, then plain
# next-token training.  With KD_DATA_SELECTION=top|band (SALT_DS) the KD phase draws from the windows the teacher
# scored best (run score_corpus.sh first).
#
# One torchrun per node: run this on every node with the same MASTER_ADDR/MASTER_PORT and NODE_RANK = 0..NNODES-1
# (pretrain_salt_slurm.sbatch does that under SLURM).  Model and optimiser settings come from CONFIG (a YAML of
# `pretrain` flag defaults); the variables below override it when set, and EXTRA_ARGS comes last (it wins over
# both).  SAVE is also passed as --load, so a rerun (or a requeued job) resumes from the latest complete checkpoint.
#
# Environment (default in brackets; "smoke:" is the default with SALT_SMOKE=1):
#   PYTHON          interpreter with salt_megatron installed                                          [python3]
#   SALT_SMOKE      1: a tiny CPU run (gloo, 2 processes, 2 layers x 64, 6 steps); prepares a tiny dataset
#                   (prepare_data.sh) when DATA_PATH is not set and trains a tiny teacher (train_teacher.sh)
#                   when TEACHER is not set; stages already done are skipped                                [0]
#   SALT_WORKDIR    base directory of the default paths                              [./runs; smoke: ./runs/smoke]
#   NNODES          number of nodes                                                       [$SLURM_NNODES or 1]
#   NODE_RANK       this node's rank                                                      [$SLURM_NODEID or 0]
#   MASTER_ADDR     address of the node with rank 0                                                [127.0.0.1]
#   MASTER_PORT     its rendezvous port                                           [29500; smoke: a free port]
#   GPUS_PER_NODE   processes per node (one per GPU)                                           [8; smoke: 2]
#   DATA_PATH       dataset prefix from prepare_data.sh                [required; smoke: $SALT_WORKDIR/data/sotu_smoke]
#   TEACHER         the teacher's checkpoint directory                                    [$SALT_WORKDIR/teacher]
#   SAVE            checkpoint directory (written, and resumed from)                         [$SALT_WORKDIR/student]
#   CONFIG          YAML of flag defaults         [examples/configs/paper_2p8b_student.yaml; smoke: none (tiny flags)]
#   TP, PP          tensor / pipeline model-parallel sizes                                [from CONFIG; smoke: 1, 1]
#   TRAIN_ITERS     student steps                                                        [from CONFIG; smoke: 6]
#   KD_STEPS        n_KD, steps with distillation   [round(0.17 x TRAIN_ITERS) when TRAIN_ITERS is set; else CONFIG]
#   KD_WEIGHT       omega, weight of the KD term                                          [from CONFIG, else 0.5]
#   KD_TEMPERATURE  tau of the teacher's soft labels                                      [from CONFIG, else 1.0]
#   KD_TRANSITION   step, linear or cosine                                               [from CONFIG, else step]
#   KD_DATA_SELECTION   none, top or band (SALT_DS; needs the score sidecar)              [from CONFIG, else none]
#   KD_SELECT_FRACTION  share of the scored windows the KD phase draws from              [from CONFIG, else 0.2]
#   MICRO_BATCH     micro-batch size per process                                          [from CONFIG; smoke: 2]
#   GLOBAL_BATCH    sequences per step                                         [from CONFIG; smoke: micro x DP]
#   SEQ_LENGTH      tokens per sequence                                                  [from CONFIG; smoke: 32]
#   LR, MIN_LR      peak / final learning rate                                   [from CONFIG; smoke: 3e-3, 3e-4]
#   SAVE_INTERVAL   steps between checkpoints                                       [from CONFIG; else at the end]
#   DIST_BACKEND    nccl or gloo                                            [nccl with CUDA, else gloo; smoke: gloo]
#   EXTRA_ARGS      more `pretrain` flags, split on whitespace (e.g. "--metrics-file m.jsonl")                []
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
SMOKE="${SALT_SMOKE:-0}"
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
model_args=()
if [[ "$SMOKE" == 1 ]]; then
  WORKDIR="${SALT_WORKDIR:-$PWD/runs/smoke}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
  MASTER_PORT="${MASTER_PORT:-$(free_port)}"
  CONFIG="${CONFIG:-}"
  TP="${TP:-1}" PP="${PP:-1}" TRAIN_ITERS="${TRAIN_ITERS:-6}" MICRO_BATCH="${MICRO_BATCH:-2}"
  SEQ_LENGTH="${SEQ_LENGTH:-32}" LR="${LR:-3e-3}" MIN_LR="${MIN_LR:-3e-4}" DIST_BACKEND="${DIST_BACKEND:-gloo}"
  if [[ -z "$CONFIG" ]]; then
    # the teacher's padded vocabulary must equal the student's: same --make-vocab-size-divisible-by (and TP)
    model_args=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --make-vocab-size-divisible-by 16
                --eval-iters 1 --log-interval 1)
  fi
  if [[ -z "${DATA_PATH:-}" ]]; then
    DATA_PATH="$WORKDIR/data/sotu_smoke"
    if [[ ! -f "${DATA_PATH}_valid.idx" ]]; then
      SALT_WORKDIR="$WORKDIR" OUTPUT_PREFIX="$DATA_PATH" INPUT="" VALID_INPUT="" TOKENIZER_MODEL="" EXTRA_ARGS="" \
        bash "$HERE/prepare_data.sh"
    fi
  fi
  if [[ -z "${TEACHER:-}" ]]; then
    TEACHER="$WORKDIR/teacher"
    if [[ ! -f "$TEACHER/latest_checkpointed_iteration.txt" ]]; then
      # the student's settings must not leak into the teacher's run: reset everything train_teacher.sh reads
      SALT_WORKDIR="$WORKDIR" DATA_PATH="$DATA_PATH" SAVE="$TEACHER" CONFIG="" TP="$TP" PP="" TRAIN_ITERS="" \
        MICRO_BATCH="" GLOBAL_BATCH="" SEQ_LENGTH="$SEQ_LENGTH" LR="" MIN_LR="" SAVE_INTERVAL="" EXTRA_ARGS="" \
        MASTER_PORT="" bash "$HERE/train_teacher.sh"
    fi
  fi
else
  WORKDIR="${SALT_WORKDIR:-$PWD/runs}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
  MASTER_PORT="${MASTER_PORT:-29500}"
  CONFIG="${CONFIG:-$HERE/configs/paper_2p8b_student.yaml}"
fi
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by prepare_data.sh (or SALT_SMOKE=1)}"
TEACHER="${TEACHER:-$WORKDIR/teacher}"
if [[ ! -e "$TEACHER" ]]; then
  echo "pretrain_salt_gpt.sh: no teacher checkpoint at TEACHER=$TEACHER: train one with examples/train_teacher.sh" >&2
  exit 2
fi
SAVE="${SAVE:-$WORKDIR/student}"
KD_STEPS="${KD_STEPS:-}"
if [[ -z "$KD_STEPS" && -n "${TRAIN_ITERS:-}" ]]; then
  KD_STEPS=$(( (17 * TRAIN_ITERS + 50) / 100 ))  # the paper's n_KD: about 17% of the student's steps
fi

args=()
flag() { if [[ -n "${2:-}" ]]; then args+=("$1" "$2"); fi; }
flag --config "$CONFIG"
args+=(${model_args[@]+"${model_args[@]}"})
flag --data-path "$DATA_PATH"
flag --save "$SAVE"
flag --load "$SAVE"
flag --teacher-load "$TEACHER"
flag --kd-steps "$KD_STEPS"
flag --kd-weight "${KD_WEIGHT:-}"
flag --kd-temperature "${KD_TEMPERATURE:-}"
flag --kd-transition "${KD_TRANSITION:-}"
flag --kd-data-selection "${KD_DATA_SELECTION:-}"
flag --kd-select-fraction "${KD_SELECT_FRACTION:-}"
flag --tensor-model-parallel-size "${TP:-}"
flag --pipeline-model-parallel-size "${PP:-}"
flag --train-iters "${TRAIN_ITERS:-}"
flag --micro-batch-size "${MICRO_BATCH:-}"
flag --global-batch-size "${GLOBAL_BATCH:-}"
flag --seq-length "${SEQ_LENGTH:-}"
flag --lr "${LR:-}"
flag --min-lr "${MIN_LR:-}"
flag --save-interval "${SAVE_INTERVAL:-}"
flag --distributed-backend "${DIST_BACKEND:-}"
read -r -a extra <<< "${EXTRA_ARGS:-}"
args+=(${extra[@]+"${extra[@]}"})

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m salt_megatron.cli pretrain "${args[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
