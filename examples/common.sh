# shellcheck shell=bash
# common.sh: the pieces the launchers in examples/ share.  It is sourced, never run: it only defines functions, and
# a launcher calls the ones it needs after `set -euo pipefail`, with HERE set to this directory:
#
#   HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
#   # shellcheck source=common.sh
#   source "$HERE/common.sh"
#
# The variables these functions read are listed, with their defaults, in the header of every launcher that calls
# them; that header is the one to read (and to keep up to date).
#
#   salt_init                 PYTHON, SMOKE (SALT_SMOKE) and WORKDIR (SALT_WORKDIR) with their defaults
#   salt_launch_defaults K    the rendezvous of a launcher of kind K: torchrun or deepspeed
#   salt_smoke_model_args H N no CONFIG: model_args = a tiny model (2 layers, hidden size H, N heads)
#   salt_smoke_dataset        smoke mode, DATA_PATH not set: the tiny dataset (made by prepare_data.sh once)
#   salt_smoke_teacher TP ... smoke mode, TEACHER not set: the tiny teacher (trained by train_teacher.sh once)
#   salt_require_teacher      exit 2 unless the TEACHER checkpoint exists
#   salt_flag FLAG VALUE      args += (FLAG VALUE) when VALUE is not empty
#   salt_extra_args           args += EXTRA_ARGS, split on whitespace (last: it wins over everything before)
#   salt_pretrain_args OPT... args += the `pretrain` flags read from the environment (OPT: --kd, --pp)
#   salt_exec CMD...          print the command (+ ...) to stderr, then exec it
#   salt_check WORLD SUB ARGS... `salt_megatron.cli SUB --check-only ARGS` in one process: a bad flag or input file
#                             ends the launcher with the command's one-line error before any rank starts
#   salt_torchrun SUB ARGS... `salt_megatron.cli SUB ARGS...` under torchrun, one torchrun per node; SIGTERM and
#                             SIGUSR1 are passed to its workers (checkpoint at the next step, exit 0)
#   salt_wait PID             wait for a background process through trapped signals; returns its exit status

# PYTHON [python3], SMOKE (from SALT_SMOKE) [0] and WORKDIR (from SALT_WORKDIR) [$PWD/runs; smoke: $PWD/runs/smoke].
salt_init() {
  PYTHON="${PYTHON:-python3}"
  SMOKE="${SALT_SMOKE:-0}"
  if [[ "$SMOKE" == 1 ]]; then
    WORKDIR="${SALT_WORKDIR:-$PWD/runs/smoke}"
  else
    WORKDIR="${SALT_WORKDIR:-$PWD/runs}"
  fi
}

# A TCP port that is free on this machine now (the smoke runs' rendezvous).
salt_free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# salt_launch_defaults torchrun|deepspeed: defaults of the rendezvous variables.
#   both:      GPUS_PER_NODE [8; smoke: 2], MASTER_PORT [29500; smoke: a free port]
#   torchrun:  NNODES [$SLURM_NNODES or 1], NODE_RANK [$SLURM_NODEID or 0], MASTER_ADDR [127.0.0.1]
#   deepspeed: NNODES [1] (nodes of the HOSTFILE), HOSTFILE [none]; MASTER_ADDR is left to the launcher when unset
salt_launch_defaults() {
  case "$1" in
    torchrun)
      NNODES="${NNODES:-${SLURM_NNODES:-1}}"
      NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
      MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
      ;;
    deepspeed)
      NNODES="${NNODES:-1}"
      HOSTFILE="${HOSTFILE:-}"
      ;;
    *)
      echo "salt_launch_defaults: unknown launcher kind '$1' (torchrun or deepspeed)" >&2
      return 2
      ;;
  esac
  if [[ "$SMOKE" == 1 ]]; then
    GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
    MASTER_PORT="${MASTER_PORT:-$(salt_free_port)}"
  else
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
    MASTER_PORT="${MASTER_PORT:-29500}"
  fi
}

# salt_smoke_model_args HIDDEN HEADS: when no CONFIG is given, model_args = the smoke run's tiny model.  The teacher's
# padded vocabulary must equal the student's: every launcher uses the same --make-vocab-size-divisible-by (and TP).
salt_smoke_model_args() {
  if [[ -z "${CONFIG:-}" ]]; then
    model_args=(--num-layers 2 --hidden-size "$1" --num-attention-heads "$2" --make-vocab-size-divisible-by 16
                --eval-iters 1 --log-interval 1)
  fi
}

