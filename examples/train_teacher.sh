#!/usr/bin/env bash
# train_teacher.sh: train the small LM (SLM, SALT's teacher) with plain next-token pretraining, under torchrun.
#
# One torchrun per node: run this on every node with the same MASTER_ADDR/MASTER_PORT and NODE_RANK = 0..NNODES-1.
# Model and optimiser settings come from CONFIG (a YAML of `pretrain` flag defaults); the variables below override
# it when set, and EXTRA_ARGS comes last (it wins over both).  SAVE is also passed as --load, so a rerun (or a
# requeued job) resumes from the latest complete checkpoint.
#
# Environment (default in brackets; "smoke:" is the default with SALT_SMOKE=1):
#   PYTHON          interpreter with salt_megatron installed                                          [python3]
#   SALT_SMOKE      1: a tiny CPU run (gloo, 2 processes, 2 layers x 32, 8 steps); prepares a tiny dataset with
#                   prepare_data.sh when DATA_PATH is not set                                               [0]
#   SALT_WORKDIR    base directory of the default paths                              [./runs; smoke: ./runs/smoke]
#   NNODES          number of nodes                                                       [$SLURM_NNODES or 1]
#   NODE_RANK       this node's rank                                                      [$SLURM_NODEID or 0]
#   MASTER_ADDR     address of the node with rank 0                                                [127.0.0.1]
#   MASTER_PORT     its rendezvous port                                           [29500; smoke: a free port]
#   GPUS_PER_NODE   processes per node (one per GPU)                                           [8; smoke: 2]
#   DATA_PATH       dataset prefix from prepare_data.sh, or a blend "0.3 A 0.7 B"
#                                                                       [required; smoke: $SALT_WORKDIR/data/sotu_smoke]
#   SPLIT           Megatron-LM's --split (e.g. 969,30,1) of the DATA_PATH datasets as given    [prepare's files]
#   SAVE            checkpoint directory (written, and resumed from)                         [$SALT_WORKDIR/teacher]
#   CONFIG          YAML of flag defaults         [examples/configs/paper_1p5b_teacher.yaml; smoke: none (tiny flags)]
#   TP, PP          tensor / pipeline model-parallel sizes (the student must use the same TP)
#                                                                                  [from CONFIG; smoke: 1, 1]
#   TRAIN_ITERS     steps                                                                [from CONFIG; smoke: 8]
#   MICRO_BATCH     micro-batch size per process                                          [from CONFIG; smoke: 4]
#   GLOBAL_BATCH    sequences per step                                         [from CONFIG; smoke: micro x DP]
#   SEQ_LENGTH      tokens per sequence                                                  [from CONFIG; smoke: 32]
#   LR, MIN_LR      peak / final learning rate                                   [from CONFIG; smoke: 1e-2, 1e-3]
#   SAVE_INTERVAL   steps between checkpoints                                       [from CONFIG; else at the end]
#   DIST_BACKEND    nccl or gloo                                            [nccl with CUDA, else gloo; smoke: gloo]
#   EXTRA_ARGS      more `pretrain` flags, split on whitespace                                                 []
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
salt_init
salt_launch_defaults torchrun

model_args=()
if [[ "$SMOKE" == 1 ]]; then
  CONFIG="${CONFIG:-}"
  TP="${TP:-1}" PP="${PP:-1}" TRAIN_ITERS="${TRAIN_ITERS:-8}" MICRO_BATCH="${MICRO_BATCH:-4}"
  SEQ_LENGTH="${SEQ_LENGTH:-32}" LR="${LR:-1e-2}" MIN_LR="${MIN_LR:-1e-3}" DIST_BACKEND="${DIST_BACKEND:-gloo}"
  salt_smoke_model_args 32 2
  salt_smoke_dataset
else
  CONFIG="${CONFIG:-$HERE/configs/paper_1p5b_teacher.yaml}"
fi
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by prepare_data.sh (or SALT_SMOKE=1)}"
SAVE="${SAVE:-$WORKDIR/teacher}"

args=()
salt_pretrain_args --pp
salt_torchrun pretrain "${args[@]}"
