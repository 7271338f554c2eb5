#!/usr/bin/env bash
# score_corpus.sh: the trained teacher (SLM) scores every training window of a dataset for SALT_DS
# (`salt-megatron score`, under torchrun; data parallel over all processes, TP-aware, resumable).
#
# Writes the sidecar next to the dataset: DATA_PATH_train.salt_scores.json and .salt_scores.{samples,documents}.npy
# (for SPLIT=valid: DATA_PATH_valid.salt_scores.*).  Then train the student with KD_DATA_SELECTION=top (or band):
# SEQ_LENGTH and SEED must be the student's, since the windows are the ones its GPTDataset builds.  A rerun after
# a crash continues from the last complete chunk.
#
# Environment (default in brackets; "smoke:" is the default with SALT_SMOKE=1):
#   PYTHON          interpreter with salt_megatron installed                                          [python3]
#   SALT_SMOKE      1: a tiny CPU run (gloo, 2 processes); prepares a tiny dataset (prepare_data.sh) when DATA_PATH
#                   is not set and trains a tiny teacher (train_teacher.sh) when TEACHER is not set          [0]
#   SALT_WORKDIR    base directory of the default paths                              [./runs; smoke: ./runs/smoke]
#   NNODES          number of nodes                                                       [$SLURM_NNODES or 1]
#   NODE_RANK       this node's rank                                                      [$SLURM_NODEID or 0]
#   MASTER_ADDR     address of the node with rank 0                                                [127.0.0.1]
#   MASTER_PORT     its rendezvous port                                           [29500; smoke: a free port]
#   GPUS_PER_NODE   processes per node (one per GPU)                                           [8; smoke: 2]
#   DATA_PATH       dataset prefix from prepare_data.sh                [required; smoke: $SALT_WORKDIR/data/sotu_smoke]
#   TEACHER         the teacher's checkpoint directory                                    [$SALT_WORKDIR/teacher]
#   SPLIT           train or valid                                                                       [train]
#   SEQ_LENGTH      window length: the student's --seq-length                       [the teacher's; smoke: 32]
#   SEED            GPTDataset shuffle seed: the student's --seed                                          [1234]
#   TP              tensor model-parallel size for the teacher                                               [1]
#   MICRO_BATCH     windows per forward pass                                                      [8; smoke: 4]
#   SCORE_TOPK      k of the top-k filter (the paper: 10)                                                   [10]
#   DIST_BACKEND    nccl or gloo                                            [nccl with CUDA, else gloo; smoke: gloo]
#   EXTRA_ARGS      more `score` flags, split on whitespace (e.g. "--score-chunk-windows 512")                  []
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
SMOKE="${SALT_SMOKE:-0}"
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
smoke_args=()
if [[ "$SMOKE" == 1 ]]; then
  WORKDIR="${SALT_WORKDIR:-$PWD/runs/smoke}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
  MASTER_PORT="${MASTER_PORT:-$(free_port)}"
  SEQ_LENGTH="${SEQ_LENGTH:-32}" MICRO_BATCH="${MICRO_BATCH:-4}" DIST_BACKEND="${DIST_BACKEND:-gloo}"
  smoke_args=(--no-progress --score-chunk-windows 64)
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
      SALT_WORKDIR="$WORKDIR" DATA_PATH="$DATA_PATH" SAVE="$TEACHER" CONFIG="" TP="" PP="" TRAIN_ITERS="" \
        MICRO_BATCH="" GLOBAL_BATCH="" SEQ_LENGTH="$SEQ_LENGTH" LR="" MIN_LR="" SAVE_INTERVAL="" EXTRA_ARGS="" \
        MASTER_PORT="" bash "$HERE/train_teacher.sh"
    fi
  fi
else
  WORKDIR="${SALT_WORKDIR:-$PWD/runs}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
  MASTER_PORT="${MASTER_PORT:-29500}"
fi
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by prepare_data.sh (or SALT_SMOKE=1)}"
TEACHER="${TEACHER:-$WORKDIR/teacher}"

args=(--load "$TEACHER" --data-path "$DATA_PATH" ${smoke_args[@]+"${smoke_args[@]}"})
flag() { if [[ -n "${2:-}" ]]; then args+=("$1" "$2"); fi; }
flag --split "${SPLIT:-}"
flag --seq-length "${SEQ_LENGTH:-}"
flag --seed "${SEED:-}"
flag --tensor-model-parallel-size "${TP:-}"
flag --micro-batch-size "${MICRO_BATCH:-}"
flag --score-topk "${SCORE_TOPK:-}"
flag --distributed-backend "${DIST_BACKEND:-}"
read -r -a extra <<< "${EXTRA_ARGS:-}"
args+=(${extra[@]+"${extra[@]}"})

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m salt_megatron.cli score "${args[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
