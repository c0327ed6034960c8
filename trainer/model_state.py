"""Saving and loading what CLLM4Rec trains: the ID tables and the LoRA adapters.

Layout of a saved model state (a pretrain/finetune output folder, or finetune's best/):

    id_tables.safetensors      collab_user, collab_item, content_user, content_item
    adapters/collab/           PEFT adapter (adapter_config.json + adapter_model.safetensors)
    adapters/content/          PEFT adapter
    model_state.json           users, items, hidden size, LoRA on/off

The adapter folders load with plain `PeftModel.from_pretrained(base, "adapters/collab")`.
Under ZeRO-3 each rank holds a shard of every parameter (a tensor of shape (0,) outside
forward), so parameters are gathered first, by every rank, and written by rank 0.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.cllm4rec import CLLM4Rec
from model.lora import MODELS
from trainer import compat
from trainer.table_shards import export_tables, load_table_rows

TABLES = "id_tables.safetensors"


def gathered_params(params: list, modifier_rank: int | None = None):
    if any(compat.is_partitioned(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return nullcontext()


def trainable_state(model: CLLM4Rec) -> dict[str, torch.Tensor]:
    """Full CPU fp32 copies of every trainable parameter. Collective under ZeRO-3: call on all ranks."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with gathered_params(list(named.values())):
        return {n: p.detach().float().cpu().clone() for n, p in named.items()}


def save_model_state(model: CLLM4Rec, out_dir: Path, rank: int) -> None:
    """Collective. Sharded tables are streamed to rank 0 one shard at a time (export_tables)."""
    state = trainable_state(model)
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if model.sharded_tables:
        export_tables(model.tables, out_dir / TABLES, rank, model.tables["collab_user"].comm.group)
    if rank != 0:
        return
    if not model.sharded_tables:
        save_file({n.removeprefix("tables.").removesuffix(".weight"): t for n, t in state.items()
                   if n.startswith("tables.")}, str(out_dir / TABLES))
    if model.lora:
        adapters = {n.removeprefix("backbone."): t for n, t in state.items() if n.startswith("backbone.")}
        model.backbone.save_pretrained(str(out_dir / "adapters"), selected_adapters=list(MODELS),
                                       state_dict=adapters)
    meta = {"num_users": model.num_users, "num_items": model.num_items, "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size, "lora": model.lora}
    (out_dir / "model_state.json").write_text(json.dumps(meta, indent=2))


def load_model_state(model: CLLM4Rec, state_dir: Path) -> None:
    """Copy a saved state into a built model: before DeepSpeed wraps it, or, for evaluation only
    (no optimizer holding copies), after, as evaluate does for its ensemble members."""
    state_dir = Path(state_dir)
    meta_path = state_dir / "model_state.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{state_dir} holds no saved model state (model_state.json); "
                                "run the pretrain/finetune stage first or fix the path")
    meta = json.loads(meta_path.read_text())
    if (meta["num_users"], meta["num_items"]) != (model.num_users, model.num_items):
        raise ValueError(f"{state_dir}: saved for {meta['num_users']} users x {meta['num_items']} items, "
                         f"but the data has {model.num_users} x {model.num_items}")
    if meta["lora"] != model.lora:
        raise ValueError(f"{state_dir}: saved with LoRA {'on' if meta['lora'] else 'off'}, but lora.r says "
                         f"{'on' if model.lora else 'off'}; use the same lora settings as the saved run")
    if model.sharded_tables:  # each rank reads its own rows only
        load_table_rows(model.tables, state_dir / TABLES)
        values = {}
    else:
        values = {f"tables.{k}.weight": v for k, v in load_file(str(state_dir / TABLES)).items()}
    if model.lora:
        from peft.utils import load_peft_weights

        for adapter in MODELS:
            weights = load_peft_weights(str(state_dir / "adapters" / adapter))
            values.update(_adapter_keys(model, weights, adapter))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(values))
    if missing:
        raise KeyError(f"{state_dir}: no saved values for {len(missing)} parameters, e.g. {missing[:3]}")
    with gathered_params(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, param in params.items():
            if param.shape != values[name].shape:
                raise ValueError(f"{state_dir}: {name} has shape {tuple(values[name].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(values[name].to(param.dtype))


def _adapter_keys(model: CLLM4Rec, weights: dict, adapter: str) -> dict:
    """PEFT saves `...lora_A.weight`; the live module names it `backbone....lora_A.<adapter>.weight`."""
    out = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.{adapter}.weight")
        out[f"backbone.{key}"] = tensor
    return out
