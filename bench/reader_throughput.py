"""Is the shard reader ever the bottleneck? One process, one run, three measurements per stream:

1. the reader alone: documents/s read, decoded and tokenized into batches by 2 DataLoader workers;
2. training steps of the tiny model fed by that reader (ZeRO-3, world of one);
3. the same training steps fed from batches materialised in memory beforehand.

Usage:  python bench/reader_throughput.py --shards runs/shards-beauty-full --base runs/bench-beauty/base
        (bench/beauty_full.sh builds both; any shard folder and local model directory work)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trainer.batching import Collator
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine, build_model, load_ds_config
from trainer.readers import stream_readers
from trainer.loop import Epoch, TrainLog, train_epoch
from trainer.optim import AlternatingAdamW, param_groups


class Materialised:
    """The reader's batches of steps [0, steps), built before timing starts."""

    def __init__(self, reader, transform, steps):
        self.batches = list(reader.loader(0, 0, steps, transform, num_workers=0))
        self.steps_per_epoch = steps

    def loader(self, epoch, start_step, stop_step, transform, num_workers):
        return iter(self.batches[start_step:stop_step])


def timed_epoch(engine, optimizer, reader, make, task, steps, log, workers, out: Path) -> tuple[float, float]:
    """(wall seconds of the epoch, mean seconds per step after the first two): a step is the
    wait for its batch plus the training step, as train_log.jsonl records them."""
    start = time.perf_counter()
    train_epoch(engine, optimizer, Epoch(reader, make, task, task, label=task, max_steps=steps, num_workers=workers), log)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()[-steps:]]
    steady = [r["data_s"] + r["step_s"] for r in records[2:]]
    return wall, sum(steady) / len(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--base", required=True, help="local model directory (e.g. a tiny random LLaMA)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-reader")
    args = ap.parse_args()

    cfg = load_config("configs/beauty_bench.yaml", [f"model.base_dir={args.base}", f"data.shards={args.shards}",
                                                    f"run.dir={args.out}", "run.log_every=100000"])
    init_distributed()
    p = cfg.pretrain
    ds_config = load_ds_config(cfg.run.deepspeed, max(p.collab_batch_size, p.content_batch_size))
    model, tokenizer = build_model(cfg, ds_config, *_counts(args.shards))
    optimizer = AlternatingAdamW(param_groups(model, 0.0), lr=p.lr)
    engine = build_engine(model, ds_config, optimizer)
    collator = Collator(tokenizer, cfg.run.seed, cfg.data.max_text_tokens, cfg.data.max_items)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    log = TrainLog(out, 0, cfg.run.log_every)
    rows = []
    for stream, batch, make in (("collab", p.collab_batch_size, collator.collab),
                                ("content", p.content_batch_size, collator.content)):
        reader = stream_readers(cfg, {stream: batch})[stream]
        steps = min(args.steps, reader.steps_per_epoch)
        start = time.perf_counter()
        docs = sum(len(d) for _, d, _ in reader.loader(1, 0, steps, make, args.workers))
        reader_docs_s = docs / (time.perf_counter() - start)
        timed_epoch(engine, optimizer, reader, make, stream, 3, log, args.workers, out)  # warm-up
        real_wall, real_step = timed_epoch(engine, optimizer, reader, make, stream, steps, log, args.workers, out)
        fixed_wall, fixed_step = timed_epoch(engine, optimizer, Materialised(reader, make, steps), make, stream,
                                             steps, log, 0, out)
        rows.append((stream, reader_docs_s, docs / real_wall, real_wall / steps, fixed_wall / steps,
                     real_step, fixed_step))
    print(f"\n{steps} steps per stream; a step = waiting for the batch + the training step")
    print(f"{'stream':8} {'reader docs/s':>14} {'training docs/s':>16} | {'s/step, whole epoch':>20} "
          f"{'':>9} {'diff':>6} | {'s/step, steady':>15} {'':>8} {'diff':>6}")
    print(f"{'':8} {'(2 workers)':>14} {'':>16} | {'reader':>10} {'in memory':>9} {'':>6} | "
          f"{'reader':>7} {'in memory':>9} {'':>6}")
    for stream, reader_rate, train_rate, real_wall, fixed_wall, real_step, fixed_step in rows:
        print(f"{stream:8} {reader_rate:14.1f} {train_rate:16.1f} | {real_wall:10.4f} {fixed_wall:9.4f} "
              f"{(real_wall / fixed_wall - 1) * 100:5.1f}% | {real_step:7.4f} {fixed_step:9.4f} "
              f"{(real_step / fixed_step - 1) * 100:5.1f}%")


def _counts(shards: str) -> tuple[int, int]:
    from data_shards.reader import load_index

    index = load_index(shards)
    return index["num_users"], index["num_items"]


if __name__ == "__main__":
    main()
