"""Per-rank memory of a ~1B-parameter base under each DeepSpeed config in configs/.

Each config runs a short pretrain (a few content steps, LoRA + full Beauty ID tables) through
launch/pretrain.sh. Reported per rank: the peak RSS when setup ends (base loaded, engine
built) and the peak over the whole run, against the size of one full fp32 copy of the base.

Usage:
    python bench/zero_memory.py --base runs/llama-1b-sharded --make-base \
        --tokenizer-from ../shared/tokenizers/llama2 --shards runs/shards-beauty-full
    (--make-base writes the random LLaMA as sharded safetensors once; it is never committed)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["ds_zero3", "ds_zero2", "ds_zero3_offload_opt", "ds_zero3_offload_param", "ds_zero3_bf16",
           "ds_zero3_lowmem"]


def make_base(out: Path, tokenizer_from: str, hidden: int, layers: int) -> None:
    from transformers import PreTrainedTokenizerFast

    from trainer.backbone import write_tiny_llama

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer_from) / "tokenizer.json"),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    intermediate = int(hidden * 8 / 3) // 64 * 64
    write_tiny_llama(str(out), tokenizer, 0, max_shard_size="500MB", hidden_size=hidden, num_hidden_layers=layers,
                     intermediate_size=intermediate, num_attention_heads=hidden // 128,
                     num_key_value_heads=hidden // 128)


def base_parameters(base: Path) -> int:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_parameters"]) if "total_parameters" in index["metadata"] \
        else int(index["metadata"]["total_size"]) // 4


def run(args, config: str, ranks: int) -> dict:
    name = f"{config}-{ranks}ranks" + ("-gc" if args.gradient_checkpointing else "")
    run_dir = Path(args.out) / name
    overrides = [f"model.base_dir={args.base}", f"data.shards={args.shards}", f"run.dir={run_dir}",
                 f"run.deepspeed=configs/{config}.json", "pretrain.content_warmup_epochs=1", "pretrain.rounds=0",
                 f"pretrain.max_steps_per_epoch={args.steps}", f"pretrain.content_batch_size={args.batch}",
                 f"data.max_text_tokens={args.max_text_tokens}", "run.log_every=1", "data.num_workers=0",
                 f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]
    started = time.time()
    with open(Path(args.out) / f"{name}.log", "w") as log:
        done = subprocess.run(["bash", "launch/pretrain.sh", "configs/beauty_bench.yaml", *overrides], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, NPROC=str(ranks)))
    if done.returncode != 0:
        return {"config": config, "ranks": ranks, "error": f"exit {done.returncode}, see {args.out}/{name}.log"}
    resources = json.loads((run_dir / "pretrain" / "resources.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    return {"config": config, "ranks": ranks, "wall_s": round(time.time() - started, 1),
            "setup_peak_mb": resources["setup_peak_rss_mb_per_rank"], "peak_mb": resources["peak_rss_mb_per_rank"],
            "step_s": [s["step_s"] for s in steps], "loss": [round(s["loss"], 3) for s in steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="local model directory with sharded safetensors")
    ap.add_argument("--make-base", action="store_true", help="write a random LLaMA to --base first if it is missing")
    ap.add_argument("--tokenizer-from", help="with --make-base: a folder with tokenizer.json (e.g. Llama-2's)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=17)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--ranks", default="2", help="comma-separated rank counts; every config runs with each")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-text-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/bench-zero-memory")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="model.gradient_checkpointing=true: keep each layer's input, recompute the rest in backward")
    args = ap.parse_args()
    base = Path(args.base)
    if args.make_base and not (base / "config.json").is_file():
        if not args.tokenizer_from:
            raise SystemExit("--make-base needs --tokenizer-from (a folder with tokenizer.json)")
        make_base(base, args.tokenizer_from, args.hidden, args.layers)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    params = base_parameters(base)
    fp32_mb = params * 4 / 2**20
    print(f"base: {params / 1e9:.3f}B parameters; one full fp32 copy = {fp32_mb:,.0f} MB; gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'config':<24}{'ranks':>6}{'setup peak MB/rank':>32}{'overall peak MB/rank':>32}{'x fp32 copy':>13}"
          f"{'s/step':>9}")
    results = []
    for config, ranks in [(c, int(r)) for r in args.ranks.split(",") for c in args.configs.split(",")]:
        result = run(args, config, ranks)
        results.append(result)
        if "error" in result:
            print(f"{config:<24}{ranks:>6}  {result['error']}")
            continue
        worst = max(result["peak_mb"])
        step_s = sorted(result["step_s"])[len(result["step_s"]) // 2]
        print(f"{config:<24}{ranks:>6}{' / '.join(f'{m:,.0f}' for m in result['setup_peak_mb']):>32}"
              f"{' / '.join(f'{m:,.0f}' for m in result['peak_mb']):>32}{worst / fp32_mb:>13.2f}{step_s:>9.1f}",
              flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"parameters": params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