# Smoke mode, DATA_PATH not set: DATA_PATH=$WORKDIR/data/sotu_smoke, made by prepare_data.sh unless already there.
salt_smoke_dataset() {
  if [[ -z "${DATA_PATH:-}" ]]; then
    DATA_PATH="$WORKDIR/data/sotu_smoke"
    if [[ ! -f "${DATA_PATH}_valid.idx" ]]; then
      SALT_WORKDIR="$WORKDIR" OUTPUT_PREFIX="$DATA_PATH" INPUT="" VALID_INPUT="" TOKENIZER_MODEL="" EXTRA_ARGS="" \
        bash "$HERE/prepare_data.sh"
    fi
  fi
}

# salt_smoke_teacher TP [VAR=VALUE...]: smoke mode, TEACHER not set: TEACHER=$WORKDIR/teacher, trained by
# train_teacher.sh on DATA_PATH unless already there, with tensor model-parallel size TP ("": the teacher's smoke
# default; a student passes its own, the two must match).  The caller's settings must not leak into the teacher's
# run: everything else train_teacher.sh reads is reset (but DATA_PATH and SEQ_LENGTH, which are the caller's), then
# the VAR=VALUE arguments are applied on top.
salt_smoke_teacher() {
  local teacher_tp="$1"
  shift
  if [[ -z "${TEACHER:-}" ]]; then
    TEACHER="$WORKDIR/teacher"
    if [[ ! -f "$TEACHER/latest_checkpointed_iteration.txt" ]]; then
      env SALT_WORKDIR="$WORKDIR" DATA_PATH="$DATA_PATH" SAVE="$TEACHER" CONFIG="" TP="$teacher_tp" PP="" \
        TRAIN_ITERS="" MICRO_BATCH="" GLOBAL_BATCH="" SEQ_LENGTH="$SEQ_LENGTH" LR="" MIN_LR="" SAVE_INTERVAL="" \
        EXTRA_ARGS="" MASTER_PORT="" "$@" bash "$HERE/train_teacher.sh"
    fi
  fi
}

# Exit 2 unless the teacher checkpoint TEACHER exists.
salt_require_teacher() {
  if [[ ! -e "$TEACHER" ]]; then
    echo "${0##*/}: no teacher checkpoint at TEACHER=$TEACHER: train one with examples/train_teacher.sh" >&2
    exit 2
  fi
}

# salt_flag FLAG VALUE: args += (FLAG VALUE), unless VALUE is empty (then the flag keeps its CONFIG/built-in default).
salt_flag() {
  if [[ -n "${2:-}" ]]; then
    args+=("$1" "$2")
  fi
}

# args += --data-path DATA_PATH, split on whitespace as Megatron-LM's launchers pass it (a prefix, or a blend such as
# "0.3 A 0.7 B"), and --split SPLIT when set.
salt_data_args() {
  local -a words
  read -r -a words <<< "$DATA_PATH"
  args+=(--data-path "${words[@]}")
  salt_flag --split "${SPLIT:-}"
}

# args += EXTRA_ARGS, split on whitespace; called last, so that these flags win over everything before them.
salt_extra_args() {
  local extra
  read -r -a extra <<< "${EXTRA_ARGS:-}"
  args+=(${extra[@]+"${extra[@]}"})
}

