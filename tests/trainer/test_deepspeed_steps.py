"""Alternating steps under a real DeepSpeed ZeRO-3 engine (world size 1, in this process).

DeepSpeed gives every trainable parameter a gradient slot on every step, so this is where a
parameter could move on a step whose loss does not involve it.
"""
import deepspeed
import pytest
import torch

from data_shards.build import main_build
from data_shards.reader import ShardReader
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.helpers import write_tiny_checkpoint
from trainer.batching import Collator
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine, build_model, load_ds_config
from trainer.loop import Epoch, TrainLog, train_epoch
from trainer.optim import AlternatingAdamW, param_groups


def _all_params(module):
    named = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
        return {n: p.detach().clone() for n, p in named.items()}


@pytest.mark.parametrize("lora_r", [4, 0])
def test_zero3_steps_move_only_the_active_model_and_never_the_base(tmp_path, lora_r):
    data = write_synthetic_cllm4rec(tmp_path / "data", num_users=40, num_items=30, seed=1)
    shards = tmp_path / "shards"
    main_build(data, shards)
    base = write_tiny_checkpoint(tmp_path / "tiny")
    cfg = load_config("configs/quickstart.yaml", [f"model.base_dir={base}", f"data.shards={shards}",
                                                  f"run.dir={tmp_path / 'run'}", f"lora.r={lora_r}",
                                                  "lora.dropout=0.1"])
    init_distributed()
    ds_config = load_ds_config(cfg.run.deepspeed, 8)
    model, tok = build_model(cfg, ds_config, 40, 30)
    optimizer = AlternatingAdamW(param_groups(model, weight_decay=0.01), lr=0.01)
    engine = build_engine(model, ds_config, optimizer)
    col = Collator(tok, 0, 32, 50)
    readers = {s: ShardReader(shards, s, 8, 0, 1, 0) for s in ("collab", "content", "rec")}
    log = TrainLog(tmp_path, rank=0, log_every=100)

    names = set(_all_params(engine.module))
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    collab = {n for n in trainable if "collab" in n}
    content = trainable - collab
    if lora_r == 0:
        assert len(trainable) == 4 and all(n.startswith("tables.") for n in trainable)
    start = _all_params(engine.module)
    plan = [("collab", "collab", col.collab), ("content", "content", col.content), ("rec", "collab", col.rec),
            ("collab", "collab", col.collab), ("content", "content", col.content)]
    for epoch, (task, owner, make) in enumerate(plan):
        before = _all_params(engine.module)
        stream = "rec" if task == "rec" else task
        train_epoch(engine, optimizer, Epoch(readers[stream], make, task, owner, epoch, task, max_steps=2), log)
        after = _all_params(engine.module)
        moved = {n for n in names if not torch.equal(before[n], after[n])}
        expected = collab if owner == "collab" else content
        assert moved == expected, f"{task} step: moved {sorted(moved ^ expected)[:5]} unexpectedly"
    end = _all_params(engine.module)
    assert all(torch.equal(start[n], end[n]) for n in names - trainable), "the frozen base changed"
