"""Run by tests/trainer/test_real_base.py under `deepspeed --num_gpus 2`: BASE_DIR SHARDS OUT.

Pretrain -> finetune -> evaluate under each DeepSpeed config that runs on a CPU, in one launch
(each launch costs ~20 s of imports): evaluation, which has no optimizer, included.
"""
import sys

from trainer import evaluate, finetune, pretrain
from trainer.config import load_config
from trainer.distributed import init_distributed

CONFIGS = ("ds_zero2", "ds_zero3_lowmem", "ds_zero3_bf16")

base_dir, shards, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
rank, world = init_distributed()
assert world == 2
for name in CONFIGS:
    cfg = load_config("configs/quickstart.yaml", [
        f"model.base_dir={base_dir}", f"data.shards={shards}", f"run.dir={out}/{name}",
        f"run.deepspeed=configs/{name}.json", "pretrain.max_steps_per_epoch=2", "pretrain.rounds=1",
        "finetune.epochs=2", "finetune.max_steps_per_epoch=2", "finetune.content_epochs=true",
        "data.max_text_tokens=24", "evaluate.recommendations=true", "evaluate.baselines=false",
        "run.log_every=1000"])
    pretrain.main(cfg)
    finetune.main(cfg)
    metrics = evaluate.main(cfg)
    if rank == 0:
        print(f"CONFIG OK {name} test recall@20={metrics['test']['recall@20']:.4f}", flush=True)
