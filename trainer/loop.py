"""The training step and epoch loop shared by the pretrain and finetune recipes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer.optim import AlternatingAdamW


class TrainLog:
    """Every step as a JSON line in <stage dir>/train_log.jsonl, and a console line every
    `log_every` steps; rank 0 only."""

    def __init__(self, path: Path, rank: int, log_every: int):
        self.rank = rank
        self.log_every = max(1, log_every)
        self.step = 0
        self.file = open(path, "a") if rank == 0 else None

    def write(self, record: dict, bar: tqdm | None = None) -> None:
        self.step += 1
        if self.file is None:
            return
        record = {"step": self.step, **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.step % self.log_every == 0:
            line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            (bar.write if bar is not None else print)(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _global_mean(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def agree_on_vocab_chunks(batch: dict, chunk: int) -> int:
    """The largest number of vocabulary-head chunks any rank needs for this step."""
    from model.cllm4rec import chunks_needed

    needed = torch.tensor(chunks_needed(int((batch["targets"] >= 0).sum()), chunk))
    dist.all_reduce(needed, op=dist.ReduceOp.MAX)
    return int(needed)


def train_epoch(engine, optimizer: AlternatingAdamW, reader, make_batch, task: str, model_name: str,
                epoch: int, label: str, log: TrainLog, max_steps: int = 0) -> float:
    """One pass over `reader`'s epoch; only `model_name`'s parameters are updated.

    Returns the mean loss over the epoch (averaged over ranks).
    """
    engine.train()
    steps = reader.steps_per_epoch if not max_steps else min(max_steps, reader.steps_per_epoch)
    bar = tqdm(total=steps, desc=label, disable=log.rank != 0, leave=False, dynamic_ncols=True)
    total = 0.0
    for step, docs in enumerate(reader.epoch(epoch)):
        if step >= steps:
            break
        start = time.perf_counter()
        batch = make_batch(docs, epoch)
        if task == "content":
            batch["vocab_chunks"] = agree_on_vocab_chunks(batch, engine.module.loss_cfg.vocab_chunk)
        optimizer.active_model = model_name
        out = engine(task, batch)
        engine.backward(out["loss"])
        engine.step()
        loss, nll, reg = _global_mean([out["loss"].item(), out["nll"].item(), out["reg"].item()])
        total += loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        log.write({"stage": label, "task": task, "epoch": epoch, "loss": loss, "nll": nll, "reg": reg,
                   "docs": len(docs) * dist.get_world_size(), "step_s": round(time.perf_counter() - start, 4)}, bar)
    bar.close()
    return total / max(1, steps)
