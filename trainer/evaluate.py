"""Evaluation recipe: one forward pass per user, full ranking over all items.

    setup:  process group, shards, model with the saved ID tables + adapters, DeepSpeed engine
    rank:   prompt = all train items (order fixed by the seed) + `, user_i will interact with`;
            the rec head scores every item; train items are excluded; top-100 per user.
            Users are scored in fixed blocks, spread over the ranks, and items in blocks of
            evaluate.item_block, keeping a running top-100 (model.cllm4rec.blocked_topk), so
            memory stays bounded however many users and items; the top lists are gathered on
            every rank.
    save:   <run.dir>/metrics.json (Recall@20, Recall@40, NDCG@100 and the user count for
            val and test) and, on request, <run.dir>/recommendations.jsonl
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_shards.reader import load_index, load_split
from trainer.batching import Collator
from trainer.config import Config
from trainer.engine import (build_engine, build_model, init_distributed, load_ds_config, report_resources,
                            seed_everything)
from trainer.baselines import format_table, run_baselines
from trainer.metrics import csr_rows, evaluate_topk
from trainer.model_state import load_model_state

log = logging.getLogger("cllm4rec")
TOP_K = 100


def user_blocks(num_users: int, batch_size: int) -> list[np.ndarray]:
    """Users in blocks of `batch_size` consecutive ids: the forward passes of evaluation. The same
    blocks on any number of ranks (and in `cllm4rec recommend`) give bitwise the same scores."""
    return [np.arange(start, min(start + batch_size, num_users)) for start in range(0, num_users, batch_size)]


@torch.no_grad()
def rank_block(model, collator: Collator, train_csr, users: np.ndarray, k: int = TOP_K,
               item_block: int = 0) -> np.ndarray:
    """Top-k items (train items excluded) of each user of one block, shape (len(users), k),
    scored `item_block` items at a time (0: all at once). Equals trainer.metrics.topk_excluding
    on the full score matrix."""
    history = csr_rows(train_csr, users)
    batch = collator.score(users.tolist(), [h.tolist() for h in history])
    batch["exclude_rows"] = torch.from_numpy(np.repeat(np.arange(len(users)), [len(h) for h in history]))
    batch["exclude_cols"] = torch.from_numpy(np.concatenate(history).astype(np.int64) if len(history) else
                                             np.zeros(0, dtype=np.int64))
    batch["k"], batch["item_block"] = k, item_block
    return model("topk", batch)["items"].cpu().numpy()


@torch.no_grad()
def rank_users(engine, collator: Collator, train_csr, batch_size: int, k: int = TOP_K,
               item_block: int = 0) -> np.ndarray:
    """Top-k items (train items excluded) for every user, shape (num_users, k), on every rank.

    Rank r scores blocks r, r+W, ... (see user_blocks). Every rank runs the same number of
    forward passes (ZeRO-3 gathers parameters with collectives): a rank short of a block
    scores one again and drops the result.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = user_blocks(train_csr.shape[0], batch_size)
    mine = list(range(rank, len(blocks), world))
    rounds = -(-len(blocks) // world)
    was_training = engine.training
    engine.eval()
    tops = {}
    for i in tqdm(range(rounds), desc="ranking users", disable=rank != 0, leave=False):
        block = mine[i] if i < len(mine) else (mine[-1] if mine else 0)
        top = rank_block(engine, collator, train_csr, blocks[block], k, item_block)
        if i < len(mine):
            tops[block] = top
    if was_training:
        engine.train()
    gathered = [None] * world
    dist.all_gather_object(gathered, tops)
    merged = {b: top for part in gathered for b, top in part.items()}
    return np.concatenate([merged[b] for b in range(len(blocks))])


def write_recommendations(topk: np.ndarray, path: Path) -> None:
    with open(path, "w") as f:
        for user, items in enumerate(topk):
            f.write(json.dumps({"user": user, "items": [int(i) for i in items if i >= 0]}) + "\n")


def main(cfg: Config) -> dict:
    # ----- setup -----
    started = time.time()
    rank, world = init_distributed(cfg.run.collective_timeout_s)
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    checkpoint = Path(cfg.evaluate.checkpoint or run_dir / "finetune")
    index = load_index(cfg.data.shards)
    ds_config = load_ds_config(cfg.run.deepspeed, cfg.evaluate.batch_size)
    model, tokenizer = build_model(cfg, ds_config, index["num_users"], index["num_items"])
    load_model_state(model, checkpoint)
    engine = build_engine(model, ds_config)
    collator = Collator.from_config(tokenizer, cfg)
    splits = {name: load_split(cfg.data.shards, name) for name in ("train", "val", "test")}
    train = splits["train"]
    log.info("evaluating %s on %d users x %d items, %d rank(s)", checkpoint, train.shape[0], train.shape[1], world)

    # ----- rank -----
    topk = rank_users(engine, collator, train, cfg.evaluate.batch_size, item_block=cfg.evaluate.item_block)
    metrics = {name: evaluate_topk(topk, splits[name]) for name in cfg.evaluate.splits}

    # ----- save -----
    report_resources(run_dir / "evaluate", "evaluate", started)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint), **metrics}, indent=2))
        if cfg.evaluate.recommendations:
            write_recommendations(topk, run_dir / "recommendations.jsonl")
        rows = {"CLLM4Rec": metrics}
        if cfg.evaluate.baselines:
            base = run_baselines(train, splits["val"], splits["test"], log=log.info)
            rows = {"popularity": base["popularity"], f"EASE (lambda={base['ease']['lambda']})": base["ease"], **rows}
        for split in cfg.evaluate.splits:
            print(f"{split}:\n" + format_table({name: result[split] for name, result in rows.items()}))
        log.info("wrote %s", run_dir / "metrics.json")
    return metrics
