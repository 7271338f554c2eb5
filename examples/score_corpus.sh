#!/usr/bin/env bash
# score_corpus.sh: the trained teacher (SLM) scores every training window of a dataset for SALT_DS
# (`salt-megatron score`, under torchrun; data parallel over all processes, TP-aware, resumable).
#
# Writes the sidecar next to the dataset: DATA_PATH_train.salt_scores.json and .salt_scores.{samples,documents}.npy
# (for SUBSET=valid: DATA_PATH_valid.salt_scores.*; for a blend, one sidecar beside each of its datasets).
# Then train the student with KD_DATA_SELECTION=top (or band):
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
#   DATA_PATH       dataset prefix from prepare_data.sh, or a blend "0.3 A 0.7 B"
#                                                                       [required; smoke: $SALT_WORKDIR/data/sotu_smoke]
#   TEACHER         the teacher's checkpoint directory                                    [$SALT_WORKDIR/teacher]
#   SUBSET          train or valid                                                                       [train]
#   SPLIT           Megatron-LM's --split (e.g. 969,30,1): score the train part of each dataset as given        []
#   SEQ_LENGTH      window length: the student's --seq-length                       [the teacher's; smoke: 32]
#   SEED            GPTDataset shuffle seed: the student's --seed                                          [1234]
#   TP              tensor model-parallel size for the teacher                                               [1]
#   MICRO_BATCH     windows per forward pass                                                      [8; smoke: 4]
#   SCORE_TOPK      k of the top-k filter (the paper: 10)                                                   [10]
#   DIST_BACKEND    nccl or gloo                                            [nccl with CUDA, else gloo; smoke: gloo]
#   EXTRA_ARGS      more `score` flags, split on whitespace (e.g. "--score-chunk-windows 512")                  []
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
salt_init
salt_launch_defaults torchrun

smoke_args=()
if [[ "$SMOKE" == 1 ]]; then
  SEQ_LENGTH="${SEQ_LENGTH:-32}" MICRO_BATCH="${MICRO_BATCH:-4}" DIST_BACKEND="${DIST_BACKEND:-gloo}"
  smoke_args=(--no-progress --score-chunk-windows 64)
  salt_smoke_dataset
  salt_smoke_teacher ""  # the teacher trains with its own smoke TP
fi
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by prepare_data.sh (or SALT_SMOKE=1)}"
TEACHER="${TEACHER:-$WORKDIR/teacher}"

args=(--load "$TEACHER" ${smoke_args[@]+"${smoke_args[@]}"})
salt_data_args
salt_flag --subset "${SUBSET:-}"
salt_flag --seq-length "${SEQ_LENGTH:-}"
salt_flag --seed "${SEED:-}"
salt_flag --tensor-model-parallel-size "${TP:-}"
salt_flag --micro-batch-size "${MICRO_BATCH:-}"
salt_flag --score-topk "${SCORE_TOPK:-}"
salt_flag --distributed-backend "${DIST_BACKEND:-}"
salt_extra_args
salt_torchrun score "${args[@]}"
