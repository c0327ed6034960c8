"""The private DeepSpeed and transformers internals wrapped by trainer/compat.py still have the
shape the project relies on. A failure here names the entry to revisit after an upgrade."""
from types import SimpleNamespace

import deepspeed
import pytest
import torch
from transformers import LlamaConfig

from tests.helpers import toy_run_inputs
from trainer import compat
from trainer.batching import Collator
from trainer.distributed import init_distributed


def test_deepspeed_shm_switch_exists():
    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__, \
        "compat.disable_shm_comm: DeepSpeed no longer lists deepspeed_shm_comm in ops.__compatible_ops__"


@pytest.mark.parametrize("config", ["ds_zero2.json", "ds_zero3.json"])
def test_zero_optimizer_internals(tmp_path, config):
    from tests.helpers import toy_engine

    shards, base = toy_run_inputs(tmp_path)
    init_distributed()
    engine, optimizer, tok = toy_engine(base, shards, f"run.deepspeed=configs/{config}")
    groups = compat.inner_optimizer(engine).param_groups
    assert {g["model"] for g in groups} == {"collab", "content"}, "compat.inner_optimizer: not the client optimizer"
    partitions = compat.fp32_partitions(engine)
    assert partitions, f"compat.fp32_partitions found no fp32 partitions under {config}"
    for group, tensor in partitions:
        assert 0 <= group < len(groups) and tensor.dtype == torch.float32, (group, tensor.dtype)
    # One step of one model, then the other model's state views must be linkable.
    from data_shards.reader import ShardReader

    reader = ShardReader(shards, "collab", 4, 0, 1, 0)
    _, _, batch = next(reader.loader(0, 0, 1, Collator(tok, 0, 32, 50).collab))
    optimizer.activate("collab")
    out = engine("collab", batch)
    engine.backward(out["loss"])
    engine.step()
    compat.relink_optimizer_state(engine)
    stepped = [t for g, t in partitions if groups[g]["model"] == "collab"]
    state = compat.inner_optimizer(engine).state
    assert all("exp_avg" in state[t] for t in stepped), "Adam keeps its state under other tensors than fp32_partitions"
    if config == "ds_zero3.json":
        param = next(p for p in engine.module.parameters() if p.requires_grad)
        partition, start, end = compat.partition_of(param)
        assert partition.numel() == param.ds_tensor.ds_numel and 0 <= start <= end <= param.ds_numel


def test_transformers_internals(tmp_path):
    assert "llama" in compat.gguf_architectures()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50)
    config._attn_implementation = "sdpa"
    assert compat.attention_of(config) == "sdpa", "compat.attention_of: config._attn_implementation is gone"

    model = SimpleNamespace(hf_quantizer=object(), config=SimpleNamespace(quantization_config={"quant_method": "gguf"}))
    compat.detach_gguf_quantizer(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    # The ZeRO-3 build context enters every piece (imports included) and leaves cleanly.
    init_distributed()
    with compat.zero3_build_context({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
        layer = torch.nn.Linear(4, 4)
    assert hasattr(layer.weight, "ds_id"), "compat.zero3_build_context: parameters are not partitioned"

