"""Ranking every item for users: what validation (finetune), evaluation and serving share.

Users are scored in fixed blocks (user_blocks), spread over the ranks, and items in blocks of
evaluate.item_block against a running top-k (model.cllm4rec.blocked_topk), so memory stays
bounded however many users and items; the same blocks on any number of ranks give bitwise the
same lists.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer.batching import Collator
from trainer.metrics import csr_rows

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
    for i in tqdm(range(rounds), desc="ranking users", disable=True if rank != 0 else None, leave=False):
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


