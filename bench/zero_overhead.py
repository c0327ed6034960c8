"""What ZeRO costs: ZeRO-3 on 2 ranks, ZeRO-2 on 2 ranks, and plain single-process PyTorch (no
DeepSpeed, same global batch, all cores) as the floor.

Each variant trains the same collaborative steps, then the same content steps (in that order,
so the peak RSS at the end of the collaborative steps is theirs alone). Reported per stream:
median step time, documents/s, real tokens/s, MFU (trainer/throughput.py states the FLOP
convention), every rank's peak RSS, and each variant's overhead ratio against the floor.

Usage:
    python bench/zero_overhead.py --base runs/bench-beauty/base --shards runs/shards-beauty-full
    python bench/zero_overhead.py --base runs/smollm2 --shards runs/shards-mini \
        --config configs/smollm2_mini.yaml --steps 8 --collab-batch 8   # the real SmolLM2-135M
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(args, run_dir: Path, world: int) -> list[str]:
    return [f"model.base_dir={args.base}", f"data.shards={args.shards}", f"run.dir={run_dir}",
            "pretrain.content_warmup_epochs=0", "pretrain.rounds=1", f"pretrain.max_steps_per_epoch={args.steps}",
            f"pretrain.content_batch_size={args.content_batch // world}",
            f"pretrain.collab_batch_size={args.collab_batch // world}", "run.log_every=1000", "data.num_workers=1"]


def summarize(records: list[dict], skip: int) -> dict:
    out = {}
    for task in ("content", "collab"):
        steps = [r for r in records if r["task"] == task][skip:]
        step_s = statistics.median(r["step_s"] for r in steps)
        peaks = [r["peak_rss_mb"] for r in records if r["task"] == task][-1]
        out[task] = {"step_s": round(step_s, 4),
                     "docs_per_s": round(statistics.median(r["docs"] / r["step_s"] for r in steps), 1),
                     "tokens_per_s": round(statistics.median(r["tokens"] / r["step_s"] for r in steps), 0),
                     "mfu": statistics.median(r["mfu"] for r in steps) if steps[0].get("mfu") is not None else None,
                     "peak_rss_mb_per_rank": [round(p) for p in peaks]}
    return out


def run_deepspeed(args, config: str) -> list[dict]:
    run_dir = Path(args.out) / config
    with open(Path(args.out) / f"{config}.log", "w") as log:
        done = subprocess.run(["bash", "launch/pretrain.sh", args.config, *overrides(args, run_dir, 2),
                               f"run.deepspeed=configs/{config}.json"], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ, NPROC="2"))
    if done.returncode != 0:
        raise SystemExit(f"{config} failed, see {args.out}/{config}.log")
    return [json.loads(line) for line in (run_dir / "pretrain" / "train_log.jsonl").read_text().splitlines()]


def run_plain(args) -> list[dict]:
    """The same steps without DeepSpeed: the module, AdamW and backward() in one process."""
    import torch

    from data_shards.reader import ShardReader, load_index
    from trainer.batching import Collator
    from trainer.config import load_config
    from trainer.distributed import init_distributed, seed_everything
    from trainer.engine import build_model, throughput_meter
    from trainer.resources import peak_rss_mb
    from trainer.optim import AlternatingAdamW, param_groups

    torch.set_num_threads(os.cpu_count())
    cfg = load_config(args.config, overrides(args, Path(args.out) / "plain", 1))
    init_distributed()  # a world of one: the model agrees chunk counts through the process group
    seed_everything(cfg.run.seed)
    index = load_index(cfg.data.shards)
    model, tokenizer = build_model(cfg, {}, index["num_users"], index["num_items"])
    optimizer = AlternatingAdamW(param_groups(model, 0.0), lr=cfg.pretrain.lr)
    meter = throughput_meter(cfg, model, {})
    collator = Collator.from_config(tokenizer, cfg)
    records = []
    for task, batch_size in (("collab", args.collab_batch), ("content", args.content_batch)):
        reader = ShardReader(cfg.data.shards, task, batch_size, 0, 1, cfg.run.seed, cfg.data.window_shards)
        make = getattr(collator, task)
        model.train()
        for _, docs, batch in reader.loader(0, 0, args.steps, make, 1):
            started = time.perf_counter()
            optimizer.active_model = task
            out = model(task, batch)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
            tokens = int((batch["doc_index"] >= 0).sum())
            records.append({"task": task, "step_s": seconds, "docs": len(docs), "tokens": tokens,
                            "peak_rss_mb": [peak_rss_mb()], **meter.rates(task, tokens, len(docs), seconds)})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default="configs/beauty_bench.yaml", help="experiment config the runs start from")
    ap.add_argument("--steps", type=int, default=20, help="steps per stream (the first 3 are not counted)")
    ap.add_argument("--content-batch", type=int, default=16, help="global documents per content step")
    ap.add_argument("--collab-batch", type=int, default=32, help="global documents per collaborative step")
    ap.add_argument("--out", default="runs/bench-zero-overhead")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        (Path(args.out) / "plain.json").write_text(json.dumps(run_plain(args)))
        return
    results = {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], check=True, env=env)
    results["plain PyTorch, 1 process"] = summarize(json.loads((Path(args.out) / "plain.json").read_text()), 3)
    results["ZeRO-2, 2 ranks"] = summarize(run_deepspeed(args, "ds_zero2"), 3)
    results["ZeRO-3, 2 ranks"] = summarize(run_deepspeed(args, "ds_zero3"), 3)
    floor = results["plain PyTorch, 1 process"]
    print(f"{'variant':<28}{'stream':<9}{'s/step':>8}{'docs/s':>9}{'tokens/s':>10}{'MFU':>8}{'x floor':>9}"
          f"  peak RSS per rank (MB)")
    for name, streams in results.items():
        for task, r in streams.items():
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
            print(f"{name:<28}{task:<9}{r['step_s']:>8.3f}{r['docs_per_s']:>9.1f}{r['tokens_per_s']:>10.0f}{mfu:>8}"
                  f"{r['step_s'] / floor[task]['step_s']:>9.2f}  {r['peak_rss_mb_per_rank']}")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
