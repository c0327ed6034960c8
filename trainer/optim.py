"""One optimizer for both models, which only ever updates the model whose loss was computed.

The collaborative and content models alternate steps on one DeepSpeed engine. DeepSpeed
gives every trainable parameter a gradient slot on every step (zero when it took no part),
and Adam's momentum would still move those parameters. So each model's parameters form
their own param group, tagged with the model's name, and `step()` runs Adam on the active
model's groups only: the other model's weights and optimizer state stay exactly as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.lora import MODELS



def model_of(param_name: str) -> str:
    """Which model a trainable parameter of CLLM4Rec belongs to."""
    for model in MODELS:
        if param_name.startswith(f"tables.{model}_") or f".{model}." in param_name:
            return model
    raise ValueError(f"trainable parameter {param_name} belongs to neither model")


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    groups = {model: [] for model in MODELS}
    for name, param in module.named_parameters():
        if param.requires_grad:
            groups[model_of(name)].append(param)
    return [{"params": params, "model": model, "weight_decay": weight_decay}
            for model, params in groups.items() if params]


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """The learning-rate schedule of a stage, stepped by the DeepSpeed engine after every optimizer
    step (and saved in its checkpoints), or None for a constant rate without warmup (the paper's).
    cosine: linear warmup from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if schedule == "constant" and warmup_steps == 0:
        return None

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class AlternatingAdamW(torch.optim.AdamW):
    active_model: str = "collab"

    def __init__(self, params, **options):
        # The fused kernel reads and writes each weight and its two moments once per step; the
        # default per-tensor path makes several passes and full-size temporaries, which is most
        # of a paper-mode step's fixed cost on CPU (whole ID tables update every step).
        options.setdefault("fused", True)
        super().__init__(params, **options)

    def step(self, closure=None):
        inactive = [g for g in self.param_groups if g["model"] != self.active_model]
        held = [g["params"] for g in inactive]
        for group in inactive:
            group["params"] = []
        try:
            return super().step(closure)
        finally:
            for group, params in zip(inactive, held):
                group["params"] = params


class ShardAdam(AlternatingAdamW):
    """AlternatingAdamW over the row shards of the ID tables (model.sharded_tables), which live
    outside DeepSpeed: one param group per table, tagged with its model and table. A shard whose
    table took no part in the step steps on a zero gradient, as a dense table under DeepSpeed
    does, so the semantics are those of dense Adam. Lookups leave sparse gradients; they are made
    dense (shard-sized) here, one shard at a time.

    A shard's gradient is the sum of every rank's loss's gradient; DeepSpeed averages the module's
    gradients over the ranks, so the shards' are divided by the number of ranks too: the same
    update at any number of ranks, and Adam moments that carry over when it changes.
    """

    def __init__(self, tables, lr: float, eps: float = 1e-8, weight_decay: float = 0.0):
        groups = [{"params": [table.shard], "model": model_of(f"tables.{name}"), "table": name,
                   "weight_decay": weight_decay, "ranks": table.comm.world} for name, table in tables.items()]
        super().__init__(groups, lr=lr, eps=eps)
        self.schedule = None  # the stage's lr schedule (lr_scheduler), stepped with the shards

    def step(self, closure=None):
        for group in self.param_groups:
            if group["model"] != self.active_model:
                continue
            for shard in group["params"]:
                if shard.grad is None:
                    shard.grad = torch.zeros_like(shard)
                elif shard.grad.is_sparse:
                    shard.grad = shard.grad.to_dense()
                shard.grad.div_(group["ranks"])
        try:
            return super().step(closure)
        finally:
            self.zero_grad(set_to_none=True)
            if self.schedule is not None:
                self.schedule.step()

    def _shard_of(self, table: str) -> torch.Tensor:
        return next(g["params"][0] for g in self.param_groups if g["table"] == table)

    def state_of(self, table: str) -> dict:
        """Adam's state of one table's shard: step, exp_avg, exp_avg_sq (empty before its first step)."""
        return self.state.get(self._shard_of(table), {})

    def set_state(self, table: str, step: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        self.state[self._shard_of(table)] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg,
                                             "exp_avg_sq": exp_avg_sq}


@dataclass
class Optimizers:
    """What a training step updates: the module's trainable parameters through the DeepSpeed
    engine (`module`: LoRA, and the ID tables when they are dense; None when nothing of the
    module trains, as in paper mode with sharded tables) and the ID-table shards (`shards`, with
    model.id_tables=sharded). Both follow the stage's learning-rate schedule."""

    module: AlternatingAdamW | None
    shards: ShardAdam | None = None

    @classmethod
    def build(cls, model, section, total_steps: int) -> tuple["Optimizers", object]:
        """The optimizers of a stage (`section`: the pretrain or finetune config) and the module
        optimizer's lr schedule, which the DeepSpeed engine steps."""
        groups = param_groups(model, section.weight_decay)
        module = AlternatingAdamW(groups, lr=section.lr, eps=section.adam_eps) if groups else None
        schedule = lr_scheduler(module, section.lr_schedule, section.warmup_steps, total_steps) if module else None
        shards = None
        if model.sharded_tables:
            shards = ShardAdam(model.tables, section.lr, section.adam_eps, section.weight_decay)
            shards.schedule = lr_scheduler(shards, section.lr_schedule, section.warmup_steps, total_steps)
        return cls(module, shards), schedule

    def activate(self, model: str) -> None:
        for optimizer in (self.module, self.shards):
            if optimizer is not None:
                optimizer.active_model = model

    def forward(self, engine, task: str, batch: dict) -> dict:
        """The model's forward for a training step. When DeepSpeed trains nothing of the module
        (paper mode with sharded tables) its engine has no optimizer, and the engine's forward
        marks its outputs for engine.backward(), which needs one; the module is called directly
        (under ZeRO-3 its own hooks still gather the base's weights) and backward is plain."""
        return engine(task, batch) if self.module is not None else engine.module(task, batch)

    def step(self, engine, loss: torch.Tensor) -> None:
        """Backward and one update of the active model."""
        if self.module is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
        if self.shards is not None:
            self.shards.step()
