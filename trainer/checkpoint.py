"""Training checkpoints of one stage: everything needed to continue a run where it stopped.

Layout, below the stage's output folder (e.g. runs/x/pretrain)::

    checkpoints/
        step-00000120/              one checkpoint; the number counts the stage's training steps
            deepspeed/              DeepSpeed: partitioned trainable weights + optimizer state, per rank
            zero_to_fp32.py         DeepSpeed's consolidation script (see docs/checkpoints.md)
            rng-rank00000.pt        that rank's python / numpy / torch RNG states
            trainable.safetensors   every trainable parameter in full (fp32) with its Adam moments:
                                    what a resume on another number of ranks loads
            id-shards/              with model.id_tables=sharded: each rank's rows of the ID tables
                                    and their Adam moments (trainer/table_shards.py)
            trainer_state.json      the recipe's progress, every rank's data-reader state,
                                    Adam step counts, the resolved config, the project version
            manifest.json           size and sha256 of every file above; written last
        latest                      name of the newest published checkpoint

Saving is atomic: a checkpoint is written to ``.incomplete-step-N/``, its manifest is written
from the files on disk, and only then is the folder renamed to ``step-N/`` and ``latest``
rewritten. A crash at any point leaves ``latest`` on a complete checkpoint. Resuming checks
the manifest; a damaged checkpoint is skipped with a warning naming it.

The frozen base is not saved (it is reloaded from ``model.base_dir``).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_shards.build import sha256_of
from trainer import compat
from model.lora import MODELS
from trainer.model_state import gathered_params
from trainer.table_shards import load_shards, save_shards

log = logging.getLogger("cllm4rec")
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
TRAINABLE_NAME = "trainable.safetensors"
DS_TAG = "deepspeed"
# The exit status of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint (EX_TEMPFAIL):
# a wrapper requeues on it and reruns with --resume auto.
EXIT_PREEMPTED = 75


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; nothing of it was published."""


def _attempt(write) -> str | None:
    """None when `write()` succeeds, else what went wrong. A full disk surfaces as OSError, as
    torch's RuntimeError ("unexpected pos"), or as safetensors' own SafetensorError: any of them."""
    try:
        write()
    except Exception as error:  # noqa: BLE001 (reported to every rank and raised as CheckpointSaveError)
        return f"{type(error).__name__}: {error}"
    return None


class IncompatibleCheckpoint(ValueError):
    """A checkpoint of another model or data configuration than the run that would resume it."""


def run_identity(model, config: dict) -> dict:
    """What a checkpoint must share with the run that resumes it: the ID-table sizes, the base's
    vocabulary, the trainable parameters' names and shapes, and the shards' content."""
    import hashlib

    from data_shards.reader import load_index

    shards = None
    if config.get("data", {}).get("shards"):
        index = load_index(config["data"]["shards"])
        shards = hashlib.sha256(json.dumps({key: index[key] for key in ("streams", "splits", "tokenization")},
                                           sort_keys=True).encode()).hexdigest()[:16]
    return {"num_users": model.num_users, "num_items": model.num_items, "vocab_size": model.vocab_size,
            "trainable": {n: list(compat.full_shape(p)) for n, p in model.named_parameters()
                          if p.requires_grad},
            "id_tables": "sharded" if model.sharded_tables else "dense",
            "shards": shards}


def _project_version() -> str:
    try:
        return version("cllm4rec")
    except PackageNotFoundError:
        return "unknown"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in files}


