"""Run by tests/trainer/test_real_base.py under `deepspeed --num_gpus 2`: BASE_DIR [BASE_DIR ...].

Each base is loaded partitioned under ZeRO-3 (every rank reads only its slices of the
safetensors files). Gathered back, every weight equals transformers' own load of the folder bit
for bit; a tied head is the input embedding; and the LM loss of a fixed text through the
ZeRO-3 engine equals transformers' to 1e-5.
"""
import json
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.backbone import load_backbone
from trainer.distributed import init_distributed

TEXT = ("This shampoo leaves my hair soft and it smells great. The bottle lasts for months, and the price is "
        "fair for the quality. I would buy it again.")

rank, world = init_distributed()
assert world == 2
with open("configs/ds_zero3.json") as f:
    ds_config = {**json.load(f), "train_micro_batch_size_per_gpu": 1, "train_batch_size": 2}
for base_dir in [a for a in sys.argv[1:] if not a.startswith("--local_rank")]:
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    expected = dict(reference.named_parameters())
    model, _ = load_backbone(base_dir, "sdpa", torch.float32, zero3_config=ds_config)
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys(), sorted(params.keys() ^ expected.keys())
    tied = bool(model.config.tie_word_embeddings)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    for name, param in params.items():
        assert param.ds_tensor.numel() < param.ds_numel, f"{name}: rank {rank} holds more than its partition"
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.data, expected[name].data), f"{base_dir}: {name} differs from transformers' load"
    ids = AutoTokenizer.from_pretrained(base_dir)(TEXT, return_tensors="pt").input_ids
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    with torch.no_grad():
        loss = engine(input_ids=ids, labels=ids).loss.item()
        want = reference(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - want) < 1e-5, (loss, want)
    if rank == 0:
        print(f"TIED LOAD OK {base_dir} tied={tied} weights={len(params)} loss={loss:.6f} transformers={want:.6f}")
