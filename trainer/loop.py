"""The training step and epoch loop shared by the pretrain and finetune recipes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer.engine import peak_rss_mb
from trainer.optim import AlternatingAdamW


class TrainLog:
    """Every step as a JSON line in <stage dir>/train_log.jsonl (rank 0), and a console line
    every `log_every` steps. `tokens`: real (non-padding) tokens of the step over all ranks;
    `pad_frac`: the share of padding among the positions the model processed; `peak_rss_mb`: each
    rank's peak resident memory so far. With
    `log_documents`, every rank also writes the keys of the documents it trained on to
    <stage dir>/documents-rank<r>.jsonl.

    `resume_step`: continuing from a checkpoint taken after that many steps; lines of later
    steps (written before the interruption) are dropped, so the files read as one clean run.
    `throughput` (trainer.throughput.Throughput): adds tokens_per_s, docs_per_s and mfu to
    every step that reports its tokens.
    """

    def __init__(self, stage_dir: Path, rank: int, log_every: int, log_documents: bool = False,
                 resume_step: int = 0, throughput=None):
        self.rank = rank
        self.throughput = throughput
        self.log_every = max(1, log_every)
        self.step = resume_step
        paths = ([Path(stage_dir) / "train_log.jsonl"] if rank == 0 else []) + \
            ([Path(stage_dir) / f"documents-rank{rank}.jsonl"] if log_documents else [])
        for path in paths:
            _keep_steps_up_to(path, resume_step)
        self.file = open(paths[0], "a") if rank == 0 else None
        self.documents = open(paths[-1], "a") if log_documents else None

    def write(self, record: dict, bar: tqdm | None = None, docs: list[dict] | None = None) -> None:
        self.step += 1
        if self.documents is not None and docs is not None:
            self.documents.write(json.dumps({"step": self.step, "stage": record.get("stage"), "epoch": record.get("epoch"),
                                             "keys": [d["key"] for d in docs]}) + "\n")
            self.documents.flush()
        if self.file is None:
            return
        record = {"step": self.step, **record}
        if self.throughput is not None and "tokens" in record:
            record.update(self.throughput.rates(record["task"], record["tokens"], record["docs"], record["step_s"]))
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.step % self.log_every == 0:
            line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            (bar.write if bar is not None else print)(line)

    def close(self) -> None:
        for f in (self.file, self.documents):
            if f is not None:
                f.close()


def _keep_steps_up_to(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(kept))


def _step_stats(out: dict, batch: dict) -> tuple[float, float, float, int, float, list[float]]:
    """Loss, nll, reg (means over ranks), real tokens and padded fraction (over all ranks'
    batches), and every rank's peak RSS so far (MB), in one all_reduce."""
    real = int((batch["doc_index"] >= 0).sum())
    rank, world = dist.get_rank(), dist.get_world_size()
    tensor = torch.zeros(5 + world, dtype=torch.float64)
    tensor[:5] = torch.tensor([out["loss"].item(), out["nll"].item(), out["reg"].item(), real,
                               batch["input_ids"].numel()], dtype=torch.float64)
    tensor[5 + rank] = peak_rss_mb()  # each rank fills its own slot: the sum is the list
    dist.all_reduce(tensor)
    loss, nll, reg, real, positions = tensor[:5].tolist()
    return (loss / world, nll / world, reg / world, int(real), 1.0 - real / max(positions, 1.0),
            tensor[5:].tolist())


def train_epoch(engine, optimizer: AlternatingAdamW, reader, make_batch, task: str, model_name: str,
                epoch: int, label: str, log: TrainLog, max_steps: int = 0, start_step: int = 0,
                loss_sum: float = 0.0, num_workers: int = 0, after_step=None) -> float:
    """Steps [start_step, end) of `reader`'s epoch; only `model_name`'s parameters are updated.

    Batches are built by `make_batch` in `num_workers` DataLoader workers. `after_step(next_step,
    loss_sum, epoch_steps)` runs after every step (checkpoints). `loss_sum`: the summed losses of the steps
    before `start_step` (when resuming). Returns the mean loss over the epoch (averaged over ranks).
    """
    engine.train()
    steps = reader.steps_per_epoch if not max_steps else min(max_steps, reader.steps_per_epoch)
    bar = tqdm(total=steps, initial=start_step, desc=label, disable=log.rank != 0, leave=False, dynamic_ncols=True)
    total = loss_sum
    waited = time.perf_counter()
    for step, docs, batch in reader.loader(epoch, start_step, steps, make_batch, num_workers):
        start = time.perf_counter()
        optimizer.active_model = model_name
        out = engine(task, batch)
        engine.backward(out["loss"])
        engine.step()
        loss, nll, reg, tokens, pad_frac, peak_rss = _step_stats(out, batch)
        total += loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        log.write({"stage": label, "task": task, "epoch": epoch, "loss": loss, "nll": nll, "reg": reg,
                   "docs": len(docs) * dist.get_world_size(), "tokens": tokens, "pad_frac": round(pad_frac, 4),
                   "data_s": round(start - waited, 4),
                   "step_s": round(time.perf_counter() - start, 4), "peak_rss_mb": peak_rss}, bar, docs)
        if after_step is not None:
            after_step(step + 1, total, steps)
        waited = time.perf_counter()
    bar.close()
    return total / max(1, steps)