def damage(folder: Path) -> str | None:
    """Why a published checkpoint folder cannot be used, or None when its manifest holds."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return f"{path} is missing"
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"{path} is not valid JSON ({e})"
    for name, meta in recorded.items():
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != meta["bytes"] or sha256_of(f) != meta["sha256"]:
            return f"{f} differs from its manifest (size or sha256)"
    return None


class Preempted(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been saved."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"stopped on a preemption signal after saving {checkpoint}; "
                         f"rerun with --resume auto to continue (exit status {EXIT_PREEMPTED})")
        self.checkpoint = checkpoint


class PreemptionWatch:
    """SIGTERM or SIGUSR1 (Slurm's --signal) ask for a stop. The flag is shared by all ranks once
    per step, so they finish the same step, save the same checkpoint and stop together.
    Further signals while saving change nothing: the flag is already set."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: finishing this step, then saving a checkpoint and stopping",
                        signal.Signals(signum).name)

    def requested(self) -> bool:
        """Collective: did any rank receive a stop signal?"""
        flag = torch.tensor(0 if self.received is None else 1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


class Checkpointer:
    """Saves a stage's training state every ``save_every_steps`` steps, at epoch ends and on
    preemption, and restores it when ``resume`` is "auto" (the newest usable checkpoint, if
    any) or a checkpoint folder."""

    def __init__(self, engine, stage_dir: Path, save_every_steps: int, keep: int, config: dict,
                 table_optimizer=None, stage_clock=None):
        self.engine = engine
        self.stage_clock = stage_clock  # () -> the stage's wall time so far, kept in each checkpoint's progress
        self.table_optimizer = table_optimizer  # trainer.optim.ShardAdam with model.id_tables=sharded
        if engine.module.sharded_tables and table_optimizer is None:
            raise ValueError("sharded ID tables: the Checkpointer needs their optimizer (Optimizers.shards), or "
                             "their Adam moments would be left out of every checkpoint")
        self.root = Path(stage_dir) / "checkpoints"
        self.save_every_steps = int(save_every_steps)
        self.keep = max(1, int(keep))
        self.config = config
        self.stage = Path(stage_dir).name
        self.identity = run_identity(engine.module, config)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.preemption = PreemptionWatch()
        self.stopping = False
        self.resumed: dict | None = None  # trainer_state of the checkpoint this run resumed from

    # ------------------------------------------------------------------ save

    def due(self, step: int) -> bool:
        return self.save_every_steps > 0 and step % self.save_every_steps == 0

    def save(self, step: int, progress: dict, reader_state: dict | None) -> Path:
        """Collective: every rank calls it after the same step. ``reader_state`` is this rank's
        (None between epochs). A write that fails on any rank (a full disk, a quota) fails the
        save on every rank: nothing is published, ``latest`` keeps naming the newest complete
        checkpoint, and CheckpointSaveError says so."""
        started = time.perf_counter()
        tag = f"step-{step:08d}"
        final, tmp = self.root / tag, self.root / f".incomplete-{tag}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        failed = _attempt(lambda: self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False,
                                                              exclude_frozen_parameters=True))
        failed = failed or _attempt(lambda: torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            tmp / f"rng-rank{self.rank:05d}.pt"))
        if self.engine.module.sharded_tables:
            failed = failed or _attempt(lambda: save_shards(self.engine.module.tables, self.table_optimizer, tmp,
                                                            self.rank))
        trainable, adam_steps = self._full_trainable_state()
        readers = [None] * self.world
        dist.all_gather_object(readers, reader_state)
        failures = [None] * self.world
        dist.all_gather_object(failures, failed)  # every rank's files are on disk, or some are not
        if self.rank == 0 and not any(failures):
            failures[0] = _attempt(lambda: self._publish(tmp, final, tag, step, progress, readers, trainable,
                                                         adam_steps))
        dist.broadcast_object_list(failures, src=0)
        problems = [f"rank {r}: {f}" for r, f in enumerate(failures) if f]
        if problems:
            free = shutil.disk_usage(self.root).free / 2**20  # before the partial files are removed
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = self.root / "latest"
            newest = latest.read_text().strip() if latest.is_file() else None
            raise CheckpointSaveError(
                f"could not save checkpoint {tag} in {self.root} ({'; '.join(problems)}); its file system has "
                f"{free:.1f} MB free{' (full)' if free < 1 else ''}. Nothing was published: "
                + (f"{newest} is still the newest complete checkpoint" if newest else "there is no checkpoint yet")
                + ". Free space (or raise the quota) and rerun with --resume auto")
        if self.rank == 0:
            size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            log.info("checkpoint %s saved in %.2f s (%.1f MB)", final, time.perf_counter() - started, size / 2**20)
        dist.barrier()
        return final

    def _publish(self, tmp: Path, final: Path, tag: str, step: int, progress: dict, readers: list, trainable: dict,
                 adam_steps: dict) -> None:
        """Rank 0, once every rank's files are in `tmp`: the full state, the manifest, then the rename
        to `final` and `latest`, in that order."""
        from safetensors.torch import save_file

        save_file(trainable, str(tmp / TRAINABLE_NAME))
        schedule = getattr(self.table_optimizer, "schedule", None)
        state = {"tag": tag, "step": step, "world_size": self.world, "progress": progress,
                 "readers": readers, "adam_steps": adam_steps, "config": self.config,
                 "table_schedule_step": schedule.last_epoch if schedule is not None else None,
                 "identity": self.identity, "version": _project_version()}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        (tmp / MANIFEST_NAME).write_text(json.dumps(_manifest(tmp), indent=1))
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(self.root / "latest", tag + "\n")
        self._prune(tag)

    def _full_trainable_state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Every trainable parameter in full fp32 with its Adam moments (collective), and the Adam
        step count of each param group by model name."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from trainer.optim import model_of

        if self.engine.optimizer is None:  # nothing of the module trains (paper mode, sharded tables)
            return {}, dict.fromkeys(MODELS, 0)
        # Decided from the step counts, which every rank agrees on: asking DeepSpeed for a
        # missing moment fails on some ranks only under ZeRO-1/2, and the collectives diverge.
        steps = _adam_steps(self.engine)
        compat.relink_optimizer_state(self.engine)
        out = {}
        for name, p in self.engine.module.named_parameters():
            if not p.requires_grad:
                continue
            out[f"param/{name}"] = safe_get_full_fp32_param(p).detach().float().cpu().contiguous()
            for moment in ("exp_avg", "exp_avg_sq"):
                stepped = steps.get(model_of(name), 0) > 0  # a model that has not stepped has no Adam state
                out[f"{moment}/{name}"] = (safe_get_full_optimizer_state(p, moment).detach().float().cpu().contiguous()
                                           if stepped else torch.zeros_like(out[f"param/{name}"]))
        return out, steps

    def _prune(self, newest: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        for old in [t for t in tags if t < newest][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def before_epoch(self, epoch, progress) -> None:
        """At the start of a plan entry (trainer.loop.Epoch): a run resumed in the middle of it
        must find its reader where the checkpoint left it."""
        saved = self.resumed
        if saved is None or progress.next_step == 0 or progress.plan_index != saved["progress"]["plan_index"]:
            return
        if epoch.reader.resume_point(saved["reader"]) != (epoch.number, progress.next_step):
            raise RuntimeError(f"checkpoint of step {saved['step']}: its reader state and progress disagree; "
                               "resume from an earlier checkpoint (run.resume=<folder>)")

    def after_step(self, step: int, epoch, progress) -> None:
        """Collective, after every training step (the stage's `step`-th): save when due or when a
        rank received a stop signal, and then stop. At an epoch's last step nothing is saved:
        :meth:`epoch_end` follows."""
        self.stopping = self.stopping or self.preemption.requested()
        if progress.next_step >= epoch.steps:
            return
        if self.stopping or self.due(step):
            reader_state = epoch.reader.state(epoch.number, progress.next_step, epoch.num_workers)
            path = self.save(step, self._stamped(progress), reader_state)
            if self.stopping:
                raise Preempted(path)

    def epoch_end(self, step: int, progress) -> None:
        """Collective, after a plan entry and whatever follows it (validation): always saves."""
        path = self.save(step, self._stamped(progress), None)
        if self.stopping:
            raise Preempted(path)

    def _stamped(self, progress) -> dict:
        if self.stage_clock is not None:
            progress.wall_s = round(self.stage_clock(), 1)
        return progress.to_dict()

    # ------------------------------------------------------------------ resume

    def find(self, resume: str) -> Path | None:
        """The checkpoint folder ``run.resume`` asks for, or None to start fresh. Decided on rank 0
        (it checks manifests) and shared, so every rank loads the same one."""
        choice = [None]
        if self.rank == 0:
            choice[0] = self._choose(resume)
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], Exception):
            raise choice[0]
        return None if choice[0] is None else Path(choice[0])

    def _choose(self, resume: str):
        if not resume:
            return None
        if resume != "auto":
            path = Path(resume)
            problem = damage(path) if path.is_dir() else f"{path} is not a checkpoint folder"
            if problem:
                return FileNotFoundError(f"run.resume={resume}: {problem}; point it at a checkpoints/step-* "
                                         "folder or use --resume auto")
            return str(path)
        candidates = sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        if not candidates:
            log.info("--resume auto: no checkpoint in %s yet, starting fresh", self.root)
            return None
        for path in candidates:
            problem = damage(path)
            if problem is None:
                return str(path)
            log.warning("--resume auto: skipping damaged checkpoint %s: %s", path, problem)
        return RuntimeError(f"--resume auto: every checkpoint in {self.root} is damaged (see the warnings); "
                            "remove them to start fresh")

    def load(self, path: Path) -> dict:
        """Restore the engine and this rank's RNGs; returns trainer_state with this rank's
        reader state under ``"reader"``.

        On the number of ranks that saved it, the DeepSpeed partitions are loaded as they are:
        the run continues bitwise as if uninterrupted. On another number of ranks, the full
        trainable parameters and Adam moments of ``trainable.safetensors`` are loaded into the
        new partitions instead; the data order continues at the same global position when the
        global batch is unchanged; RNG streams (dropout) start from the saved rank 0's.
        """
        started = time.perf_counter()
        state = json.loads((path / STATE_NAME).read_text())
        self._check_identity(path, state)
        if state["world_size"] == self.world:
            self.engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            rng_file = path / f"rng-rank{self.rank:05d}.pt"
            state["reader"] = state["readers"][self.rank]
        else:
            self._load_trainable(path / TRAINABLE_NAME, state["adam_steps"])
            rng_file = path / "rng-rank00000.pt"
            saved_reader = state["readers"][0]  # None in a checkpoint taken between epochs
            state["reader"] = None if saved_reader is None else {**saved_reader, "rank": self.rank}
            log.warning("resuming a %d-rank checkpoint on %d rank(s): weights and Adam state are exact; "
                        "the data continues at the same global position if the global batch is unchanged",
                        state["world_size"], self.world)
        if self.engine.module.sharded_tables:  # resharded when the number of ranks changed
            load_shards(self.engine.module.tables, self.table_optimizer, path)
            if self.table_optimizer.schedule is not None:
                self.table_optimizer.schedule.last_epoch = state["table_schedule_step"]
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self._apply_learning_rate(state["config"])
        log.info("resumed from %s (stage step %d), loaded in %.2f s", path, state["step"], time.perf_counter() - started)
        self.resumed = state
        return state

    def _check_identity(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint of another model or data: its tables, adapters or shards differ."""
        saved = state.get("identity")
        if saved is None:
            log.warning("%s predates identity checks: not comparing its model and shards with this run's", path)
            return
        saved = {"id_tables": "dense", **saved}  # checkpoints from before sharded tables
        differences = [f"{key}: {saved[key]} in the checkpoint, {self.identity[key]} in this run"
                       for key in ("num_users", "num_items", "vocab_size", "shards", "id_tables")
                       if saved[key] != self.identity[key]]
        mine, theirs = self.identity["trainable"], saved["trainable"]
        only_saved, only_here = sorted(theirs.keys() - mine.keys()), sorted(mine.keys() - theirs.keys())
        reshaped = [f"{n} {tuple(theirs[n])} vs {tuple(mine[n])}" for n in sorted(mine.keys() & theirs.keys())
                    if theirs[n] != mine[n]]
        if only_saved or only_here or reshaped:
            differences.append(f"trainable parameters: {len(only_saved)} only in the checkpoint (e.g. "
                               f"{only_saved[:2]}), {len(only_here)} only in this run (e.g. {only_here[:2]}), "
                               f"{len(reshaped)} reshaped (e.g. {reshaped[:2]})")
        if differences:
            raise IncompatibleCheckpoint(
                f"cannot resume from {path}: it was saved by another model or data configuration ("
                + "; ".join(differences) + "). Resume with the settings it was saved with (its trainer_state.json "
                "holds them), or start a new run.dir")

    def _apply_learning_rate(self, saved_config: dict) -> None:
        """The learning rate of this run's config, not the one restored with the optimizer state:
        changing it on a resume is allowed, and logged."""
        if "lr" not in self.config.get(self.stage, {}):  # a stage without an optimizer of its own
            return
        lr, before = self.config[self.stage]["lr"], saved_config.get(self.stage, {}).get("lr")
        optimizers = [(compat.inner_optimizer(self.engine), self.engine.lr_scheduler)] if self.engine.optimizer else []
        if self.table_optimizer is not None:
            optimizers.append((self.table_optimizer, self.table_optimizer.schedule))
        for optimizer, schedule in optimizers:
            groups = optimizer.param_groups
            if schedule is not None:  # the schedule scales this run's rate from where it stood
                schedule.base_lrs = [lr] * len(groups)
            factors = [1.0] * len(groups) if schedule is None else [f(schedule.last_epoch) for f in schedule.lr_lambdas]
            for group, factor in zip(groups, factors):
                group["lr"] = lr * factor
        if before is not None and before != lr:
            log.warning("%s.lr is %g in this run and was %g when the checkpoint was saved: continuing with %g",
                        self.stage, lr, before, lr)

    def _load_trainable(self, path: Path, adam_steps: dict[str, int]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        from safetensors.torch import load_file

        saved = load_file(str(path))
        params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        missing = [n for n in params if f"param/{n}" not in saved]
        if missing:
            raise KeyError(f"{path} has no value for {missing[:3]}: it was saved by another model configuration")
        # The optimizer's fp32 copies and the module's own partitions are separate tensors under
        # ZeRO: the first forward reads the latter, Adam the former. Both get the saved values.
        with gathered_params(list(params.values()), modifier_rank=0), torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[f"param/{name}"].to(p.dtype))
        if self.engine.optimizer is None:
            return
        _create_adam_states(self.engine)
        compat.relink_optimizer_state(self.engine)
        for name, p in params.items():
            safe_set_full_fp32_param(p, saved[f"param/{name}"])
            for moment in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, saved[f"{moment}/{name}"], moment)
        _set_adam_steps(self.engine, adam_steps)


def _fp32_partitions(engine) -> list[tuple[str, torch.Tensor]]:
    """(model name, fp32 tensor that Adam keeps state for) of this rank."""
    groups = compat.inner_optimizer(engine).param_groups
    return [(groups[group]["model"], tensor) for group, tensor in compat.fp32_partitions(engine)]


def _adam_steps(engine) -> dict[str, int]:
    """Adam's step count per model (all of a model's partitions share it), agreed by all ranks:
    under ZeRO-1/2 a rank may hold no partition of a model. Collective."""
    state = compat.inner_optimizer(engine).state
    local = dict.fromkeys(MODELS, 0)
    for model, tensor in _fp32_partitions(engine):
        local[model] = max(local[model], int(state[tensor]["step"]) if "step" in state.get(tensor, {}) else 0)
    agreed = torch.tensor([local[m] for m in MODELS], dtype=torch.long)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return dict(zip(MODELS, agreed.tolist()))


def _create_adam_states(engine) -> None:
    """Adam creates its state on its first step; a resume on another world size fills it in
    before any step, so it is created here as that step would (zeros)."""
    state = compat.inner_optimizer(engine).state
    for _, tensor in _fp32_partitions(engine):
        if not state.get(tensor):
            state[tensor] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(tensor),
                             "exp_avg_sq": torch.zeros_like(tensor)}


def _set_adam_steps(engine, steps: dict[str, int]) -> None:
    state = compat.inner_optimizer(engine).state
    for model, tensor in _fp32_partitions(engine):
        state[tensor]["step"] = torch.tensor(float(steps.get(model, 0)))
