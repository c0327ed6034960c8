"""Run by tests/distributed/test_zero3.py under `deepspeed --num_gpus 2`.

1. The base loaded partitioned under ZeRO-3 (each rank reading only its slices of the sharded
   safetensors files) gathers back to exactly the weights on disk, and each rank holds only
   its partition.
2. QLoRA: the base in 4-bit nf4 with LoRA + ID tables trains under ZeRO-3 on both ranks.
3. ZeRO-2: a checkpoint taken when only one of the two models has stepped (the other has no
   Adam state yet) saves on both ranks without the collectives diverging.
"""
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.helpers import FixedReader, toy_engine
from trainer.batching import Collator
from trainer.checkpoint import Checkpointer
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_model, load_ds_config
from trainer.loop import Epoch, TrainLog, train_epoch


base_dir, shards, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
rank, world = init_distributed()
assert world == 2

cfg = load_config("configs/quickstart.yaml", [f"model.base_dir={base_dir}", f"data.shards={shards}"])
ds_config = load_ds_config(cfg.run.deepspeed, 4)
model, tok = build_model(cfg, ds_config, 40, 30)
on_disk = {}
for file in sorted(Path(base_dir).glob("*.safetensors")):
    on_disk.update(load_file(file))
base = model.backbone.get_base_model()
params = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
assert params.keys() == on_disk.keys(), sorted(params.keys() ^ on_disk.keys())
for name, param in params.items():
    assert param.ds_tensor.numel() < param.ds_numel, f"{name}: rank {rank} holds more than its partition"
    with deepspeed.zero.GatheredParameters([param]):
        assert torch.equal(param.data, on_disk[name]), f"{name} differs from the checkpoint after partitioned loading"
if rank == 0:
    print(f"PARTITIONED LOAD OK ({len(params)} weights)")

engine, optimizer, tok = toy_engine(base_dir, shards, "model.quantization=nf4")
linear = engine.module.backbone.get_base_model().model.layers[0].self_attn.q_proj.base_layer
assert type(linear).__name__ == "Linear4bit", type(linear)
col = Collator(tok, 0, 64, 50)
docs = {"content": [{"kind": "review", "user": rank, "item": 3, "text": "great shampoo smells nice", "pos": rank}],
        "collab": [{"user": 5 + rank, "items": [1, 2, 3], "pos": rank}]}
log = TrainLog(out, rank, log_every=1)
losses = {}
for task, make in (("content", col.content), ("collab", col.collab)):
    losses[task] = train_epoch(engine, optimizer, Epoch(FixedReader([docs[task]] * 3), make, task, task, label=task), log)
assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
dist.barrier()
if rank == 0:
    print(f"QLORA ZERO-3 OK {losses}")

engine, optimizer, tok = toy_engine(base_dir, shards, "run.deepspeed=configs/ds_zero2.json")
train_epoch(engine, optimizer, Epoch(FixedReader([docs["content"]]), Collator(tok, 0, 64, 50).content, "content",
                                     "content", label="content"), log)
saved = Checkpointer(engine, Path(out) / "zero2", 0, 2, {}).save(1, {}, None)
if rank == 0:
    assert (saved / "trainable.safetensors").is_file()
    print("ZERO-2 CHECKPOINT OK")
