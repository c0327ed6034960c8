"""Small builders shared by tests: a tiny random LLaMA with a trained tokenizer, and toy data."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.attention import register_sdpa_varlen
from model.cllm4rec import CLLM4Rec, LossConfig
from model.lora import add_adapters
from model.tokenizer import IDTokenizer
from trainer.backbone import TINY_LLAMA, train_bpe_tokenizer

CORPUS = ["great shampoo smells nice and lathers well", "body wash for men, three pack",
          "would buy again; the brand is reliable", "mineral foundation with spf 15"] * 20
NUM_USERS, NUM_ITEMS = 6, 12


def tiny_tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=200)


def tiny_model(lora: bool = True, seed: int = 0, lambda_c: float = 1.0, attention: str = "sdpa_varlen"):
    base_tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(base_tok), **TINY_LLAMA)
    hf = LlamaForCausalLM(config)
    register_sdpa_varlen()
    hf.set_attn_implementation(attention)
    hf.requires_grad_(False)
    backbone = add_adapters(hf, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]) if lora else hf
    model = CLLM4Rec(backbone, len(base_tok), NUM_USERS, NUM_ITEMS, LossConfig(lambda_c=lambda_c, vocab_chunk=7),
                     attention=attention)
    tok = IDTokenizer(base_tok, NUM_USERS, NUM_ITEMS)
    return model, tok


def docs_collab():
    return [{"user": 0, "items": [1, 2, 3], "pos": 0}, {"user": 4, "items": [5, 7, 9, 11, 0], "pos": 1}]


def docs_content():
    return [{"kind": "review", "user": 1, "item": 2, "text": "great shampoo smells nice", "pos": 0},
            {"kind": "title", "user": None, "item": 5, "text": "body wash for men, three pack", "pos": 1}]


def write_tiny_checkpoint(out: Path) -> Path:
    from trainer.backbone import write_tiny_llama

    # Several safetensors files and an index, as real bases come: loading reads them file by file.
    return write_tiny_llama(str(out), tiny_tokenizer(), max_shard_size="100KB")


def toy_run_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """(shard folder, tiny base) for a short real run: 40 synthetic users, 30 items, shards of 40."""
    from data_shards.build import main_build
    from data_shards.synthetic import write_synthetic_cllm4rec

    data = write_synthetic_cllm4rec(tmp_path / "data", num_users=40, num_items=30, seed=1)
    main_build(data, tmp_path / "shards", docs_per_shard=40)
    return tmp_path / "shards", write_tiny_checkpoint(tmp_path / "tiny")


def launcher_env(**extra) -> dict:
    """This process's environment for a launcher subprocess, without the process-group
    settings that an in-process DeepSpeed test may have put there (its port is taken)."""
    inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    return env | {"DS_ACCELERATOR": "cpu", **extra}


class FixedReader:
    """Stands in for a ShardReader: the given document lists, one per step."""

    def __init__(self, batches):
        self.batches = batches
        self.steps_per_epoch = len(batches)

    def loader(self, epoch, start_step, stop_step, transform, num_workers):
        for step in range(start_step, stop_step):
            yield step, self.batches[step], transform(self.batches[step], epoch)


def toy_engine(base_dir, shards, *overrides: str):
    """(engine, optimizer, ID tokenizer) of CLLM4Rec on a tiny base for 40 users and 30 items:
    the quick-start config with `overrides`, 4 documents per rank, lr 0.01. The optimizer is the
    stage's trainer.optim.Optimizers (the engine's, and with model.id_tables=sharded the shards')."""
    import dataclasses

    from trainer.config import load_config
    from trainer.engine import build_engine, build_model, load_ds_config
    from trainer.optim import Optimizers

    cfg = load_config("configs/quickstart.yaml", [f"model.base_dir={base_dir}", f"data.shards={shards}", *overrides])
    ds_config = load_ds_config(cfg.run.deepspeed, 4)
    model, tok = build_model(cfg, ds_config, 40, 30)
    optimizers, _ = Optimizers.build(model, dataclasses.replace(cfg.pretrain, lr=0.01), total_steps=1)
    engine = build_engine(model, ds_config, optimizers.module)
    return engine, optimizers, tok


def write_tiny_gguf(path: Path, architecture: str = "llama") -> Path:
    """A tiny random LLaMA as a GGUF file in float32 (tied embeddings: no `output.weight`), with a
    byte-level BPE tokenizer, written with the `gguf` package as llama.cpp lays such files out."""
    import json

    import gguf
    import numpy as np

    from trainer.backbone import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)  # large enough to need merges
    state = json.loads(tok.backend_tokenizer.to_str())
    tokens = sorted(state["model"]["vocab"], key=state["model"]["vocab"].get)
    hidden, layers, ffn, heads, kv_heads = 64, 2, 128, 4, 2
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) for m in state["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                       f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn), f"blk.{i}.attn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_norm.weight": (hidden,)})
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def apt_install(packages: list[str], programs: list[str]) -> None:
    """apt-get install `packages` unless every one of `programs` is on PATH, or skip the test
    saying why that is impossible here."""
    import shutil

    import pytest

    if all(shutil.which(p) for p in programs):
        return
    missing = ", ".join(p for p in programs if not shutil.which(p))
    if os.geteuid() != 0:
        pytest.skip(f"{missing} not installed, and installing {' '.join(packages)} with apt needs root")
    if not shutil.which("apt-get"):
        pytest.skip(f"{missing} not installed, and there is no apt-get to install {' '.join(packages)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # an image without package lists
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not all(shutil.which(p) for p in programs):
        pytest.skip(f"installing {' '.join(packages)} with apt-get failed (status {done.returncode}): "
                    f"{(done.stdout + done.stderr)[-800:]}")


def batches(reader, epoch: int, start_step: int = 0, stop_step: int | None = None) -> list[list[dict]]:
    """This rank's documents of each step of `epoch`, read in this process."""
    return [docs for _, docs, _ in reader.loader(epoch, start_step, stop_step)]


def independent_metrics(recs: dict, heldout) -> dict:
    """Recall@20/40 and NDCG@100 of ranked lists (user -> items) against a held-out CSR matrix,
    computed here from the definitions, apart from trainer.metrics."""
    import math

    sums = {"recall@20": 0.0, "recall@40": 0.0, "ndcg@100": 0.0}
    users = 0
    for user in range(heldout.shape[0]):
        relevant = set(heldout.indices[heldout.indptr[user]:heldout.indptr[user + 1]].tolist())
        if not relevant:
            continue
        users += 1
        ranked = recs[user]
        for k in (20, 40):
            sums[f"recall@{k}"] += len(relevant & set(ranked[:k])) / min(k, len(relevant))
        dcg = sum(1 / math.log2(r + 2) for r, item in enumerate(ranked[:100]) if item in relevant)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(100, len(relevant))))
        sums["ndcg@100"] += dcg / idcg
    return {**{k: v / users for k, v in sums.items()}, "users": users}
