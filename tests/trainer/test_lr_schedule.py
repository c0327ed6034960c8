"""The learning-rate schedule switch (beyond the paper): hand-computed factors, and the DeepSpeed
engine stepping it after every optimizer step."""
import math

import pytest
import torch

from tests.helpers import toy_run_inputs
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.optim import lr_scheduler


def _factors(schedule, warmup, total, steps):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=2.0)
    scheduler = lr_scheduler(optimizer, schedule, warmup, total)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()
    return out


def test_constant_without_warmup_is_no_scheduler():
    assert lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "constant", 0, 10) is None


def test_warmup_then_cosine_by_hand():
    # warmup 2 of 6 steps: 1/2, 2/2, then cos over the 4 remaining steps: 1, cos(pi/4)..., 0 at step 6.
    got = _factors("cosine", 2, 6, 7)
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert got == pytest.approx(want)
    assert _factors("constant", 3, 10, 5) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ValueError, match="finetune.lr_schedule must be one of constant, cosine, got 'linear'"):
        load_config("configs/quickstart.yaml", ["finetune.lr_schedule=linear"])
    with pytest.raises(ValueError, match="pretrain.warmup_steps must be >= 0"):
        load_config("configs/quickstart.yaml", ["pretrain.warmup_steps=-1"])


def test_the_engine_steps_the_schedule(tmp_path):
    from data_shards.reader import ShardReader
    from trainer.batching import Collator

    from trainer.engine import build_engine, build_model, load_ds_config
    from trainer.optim import AlternatingAdamW, param_groups

    shards, base = toy_run_inputs(tmp_path)
    init_distributed()
    cfg = load_config("configs/quickstart.yaml", [f"model.base_dir={base}", f"data.shards={shards}"])
    ds_config = load_ds_config(cfg.run.deepspeed, 4)
    model, tok = build_model(cfg, ds_config, 40, 30)
    optimizer = AlternatingAdamW(param_groups(model, 0.0), lr=0.01)
    engine = build_engine(model, ds_config, optimizer, lr_scheduler(optimizer, "cosine", 1, 4))
    reader = ShardReader(shards, "collab", 4, 0, 1, 0)
    seen = []
    for _, _, batch in reader.loader(0, 0, 3, Collator(tok, 0, 32, 50).collab):
        optimizer.active_model = "collab"
        engine.backward(engine("collab", batch)["loss"])
        engine.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.01 * f for f in _factors("cosine", 1, 4, 4)[1:]])
