"""One optimizer for both models, which only ever updates the model whose loss was computed.

The collaborative and content models alternate steps on one DeepSpeed engine. DeepSpeed
gives every trainable parameter a gradient slot on every step (zero when it took no part),
and Adam's momentum would still move those parameters. So each model's parameters form
their own param group, tagged with the model's name, and `step()` runs Adam on the active
model's groups only: the other model's weights and optimizer state stay exactly as they were.
"""
from __future__ import annotations

import math

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
