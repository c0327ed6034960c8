"""Popularity and EASE baselines under the evaluation protocol in docs/method.md, and the
fusion of rankings: several models' (beyond the paper, `evaluate.ensemble`) and a model's with
EASE's (beyond the paper, `evaluate.ease_fusion`).

Both validation and test rank items from the train history only, with only the train items
excluded, so one top-k list per user serves both splits.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from model.baselines import EASE, popularity_scores
from trainer.metrics import evaluate_topk, rank_all_users

# Metric used to pick EASE's lambda and the fusion weight on validation.
LAMBDA_SELECTION_METRIC = "recall@20"
# Reciprocal-rank fusion's constant (Cormack, Clarke and Buettcher, SIGIR 2009): an item at
# rank r of a list scores 1 / (RRF_K + r), so the head of a list does not drown the other list.
RRF_K = 60


def _rank(score_block_fn, train, k: int) -> np.ndarray:
    return rank_all_users(score_block_fn, train.shape[0], train, k=k)


def run_baselines(
    train,
    val,
    test,
    lambdas: Sequence[float] = (1, 5, 10, 20, 50, 100, 200, 500, 1000),
    k: int = 100,
    log: Callable[[str], None] = print,
    ease_depth: int = 0,
) -> dict:
    """Popularity and EASE (lambda chosen by validation Recall@20) on val and test. With
    `ease_depth`, the chosen EASE's top lists that deep (users x ease_depth) are returned too,
    under results["ease"]["topk"], ranked once after the sweep."""
    train = train.tocsr()
    results: dict = {}

    pop = torch.from_numpy(popularity_scores(train))
    topk = _rank(lambda users: pop.expand(len(users), -1), train, k)
    results["popularity"] = {"val": evaluate_topk(topk, val), "test": evaluate_topk(topk, test)}
    log(f"popularity: val {results['popularity']['val']}  test {results['popularity']['test']}")

    best = None
    sweep = {}
    for lam in lambdas:
        ease = EASE(lam).fit(train)
        topk = _rank(lambda users: torch.from_numpy(ease.score(train[users])), train, k)
        val_m = evaluate_topk(topk, val)
        sweep[lam] = val_m
        log(f"EASE lambda={lam}: val {val_m}")
        if best is None or val_m[LAMBDA_SELECTION_METRIC] > best[1][LAMBDA_SELECTION_METRIC]:
            best = (lam, val_m, evaluate_topk(topk, test), ease)
    lam, val_m, test_m, ease = best
    log(f"EASE chosen lambda={lam} (by val {LAMBDA_SELECTION_METRIC}): test {test_m}")
    results["ease"] = {
        "lambda": lam,
        "selected_by": f"val {LAMBDA_SELECTION_METRIC}",
        "val": val_m,
        "test": test_m,
        "val_sweep": sweep,
    }
    if ease_depth:
        results["ease"]["topk"] = _rank(lambda users: torch.from_numpy(ease.score(train[users])), train, ease_depth)
    results["ease_lambda"] = lam
    return results


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], weights: Sequence[float], train,
                           k: int = 100) -> np.ndarray:
    """Top-k per user of the weighted reciprocal-rank fusion of rankings (users x depth each,
    best first, -1 = no item): item i scores sum_j w_j / (RRF_K + r_j(i)), ranks from 1, a list
    that does not hold i adds nothing; ties go to the lower item id. The user's train items (CSR
    `train`) are left out, also where a list deeper than the unseen items ends with them. Rows
    with fewer than k candidates are padded with -1."""
    users = np.arange(rankings[0].shape[0])
    parts = []
    for topk, weight in zip(rankings, weights, strict=True):
        ranks = np.broadcast_to(np.arange(1, topk.shape[1] + 1), topk.shape)
        keep = topk >= 0
        parts.append((np.broadcast_to(users[:, None], topk.shape)[keep], topk[keep], weight / (RRF_K + ranks[keep])))
    user, item, score = (np.concatenate(x) for x in zip(*parts))
    train = train.tocsr()
    seen = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr)) * train.shape[1] + train.indices
    key = user * train.shape[1] + item
    unseen = ~np.isin(key, seen)
    # one entry per (user, item): sum the two lists' contributions
    pairs, where = np.unique(key[unseen], return_inverse=True)
    score = np.bincount(where, weights=score[unseen])
    user, item = np.divmod(pairs, train.shape[1])
    order = np.lexsort((item, -score, user))  # by user, then score descending, then item id
    user, item = user[order], item[order]
    starts = np.searchsorted(user, users)
    position = np.arange(len(user)) - starts[user]
    fused = np.full((len(users), k), -1, dtype=np.int64)
    keep = position < k
    fused[user[keep], position[keep]] = item[keep]
    return fused


def fuse_with_ease(model_topk: np.ndarray, ease_topk: np.ndarray, train, val, test, weights: Sequence[float],
                   k: int = 100, log: Callable[[str], None] = print) -> dict:
    """The model's ranking fused with EASE's (reciprocal_rank_fusion), the EASE weight chosen by
    validation Recall@20 from `weights`; test is read once, with the chosen weight. Returns the
    chosen weight, its val and test metrics, every weight's val metrics and the fused top-k."""
    best = None
    sweep = {}
    for weight in map(float, weights):
        fused = reciprocal_rank_fusion([model_topk, ease_topk], [1.0 - weight, weight], train, k)
        sweep[weight] = evaluate_topk(fused, val)
        log(f"fusion with EASE, EASE weight {weight}: val {sweep[weight]}")
        if best is None or sweep[weight][LAMBDA_SELECTION_METRIC] > best[1][LAMBDA_SELECTION_METRIC]:
            best = (weight, sweep[weight], fused)
    weight, val_m, fused = best
    test_m = evaluate_topk(fused, test)
    log(f"fusion with EASE: chosen EASE weight {weight} (by val {LAMBDA_SELECTION_METRIC}): test {test_m}")
    return {"ease_weight": weight, "selected_by": f"val {LAMBDA_SELECTION_METRIC}", "rrf_k": RRF_K,
            "depth": int(min(model_topk.shape[1], ease_topk.shape[1])), "val": val_m, "test": test_m,
            "val_sweep": sweep, "topk": fused}


def fuse_ensemble(rankings: Sequence[np.ndarray], train, k: int) -> np.ndarray:
    """The members' rankings fused with equal weights (reciprocal_rank_fusion): no weight to
    choose, so validation and test are both read from the one fused list."""
    return reciprocal_rank_fusion(rankings, [1.0 / len(rankings)] * len(rankings), train, k)


def model_rows(result: dict) -> dict[str, dict]:
    """A metrics.json's model rows by display name: the checkpoint alone ("CLLM4Rec", the
    result's own val/test), the ensemble and the fusion with EASE, where the result has them."""
    ensemble, fusion = result.get("ensemble"), result.get("ease_fusion")
    name = f"CLLM4Rec ensemble of {len(ensemble['members'])}" if ensemble else "CLLM4Rec"
    rows = {"CLLM4Rec": result, **({name: ensemble} if ensemble else {})}
    if fusion:
        rows[f"{name} + EASE (weight {fusion['ease_weight']})"] = fusion
    return rows


def format_table(rows: dict[str, dict]) -> str:
    """Aligned text table of Recall@20 / Recall@40 / NDCG@100, one row per model name."""
    cols = [("Recall@20", "recall@20"), ("Recall@40", "recall@40"), ("NDCG@100", "ndcg@100")]
    width = max([len("model")] + [len(name) for name in rows])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{title:>9}" for title, _ in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{m[key]:>9.4f}" for _, key in cols))
    return "\n".join(lines)
