"""Training checkpoints of one stage: everything needed to continue a run where it stopped.

Layout, below the stage's output folder (e.g. runs/x/pretrain)::

    checkpoints/
        step-00000120/            one checkpoint; the tag counts the stage's training steps
            step-00000120/...     DeepSpeed: partitioned trainable weights + optimizer state
            rng-rank00000.pt      that rank's python / numpy / torch RNG states
            trainer_state.json    the recipe's progress, every rank's data-reader state,
                                  the resolved config and the project version
        latest                    tag of the newest complete checkpoint, written last

A checkpoint counts only once ``latest`` names it: a crash while saving leaves ``latest`` on
the previous one. The frozen base is not saved (it is reloaded from ``model.base_dir``).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("cllm4rec")
STATE_NAME = "trainer_state.json"


def _project_version() -> str:
    try:
        return version("cllm4rec")
    except PackageNotFoundError:
        return "unknown"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """Saves a stage's training state every ``save_every_steps`` steps and at epoch ends, and
    restores it when ``resume`` is "auto" (the newest complete checkpoint, if any) or a path."""

    def __init__(self, engine, stage_dir: Path, save_every_steps: int, keep: int, config: dict):
        self.engine = engine
        self.root = Path(stage_dir) / "checkpoints"
        self.save_every_steps = int(save_every_steps)
        self.keep = max(1, int(keep))
        self.config = config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------------ save

    def due(self, step: int) -> bool:
        return self.save_every_steps > 0 and step % self.save_every_steps == 0

    def save(self, step: int, progress: dict, reader_state: dict | None) -> Path:
        """Collective: every rank calls it after the same step. ``reader_state`` is this rank's
        (None between epochs)."""
        tag = f"step-{step:08d}"
        ckpt = self.root / tag
        self.engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                   ckpt / f"rng-rank{self.rank:05d}.pt")
        readers = [None] * self.world
        dist.all_gather_object(readers, reader_state)
        if self.rank == 0:
            state = {"tag": tag, "step": step, "world_size": self.world, "progress": progress,
                     "readers": readers, "config": self.config, "version": _project_version()}
            _write_atomically(ckpt / STATE_NAME, json.dumps(state, indent=1))
        dist.barrier()  # every rank's files are on disk before `latest` may name them
        if self.rank == 0:
            _write_atomically(self.root / "latest", tag + "\n")
            self._prune(tag)
            log.info("checkpoint %s saved", ckpt)
        dist.barrier()
        return ckpt

    def _prune(self, newest: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        for old in [t for t in tags if t < newest][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    # ------------------------------------------------------------------ resume

    def find(self, resume: str) -> Path | None:
        """The checkpoint folder that ``run.resume`` asks for, or None to start fresh."""
        if not resume:
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / STATE_NAME).is_file():
                raise FileNotFoundError(f"run.resume={resume}: no {STATE_NAME} there; point it at a "
                                        f"checkpoints/step-* folder or use run.resume=auto")
            return path
        latest = self.root / "latest"
        if not latest.is_file():
            log.info("run.resume=auto: no checkpoint in %s yet, starting fresh", self.root)
            return None
        path = self.root / latest.read_text().strip()
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{latest} names {path.name}, which has no {STATE_NAME}; "
                                    f"remove {latest} to start fresh or point run.resume at another checkpoint")
        return path

    def load(self, path: Path) -> dict:
        """Restore the engine, this rank's RNGs; returns trainer_state with this rank's reader state
        under ``"reader"``."""
        state = json.loads((path / STATE_NAME).read_text())
        if state["world_size"] != self.world:
            raise ValueError(f"{path} was saved by {state['world_size']} rank(s); this run has {self.world}. "
                             "Resume on the same number of ranks")
        self.engine.load_checkpoint(str(path), tag=state["tag"], load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        rng = torch.load(path / f"rng-rank{self.rank:05d}.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        state["reader"] = state["readers"][self.rank]
        log.info("resumed from %s (stage step %d)", path, state["step"])
        return state
