"""The training step and epoch loop shared by the pretrain and finetune recipes."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.lora import MODELS
from trainer.resources import peak_rss_mb
from trainer.optim import AlternatingAdamW, Optimizers


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
    every step that reports its tokens. `monitor` (the engine's DeepSpeed monitor: TensorBoard,
    W&B, CSV, as the DeepSpeed config enables them) also gets each step's loss and rates.
    """

    def __init__(self, stage_dir: Path, rank: int, log_every: int, log_documents: bool = False,
                 resume_step: int = 0, throughput=None, monitor=None):
        self.rank = rank
        self.throughput = throughput
        self.monitor = monitor if monitor is not None and monitor.enabled and rank == 0 else None
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
        self.events([(f"Train/{record['task']}/{key}", record[key], self.step)
                     for key in ("loss", "tokens_per_s", "docs_per_s") if key in record])
        if self.step % self.log_every == 0:
            line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            (bar.write if bar is not None else print)(line)

    def events(self, events: list[tuple[str, float, int]]) -> None:
        """(name, value, x) to the DeepSpeed monitor, if the config enables one (rank 0)."""
        if self.monitor is not None:
            self.monitor.write_events(events)

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


@dataclass
class Progress:
    """Where a recipe stands in its plan. Saved in every checkpoint (trainer_state.json
    "progress"), so that a resumed run continues at the same step with the same sums."""

    plan_index: int = 0  # the plan entry being trained
    next_step: int = 0  # its next step
    loss_sum: float = 0.0  # the summed (rank-mean) losses of its steps so far
    epochs_done: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))  # pretrain: per model (= its stream)
    best: dict | None = None  # finetune: the best validation result so far
    history: list = field(default_factory=list)  # finetune: every epoch's validation result
    wall_s: float = 0.0  # the stage's wall time at this checkpoint, over every process that ran it

    @classmethod
    def from_dict(cls, saved: dict) -> "Progress":
        return cls(**saved)

    def to_dict(self) -> dict:
        return asdict(self)

    def finish_entry(self) -> None:
        self.plan_index, self.next_step, self.loss_sum = self.plan_index + 1, 0, 0.0


@dataclass
class Epoch:
    """One entry of a recipe's plan: a pass over one stream that trains one model."""

    reader: Any  # a data_shards.reader.ShardReader (steps_per_epoch, loader, state, resume_point)
    make_batch: Callable  # documents -> batch: a trainer.batching.Collator method
    task: str  # what the model computes: collab, content or rec
    model: str  # whose parameters the step updates: collab or content
    number: int = 0  # the reader's epoch (it seeds the shuffle)
    label: str = ""  # its name on the progress bar and in train_log.jsonl
    max_steps: int = 0  # 0: the whole epoch; > 0: at most this many steps
    num_workers: int = 0  # DataLoader workers building the batches

    @property
    def steps(self) -> int:
        return epoch_steps(self.reader, self.max_steps)


def epoch_steps(reader, max_steps: int = 0) -> int:
    """Steps of one epoch of `reader`, at most `max_steps` (0: no cap)."""
    return reader.steps_per_epoch if not max_steps else min(max_steps, reader.steps_per_epoch)


def train_epoch(engine, optimizer: Optimizers | AlternatingAdamW, epoch: Epoch, log: TrainLog,
                progress: Progress | None = None, checkpoints=None) -> float:
    """The steps of `epoch` from `progress.next_step` on; only `epoch.model`'s parameters are
    updated (`optimizer`: the stage's Optimizers, or the engine's AlternatingAdamW alone).
    Returns the mean loss over the epoch (averaged over ranks).

    `progress` (default: a fresh one) is kept current after every step. `checkpoints` (a
    trainer.checkpoint.Checkpointer, or anything with the same two methods) is called at the
    epoch's start, `before_epoch(epoch, progress)`, and at every step boundary,
    `after_step(step, epoch, progress)`: it saves when due and stops on preemption.
    """
    progress = progress or Progress()
    optimizers = optimizer if isinstance(optimizer, Optimizers) else Optimizers(optimizer)
    if checkpoints is not None:
        checkpoints.before_epoch(epoch, progress)
    engine.train()
    steps = epoch.steps
    bar = tqdm(total=steps, initial=progress.next_step, desc=epoch.label, leave=False, dynamic_ncols=True,
               disable=True if log.rank != 0 else None)  # None: draw only on a terminal, not into log files
    waited = time.perf_counter()
    for step, docs, batch in epoch.reader.loader(epoch.number, progress.next_step, steps, epoch.make_batch,
                                                 epoch.num_workers):
        start = time.perf_counter()
        optimizers.activate(epoch.model)
        out = optimizers.forward(engine, epoch.task, batch)
        optimizers.step(engine, out["loss"])
        loss, nll, reg, tokens, pad_frac, peak_rss = _step_stats(out, batch)
        progress.next_step, progress.loss_sum = step + 1, progress.loss_sum + loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        log.write({"stage": epoch.label, "task": epoch.task, "epoch": epoch.number, "loss": loss, "nll": nll,
                   "reg": reg, "docs": len(docs) * dist.get_world_size(), "tokens": tokens,
                   "pad_frac": round(pad_frac, 4), "data_s": round(start - waited, 4),
                   "step_s": round(time.perf_counter() - start, 4), "peak_rss_mb": peak_rss}, bar, docs)
        if checkpoints is not None:
            checkpoints.after_step(log.step, epoch, progress)
        waited = time.perf_counter()
    bar.close()
    return progress.loss_sum / max(1, steps)
