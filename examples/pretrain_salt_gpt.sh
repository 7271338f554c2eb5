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
#   DATA_PATH       dataset prefix from prepare_data.sh, or a blend "0.3 A 0.7 B"
#                                                                       [required; smoke: $SALT_WORKDIR/data/sotu_smoke]
#   SPLIT           Megatron-LM's --split (e.g. 969,30,1) of the DATA_PATH datasets as given    [prepare's files]
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
# shellcheck source=common.sh
source "$HERE/common.sh"
salt_init
salt_launch_defaults torchrun

model_args=()
if [[ "$SMOKE" == 1 ]]; then
  CONFIG="${CONFIG:-}"
  TP="${TP:-1}" PP="${PP:-1}" TRAIN_ITERS="${TRAIN_ITERS:-6}" MICRO_BATCH="${MICRO_BATCH:-2}"
  SEQ_LENGTH="${SEQ_LENGTH:-32}" LR="${LR:-3e-3}" MIN_LR="${MIN_LR:-3e-4}" DIST_BACKEND="${DIST_BACKEND:-gloo}"
  salt_smoke_model_args 64 4
  salt_smoke_dataset
  salt_smoke_teacher "$TP"
else
  CONFIG="${CONFIG:-$HERE/configs/paper_2p8b_student.yaml}"
fi
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by prepare_data.sh (or SALT_SMOKE=1)}"
TEACHER="${TEACHER:-$WORKDIR/teacher}"
salt_require_teacher
SAVE="${SAVE:-$WORKDIR/student}"

args=()
salt_pretrain_args --kd --pp
salt_torchrun pretrain "${args[@]}"
