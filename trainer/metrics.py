"""Ranking metrics for the evaluation protocol in docs/method.md.

Full ranking over all items, each user's train items excluded. Recall@k divides the hits by
min(k, #relevant); NDCG@k uses the ideal DCG over min(k, #relevant) positions with gain
1 / log2(rank + 1), rank starting at 1. Users without relevant items are skipped.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def csr_rows(csr, rows: Sequence[int] | None = None) -> list[np.ndarray]:
    """Column indices of each row of a scipy CSR matrix (all rows when `rows` is None)."""
    if rows is None:
        rows = range(csr.shape[0])
    return [csr.indices[csr.indptr[r]:csr.indptr[r + 1]] for r in rows]


class RankingAccumulator:
    """Sums per-user Recall@k / NDCG@k; `state()` is a flat vector that can be SUM-reduced."""

    def __init__(self, ks_recall: Sequence[int] = (20, 40), ks_ndcg: Sequence[int] = (100,)):
        self.ks_recall = tuple(int(k) for k in ks_recall)
        self.ks_ndcg = tuple(int(k) for k in ks_ndcg)
        self.max_k = max(self.ks_recall + self.ks_ndcg)
        # 1 / log2(rank + 1) for rank = 1..max_k
        self._gain = 1.0 / np.log2(np.arange(2, self.max_k + 2, dtype=np.float64))
        # layout: [recall sums..., ndcg sums..., number of users]
        self._state = np.zeros(len(self.ks_recall) + len(self.ks_ndcg) + 1, dtype=np.float64)

    def update(self, topk_items: np.ndarray, relevant: Sequence[np.ndarray]) -> None:
        topk_items = np.asarray(topk_items)
        if topk_items.ndim != 2 or topk_items.shape[1] < self.max_k:
            raise ValueError(f"topk_items must be (B, >= {self.max_k}), got {topk_items.shape}")
        if len(relevant) != topk_items.shape[0]:
            raise ValueError("one relevant array per row is required")
        nr = len(self.ks_recall)
        for row, rel in zip(topk_items, relevant):
            rel = np.asarray(rel)
            n_rel = len(rel)
            if n_rel == 0:
                continue
            hits = np.isin(row[: self.max_k], rel).astype(np.float64)
            for i, k in enumerate(self.ks_recall):
                self._state[i] += hits[:k].sum() / min(k, n_rel)
            for i, k in enumerate(self.ks_ndcg):
                dcg = (hits[:k] * self._gain[:k]).sum()
                idcg = self._gain[: min(k, n_rel)].sum()
                self._state[nr + i] += dcg / idcg
            self._state[-1] += 1

    def state(self) -> np.ndarray:
        return self._state.copy()

    def merge_state(self, state: np.ndarray) -> None:
        """Add another accumulator's state (same ks) into this one."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != self._state.shape:
            raise ValueError(f"state shape {state.shape} != {self._state.shape}")
        self._state += state

    @classmethod
    def from_state(cls, state: np.ndarray, ks_recall=(20, 40), ks_ndcg=(100,)) -> "RankingAccumulator":
        acc = cls(ks_recall, ks_ndcg)
        acc.merge_state(state)
        return acc

    def result(self) -> dict:
        users = int(round(self._state[-1]))
        denom = max(users, 1)
        out = {}
        for i, k in enumerate(self.ks_recall):
            out[f"recall@{k}"] = float(self._state[i] / denom)
        for i, k in enumerate(self.ks_ndcg):
            out[f"ndcg@{k}"] = float(self._state[len(self.ks_recall) + i] / denom)
        out["users"] = users
        return out


def topk_excluding(scores: torch.Tensor, exclude: Sequence[np.ndarray], k: int) -> torch.Tensor:
    """Top-k item ids per row (best first) with each row's `exclude` items set to -inf.

    Ties go to the lower item id. torch.topk's order among ties depends on k, the device and
    the build, and popularity scores are full of ties, so the candidates (every item scoring at
    least the k-th best score) are re-ranked with a stable sort to keep numbers reproducible.
    If k exceeds the number of non-excluded items, the tail holds excluded ones; if it exceeds
    the number of items, the rows are padded with -1 (no item).
    """
    if k > scores.shape[1]:
        top = topk_excluding(scores, exclude, scores.shape[1])
        return torch.cat([top, top.new_full((top.shape[0], k - scores.shape[1]), -1)], dim=1)
    scores = scores.detach().clone()
    if not scores.is_floating_point():
        scores = scores.double()
    rows = [np.full(len(e), i, dtype=np.int64) for i, e in enumerate(exclude)]
    cols = [np.asarray(e, dtype=np.int64) for e in exclude]
    if rows:
        r = torch.from_numpy(np.concatenate(rows)).to(scores.device)
        c = torch.from_numpy(np.concatenate(cols)).to(scores.device)
        scores[r, c] = float("-inf")
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    m = int((scores >= kth).sum(dim=1).max())
    cand = torch.sort(torch.topk(scores, m, dim=1).indices, dim=1).values  # ascending ids
    order = torch.sort(scores.gather(1, cand), dim=1, descending=True, stable=True).indices
    return cand.gather(1, order)[:, :k]


def rank_all_users(
    score_block_fn: Callable[[np.ndarray], torch.Tensor],
    num_users: int,
    train_csr,
    k: int = 100,
    block_size: int = 1024,
) -> np.ndarray:
    """Top-k items (train items excluded) for every user, scoring `block_size` users at a time."""
    out = np.empty((num_users, k), dtype=np.int64)
    for start in range(0, num_users, block_size):
        users = np.arange(start, min(start + block_size, num_users))
        scores = torch.as_tensor(score_block_fn(users))
        out[users] = topk_excluding(scores, csr_rows(train_csr, users), k).cpu().numpy()
    return out


def evaluate_topk(topk: np.ndarray, heldout_csr, ks_recall=(20, 40), ks_ndcg=(100,)) -> dict:
    """Metrics of per-user top lists (row u = user u) against the users' heldout items."""
    acc = RankingAccumulator(ks_recall, ks_ndcg)
    acc.update(topk, csr_rows(heldout_csr, range(topk.shape[0])))
    return acc.result()
