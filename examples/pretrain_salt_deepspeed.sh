#!/usr/bin/env bash
# pretrain_salt_deepspeed.sh: the SALT student trained by a DeepSpeed engine (ZeRO-1/2), started by the `deepspeed`
# launcher: `pretrain --deepspeed --deepspeed-config DS_CONFIG` with the same flags as pretrain_salt_gpt.sh.
#
# Single node: the launcher starts GPUS_PER_NODE processes here.  Several nodes: give a HOSTFILE (lines
# "host slots=N"); the launcher, run on one node, starts the others over pdsh/ssh (LAUNCHER=openmpi|slurm|...
# picks another backend).  The DeepSpeed JSON decides the ZeRO stage and the precision (bf16 in
# examples/ds_config_zero{1,2}.json); batch sizes come from the flags.  The launcher is run as
# `$PYTHON -m deepspeed.launcher.runner` (the `deepspeed` command of that interpreter) with --no_local_rank: each
# process reads LOCAL_RANK from its environment.  SAVE is also passed as --load, so a rerun resumes.
#
# Environment (default in brackets; "smoke:" is the default with SALT_SMOKE=1):
#   PYTHON          interpreter with salt_megatron and deepspeed installed                            [python3]
#   SALT_SMOKE      1: a tiny CPU run (gloo, 2 processes, ZeRO-1 in fp32 from a JSON written to a temporary
#                   directory); prepares a tiny dataset and trains a tiny teacher when DATA_PATH / TEACHER
#                   are not set.  The first DeepSpeed start on a machine JIT-builds a CPU comm op (about a minute,
#                   cached in ~/.cache/torch_extensions)                                                    [0]
#   SALT_WORKDIR    base directory of the default paths                              [./runs; smoke: ./runs/smoke]
#   DS_CONFIG       DeepSpeed JSON                [examples/ds_config_zero1.json; smoke: a ZeRO-1 fp32 JSON in a tmp dir]
#   HOSTFILE        DeepSpeed hostfile for several nodes                                      [none: this node only]
#   LAUNCHER        multi-node backend of the deepspeed launcher (pdsh, openmpi, mvapich, slurm, ...)   [pdsh]
#   NNODES          nodes to use (of the HOSTFILE)                                                             [1]
#   GPUS_PER_NODE   processes per node                                                         [8; smoke: 2]
#   MASTER_ADDR     rendezvous host                                   [first host of HOSTFILE, else 127.0.0.1]
#   MASTER_PORT     rendezvous port                                               [29500; smoke: a free port]
#   DATA_PATH       dataset prefix from prepare_data.sh, or a blend "0.3 A 0.7 B"
#                                                                       [required; smoke: $SALT_WORKDIR/data/sotu_smoke]
#   SPLIT           Megatron-LM's --split (e.g. 969,30,1) of the DATA_PATH datasets as given    [prepare's files]
#   TEACHER         the teacher's checkpoint directory                                    [$SALT_WORKDIR/teacher]
#   SAVE            checkpoint directory (written, and resumed from)                    [$SALT_WORKDIR/student_ds]
#   CONFIG          YAML of flag defaults         [examples/configs/paper_2p8b_student.yaml; smoke: none (tiny flags)]
#   TP              tensor model-parallel size (DeepSpeed runs without pipeline parallelism) [from CONFIG; smoke: 1]
#   TRAIN_ITERS     student steps                                                        [from CONFIG; smoke: 6]
#   KD_STEPS        n_KD                            [round(0.17 x TRAIN_ITERS) when TRAIN_ITERS is set; else CONFIG]
#   KD_WEIGHT, KD_TEMPERATURE, KD_TRANSITION, KD_DATA_SELECTION, KD_SELECT_FRACTION    as in pretrain_salt_gpt.sh
#   MICRO_BATCH     micro-batch size per process                                          [from CONFIG; smoke: 2]
#   GLOBAL_BATCH    sequences per step                                         [from CONFIG; smoke: micro x DP]
#   SEQ_LENGTH      tokens per sequence                                                  [from CONFIG; smoke: 32]
#   LR, MIN_LR      peak / final learning rate                                   [from CONFIG; smoke: 3e-3, 3e-4]
#   SAVE_INTERVAL   steps between checkpoints                                       [from CONFIG; else at the end]
#   DIST_BACKEND    nccl or gloo                                            [nccl with CUDA, else gloo; smoke: gloo]
#   EXTRA_ARGS      more `pretrain` flags, split on whitespace                                                 []
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
salt_init
salt_launch_defaults deepspeed

model_args=()
if [[ "$SMOKE" == 1 ]]; then
  CONFIG="${CONFIG:-}"
  TP="${TP:-1}" TRAIN_ITERS="${TRAIN_ITERS:-6}" MICRO_BATCH="${MICRO_BATCH:-2}"
  SEQ_LENGTH="${SEQ_LENGTH:-32}" LR="${LR:-3e-3}" MIN_LR="${MIN_LR:-3e-4}" DIST_BACKEND="${DIST_BACKEND:-gloo}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torchrun does this itself; the deepspeed launcher does not
  salt_smoke_model_args 64 4
  if [[ -z "${DS_CONFIG:-}" ]]; then
    # DeepSpeed's bf16 on a CPU is not something to rely on: the smoke run is ZeRO-1 in fp32
    tmp_dir="$(mktemp -d)"
    trap 'rm -rf "$tmp_dir"' EXIT
    DS_CONFIG="$tmp_dir/ds_config_zero1_fp32.json"
    cat > "$DS_CONFIG" <<'EOF'
{
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "zero_optimization": {"stage": 1},
  "wall_clock_breakdown": false
}
EOF
  fi
  salt_smoke_dataset
  # NNODES here counts the HOSTFILE's nodes: the teacher's torchrun is this node alone
  salt_smoke_teacher "$TP" NNODES=1 NODE_RANK=0
else
  CONFIG="${CONFIG:-$HERE/configs/paper_2p8b_student.yaml}"
  DS_CONFIG="${DS_CONFIG:-$HERE/ds_config_zero1.json}"
fi
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by prepare_data.sh (or SALT_SMOKE=1)}"
TEACHER="${TEACHER:-$WORKDIR/teacher}"
salt_require_teacher
if [[ "$NNODES" -gt 1 && -z "$HOSTFILE" ]]; then
  echo "pretrain_salt_deepspeed.sh: NNODES=$NNODES needs a HOSTFILE (lines \"host slots=N\")" >&2
  exit 2
fi
SAVE="${SAVE:-$WORKDIR/student_ds}"

args=(--deepspeed --deepspeed-config "$DS_CONFIG")
salt_pretrain_args --kd

launcher=("$PYTHON" -m deepspeed.launcher.runner)
if [[ -n "$HOSTFILE" ]]; then
  launcher+=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}")
fi
launcher+=(--num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
if [[ -n "${MASTER_ADDR:-}" ]]; then
  launcher+=(--master_addr "$MASTER_ADDR")
fi
salt_check "$((NNODES * GPUS_PER_NODE))" pretrain "${args[@]}" || exit $?
cmd=("${launcher[@]}" --no_local_rank --module salt_megatron.cli pretrain "${args[@]}")
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"  # not exec: the EXIT trap removes the smoke run's temporary JSON
