#!/usr/bin/env bash
# Usage: bench/beauty_full.sh [key.sub=value ...]
# A small CLLM4Rec (random 2-layer LLaMA, Llama-2 tokenizer) on the paper's full Beauty split,
# on 2 CPU ranks: pretrain -> finetune (seed 0, then each of ENSEMBLE_SEEDS) -> evaluate. Prints
# test Recall@20 / Recall@40 / NDCG@100 of the seed-0 model, the ensemble and its fusion with EASE
# beside popularity and EASE (lambda chosen on validation), computed in the same run, then the
# wall time and peak RSS per rank of every stage. Needs the shared data folder beside the repo.
#
# Another data set runs through the same configuration unchanged (its run folder is
# runs/bench-<folder name> unless OUT is set):
#   BEAUTY=DIR   a folder in the same layout (full/, and derived/ with item texts if it has them);
#   SHARDS=DIR   a shard folder made beforehand, e.g. by `cllm4rec prepare` from Amazon review files.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENIZERS=${TOKENIZERS:-../shared/tokenizers}
if [ -n "${SHARDS:-}" ]; then
  if [ ! -f "$SHARDS/index.json" ]; then
    echo "bench/beauty_full.sh: SHARDS=$SHARDS has no index.json (make it with cllm4rec prepare or build-shards)" >&2
    exit 2
  fi
  name=$(basename "$SHARDS")
else
  if [ -n "${BEAUTY:-}" ]; then name=$(basename "$BEAUTY"); else BEAUTY=../shared/data/amazon_beauty_cllm4rec name=beauty; fi
  if [ ! -d "$BEAUTY/full" ]; then echo "bench/beauty_full.sh: $BEAUTY/full not found (set BEAUTY=... or SHARDS=...)" >&2; exit 2; fi
  SHARDS=runs/shards-$name-full
  TEXTS=()
  if [ -d "$BEAUTY/derived" ]; then TEXTS=(--texts "$BEAUTY/derived"); else echo "bench/beauty_full.sh: $BEAUTY has no derived/: no item texts beyond full/'s"; fi
  # The shards are reused only if they were built from this same input (another BEAUTY rebuilds them).
  built_from=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"]["input_dir"])' \
    "$SHARDS/index.json" 2>/dev/null || true)
  if [ "$built_from" != "$(realpath "$BEAUTY/full")" ]; then
    cllm4rec build-shards --input "$BEAUTY/full" "${TEXTS[@]}" --output "$SHARDS" --overwrite
  fi
fi
OUT=${OUT:-runs/bench-$name}
[ -f "$OUT/base/config.json" ] || cllm4rec make-tiny-model --output "$OUT/base" --tokenizer llama2 \
  --tokenizers-dir "$TOKENIZERS" --hidden-size 128 --layers 2

ARGS=(model.base_dir="$OUT/base" data.shards="$SHARDS" run.dir="$OUT" "$@")
# Beyond the paper (evaluate.ensemble): models trained the same way with these other seeds rank
# beside the seed-0 model and the rankings are fused. ENSEMBLE_SEEDS="" ranks with one model.
ENSEMBLE_SEEDS=${ENSEMBLE_SEEDS-"1 2"}
start=$(date +%s)
launch/pretrain.sh configs/beauty_bench.yaml "${ARGS[@]}"
launch/finetune.sh configs/beauty_bench.yaml "${ARGS[@]}"
MEMBERS=()
for seed in $ENSEMBLE_SEEDS; do
  launch/pretrain.sh configs/beauty_bench.yaml "${ARGS[@]}" run.seed="$seed" run.dir="$OUT/seed-$seed"
  launch/finetune.sh configs/beauty_bench.yaml "${ARGS[@]}" run.seed="$seed" run.dir="$OUT/seed-$seed"
  MEMBERS+=("$OUT/seed-$seed/finetune")
done
launch/evaluate.sh configs/beauty_bench.yaml "${ARGS[@]}" "evaluate.ensemble=[$(IFS=,; echo "${MEMBERS[*]}")]"
echo "total wall time: $(( $(date +%s) - start )) s"
python bench/summarize.py "$OUT"
