#!/usr/bin/env bash
# Usage: launch/quickstart.sh [key.sub=value ...]
# Pretrain -> finetune -> evaluate a tiny random LLaMA on 2 CPU ranks, then print the metrics
# beside popularity and EASE. Uses the real Beauty mini split when ../shared is present,
# otherwise a generated synthetic dataset (said so below).
set -euo pipefail
cd "$(dirname "$0")/.."
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
# A real Llama-2 tokenizer when TOKENIZERS has one, else a BPE trained on the data's own text.
[ -f runs/tiny-llama/config.json ] || cllm4rec make-tiny-model --output runs/tiny-llama --data "$DATA" \
  --tokenizers-dir "$TOKENIZERS"

ARGS=(model.base_dir=runs/tiny-llama data.shards="$SHARDS" "$@")
launch/pretrain.sh configs/quickstart.yaml "${ARGS[@]}"
launch/finetune.sh configs/quickstart.yaml "${ARGS[@]}"
launch/evaluate.sh configs/quickstart.yaml "${ARGS[@]}"
echo "metrics: runs/quickstart/metrics.json   recommendations: runs/quickstart/recommendations.jsonl"