# salt_pretrain_args OPTION...: args += the `pretrain` flags read from the environment, EXTRA_ARGS last: CONFIG,
# model_args, DATA_PATH, SAVE (also as --load), TP, TRAIN_ITERS, MICRO_BATCH, GLOBAL_BATCH, SEQ_LENGTH, LR, MIN_LR,
# SAVE_INTERVAL, DIST_BACKEND, EXTRA_ARGS, and with
#   --kd  the student's: TEACHER, KD_STEPS (round(0.17 x TRAIN_ITERS), the paper's n_KD, when only TRAIN_ITERS is
#         set), KD_WEIGHT, KD_TEMPERATURE, KD_TRANSITION, KD_DATA_SELECTION, KD_SELECT_FRACTION
#   --pp  PP (not with DeepSpeed, which runs without pipeline parallelism)
salt_pretrain_args() {
  local kd=0 pp=0 opt kd_steps
  for opt in "$@"; do
    case "$opt" in
      --kd) kd=1 ;;
      --pp) pp=1 ;;
      *) echo "salt_pretrain_args: unknown option '$opt'" >&2; return 2 ;;
    esac
  done
  salt_flag --config "$CONFIG"
  args+=(${model_args[@]+"${model_args[@]}"})
  salt_data_args
  salt_flag --save "$SAVE"
  salt_flag --load "$SAVE"
  if [[ "$kd" == 1 ]]; then
    kd_steps="${KD_STEPS:-}"
    if [[ -z "$kd_steps" && -n "${TRAIN_ITERS:-}" ]]; then
      kd_steps=$(( (17 * TRAIN_ITERS + 50) / 100 ))  # the paper's n_KD: about 17% of the student's steps
    fi
    salt_flag --teacher-load "$TEACHER"
    salt_flag --kd-steps "$kd_steps"
    salt_flag --kd-weight "${KD_WEIGHT:-}"
    salt_flag --kd-temperature "${KD_TEMPERATURE:-}"
    salt_flag --kd-transition "${KD_TRANSITION:-}"
    salt_flag --kd-data-selection "${KD_DATA_SELECTION:-}"
    salt_flag --kd-select-fraction "${KD_SELECT_FRACTION:-}"
  fi
  salt_flag --tensor-model-parallel-size "${TP:-}"
  if [[ "$pp" == 1 ]]; then
    salt_flag --pipeline-model-parallel-size "${PP:-}"
  fi
  salt_flag --train-iters "${TRAIN_ITERS:-}"
  salt_flag --micro-batch-size "${MICRO_BATCH:-}"
  salt_flag --global-batch-size "${GLOBAL_BATCH:-}"
  salt_flag --seq-length "${SEQ_LENGTH:-}"
  salt_flag --lr "${LR:-}"
  salt_flag --min-lr "${MIN_LR:-}"
  salt_flag --save-interval "${SAVE_INTERVAL:-}"
  salt_flag --distributed-backend "${DIST_BACKEND:-}"
  salt_extra_args
}

# salt_exec CMD...: print the command to stderr (+ CMD...), then replace this shell with it.
salt_exec() {
  echo "+ $*" >&2
  exec "$@"
}

# salt_check WORLD_SIZE SUBCOMMAND ARGS...: check the flags, input files and checkpoints of the run in one process, as
# the run's WORLD_SIZE ranks would.  A refusal is one line on stderr and exit code 2, with no launcher output around
# it; nothing is started.
salt_check() {
  local world=$1
  shift
  local sub=$1
  shift
  WORLD_SIZE="$world" "$PYTHON" -m salt_megatron.cli "$sub" --check-only "$@" > /dev/null
}

# salt_torchrun SUBCOMMAND ARGS...: `salt_megatron.cli SUBCOMMAND ARGS...` under torchrun: GPUS_PER_NODE processes on
# this node (NODE_RANK of NNODES), rendezvous at MASTER_ADDR:MASTER_PORT, after salt_check.  Does not return.
salt_torchrun() {
  salt_check "$((NNODES * GPUS_PER_NODE))" "$@" || exit $?
  local cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK"
             --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
             -m salt_megatron.cli "$@")
  echo "+ ${cmd[*]}" >&2
  # Not exec'd: SIGTERM/SIGUSR1 (a scheduler's warning before the time limit, a preemption) are passed to the
  # workers, which checkpoint at the next step and exit 0.  Sent to torchrun itself, SIGUSR1 would kill it and
  # SIGTERM would have it kill the workers 30 s later, mid-save.
  "${cmd[@]}" &
  SALT_CHILD=$!
  trap 'salt_forward_to_workers TERM' TERM
  trap 'salt_forward_to_workers USR1' USR1
  local rc=0
  salt_wait "$SALT_CHILD" || rc=$?
  exit "$rc"
}

# salt_forward_to_workers SIG: send SIG to the processes torchrun ($SALT_CHILD) started.
salt_forward_to_workers() {
  echo "salt: SIG$1 received: passed to the workers (they checkpoint at the next step and exit 0)" >&2
  pkill "-$1" -P "$SALT_CHILD" || true
}

# salt_wait PID: wait for the background process PID through any trapped signals; returns its exit status.
salt_wait() {
  local rc=0
  while true; do
    wait "$1" && rc=0 || rc=$?
    kill -0 "$1" 2>/dev/null || return "$rc"  # `wait` also returns when a trapped signal arrives
  done
}
