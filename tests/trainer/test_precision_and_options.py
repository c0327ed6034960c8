"""Engine options in one process (ZeRO-3, world size 1): gradient checkpointing, bf16, the
attention choice, the MFU convention, and the errors for combinations that cannot work."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from data_shards.build import main_build
from data_shards.reader import ShardReader
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.helpers import write_tiny_checkpoint
from trainer.backbone import choose_attention
from trainer.batching import Collator
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine, build_model, check_supported, load_ds_config
from trainer.resources import MALLOC_ENVIRONMENT
from trainer.loop import Epoch, TrainLog, train_epoch
from trainer.optim import AlternatingAdamW, param_groups
from trainer.throughput import Throughput, flops_per_token


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("options")
    data = write_synthetic_cllm4rec(tmp / "data", num_users=40, num_items=30, seed=1)
    main_build(data, tmp / "shards")
    write_tiny_checkpoint(tmp / "tiny")
    return tmp


def _train(tmp, run, overrides, steps=4, plan=("content", "collab")):
    cfg = load_config("configs/quickstart.yaml", [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}",
                                                  "lora.dropout=0.0", *overrides])
    init_distributed()
    ds_config = load_ds_config(cfg.run.deepspeed, 8)
    torch.manual_seed(0)
    model, tok = build_model(cfg, ds_config, 40, 30)
    optimizer = AlternatingAdamW(param_groups(model, 0.0), lr=0.01)
    engine = build_engine(model, ds_config, optimizer)
    col = Collator(tok, 0, 32, 50)
    (tmp / run).mkdir(exist_ok=True)
    log = TrainLog(tmp / run, rank=0, log_every=1000)
    for epoch, task in enumerate(plan):
        reader = ShardReader(tmp / "shards", task, 8, 0, 1, 0)
        train_epoch(engine, optimizer, Epoch(reader, getattr(col, task), task, task, epoch, task, max_steps=steps), log)
    log.close()
    return [json.loads(line)["loss"] for line in (tmp / run / "train_log.jsonl").read_text().splitlines()]


def test_gradient_checkpointing_gives_the_same_losses(setup):
    plain = _train(setup, "plain", [])
    checkpointed = _train(setup, "checkpointed", ["model.gradient_checkpointing=true"])
    assert len(plain) == 8
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def test_lowmem_config_with_checkpointing_trains_the_same_losses(setup):
    plain = _train(setup, "plain-for-lowmem", [])
    lowmem = _train(setup, "lowmem", ["run.deepspeed=configs/ds_zero3_lowmem.json", "model.gradient_checkpointing=true"])
    assert lowmem == pytest.approx(plain, rel=1e-6)


def test_bf16_trains_stably_next_to_fp32(setup):
    fp32 = _train(setup, "fp32", [], steps=10, plan=("collab",))
    bf16 = _train(setup, "bf16", ["run.deepspeed=configs/ds_zero3_bf16.json"], steps=10, plan=("collab",))
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert sum(bf16[-3:]) < sum(bf16[:3]), f"bf16 loss did not go down: {bf16}"
    assert bf16 == pytest.approx(fp32, rel=0.03)


@pytest.mark.parametrize("overrides,ds_changes,message", [
    (["model.quantization=nf4"], {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "cannot be offloaded"),
    (["model.quantization=nf4"], {"fp16": {"enabled": True}}, "use bf16 or fp32"),
    (["model.attn_implementation=flash_attention_2"], {}, "needs a CUDA GPU"),
    ([], {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ([], {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "not both"),
    (["model.id_tables=sharded"], {"fp16": {"enabled": True}}, "loss scaling does not see the table shards"),
    (["model.id_tables=sharded"], {"gradient_clipping": 1.0}, "clipping norm would leave out the table shards"),
    (["model.id_tables=sharded"], {"gradient_accumulation_steps": 4}, "gradient_accumulation_steps > 1"),
])
def test_unsupported_combinations_fail_before_loading(overrides, ds_changes, message):
    cfg = load_config("configs/quickstart.yaml", ["model.base_dir=does-not-exist", *overrides])
    ds_config = {"zero_optimization": {"stage": 3}, **ds_changes}
    with pytest.raises(ValueError, match=message):
        check_supported(cfg, ds_config)


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ValueError, match="model.quantization"):
        load_config("configs/quickstart.yaml", ["model.quantization=int3"])


def test_unknown_attention_is_a_config_error_that_lists_the_choices():
    with pytest.raises(ValueError, match="model.attn_implementation: unknown value 'flash'; use one of auto, sdpa_varlen"):
        load_config("configs/quickstart.yaml", ["model.attn_implementation=flash"])


def test_attention_choice_on_cpu_is_sdpa_varlen_and_logged(setup, caplog):
    from trainer.backbone import load_backbone

    assert choose_attention("auto", torch.bfloat16) == "sdpa_varlen"  # no CUDA here
    assert choose_attention("eager") == "eager"
    with caplog.at_level(logging.INFO):
        model, attention = load_backbone(str(setup / "tiny"))
    assert attention == "sdpa_varlen" and "attention implementation: sdpa_varlen" in caplog.text
    assert model.config._attn_implementation == "sdpa_varlen"


def test_mfu_follows_the_stated_flop_convention():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    # per layer: q and o 64x64 each, k and v 64x32 each, MLP 3 x 64x128; head 100 rows x 64
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert flops_per_token(config, 100) == 4 * (2 * per_layer + 100 * 64)
    meter = Throughput(config, vocab_size=100, num_items=30, world=2, peak_tflops=1e-6, source="test")
    rates = meter.rates("content", tokens=500, docs=10, seconds=2.0)
    assert rates["tokens_per_s"] == 250.0 and rates["docs_per_s"] == 5.0
    assert rates["mfu"] == pytest.approx(4 * (2 * per_layer + 100 * 64) * 500 / 2.0 / (2 * 1e6), rel=1e-4)
    assert meter.rates("collab", 500, 10, 2.0)["mfu"] < rates["mfu"]  # 30 item rows < 100 vocabulary rows


def test_host_allocator_follows_the_zero_stage_unless_the_environment_sets_it():
    # In a process of its own: the choice holds for the rest of the process.
    code = ("from trainer.resources import tune_host_allocator as t; "
            "print(t(zero3=True)); print(t(zero3=False))")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENVIRONMENT}
    stage3, stage2 = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.splitlines()
    assert "64 KiB" in stage3 and "ZeRO-3" in stage3
    assert "from the heap" in stage2
    told = subprocess.run([sys.executable, "-c", code], env=dict(env, MALLOC_MMAP_THRESHOLD_="131072"),
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert told == ["as set in the environment (MALLOC_MMAP_THRESHOLD_)"] * 2
