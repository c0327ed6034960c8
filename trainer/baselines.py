"""Popularity and EASE baselines under the evaluation protocol in docs/method.md.

Both validation and test rank items from the train history only, with only the train items
excluded, so one top-k list per user serves both splits.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from model.baselines import EASE, popularity_scores
from trainer.metrics import evaluate_topk, rank_all_users

# Metric used to pick EASE's lambda on validation.
LAMBDA_SELECTION_METRIC = "recall@20"


def _rank(score_block_fn, train, k: int) -> np.ndarray:
    return rank_all_users(score_block_fn, train.shape[0], train, k=k)


def run_baselines(
    train,
    val,
    test,
    lambdas: Sequence[float] = (1, 5, 10, 20, 50, 100, 200, 500, 1000),
    k: int = 100,
    log: Callable[[str], None] = print,
) -> dict:
    """Popularity and EASE (lambda chosen by validation Recall@20) on val and test."""
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
            best = (lam, val_m, evaluate_topk(topk, test))
    lam, val_m, test_m = best
    log(f"EASE chosen lambda={lam} (by val {LAMBDA_SELECTION_METRIC}): test {test_m}")
    results["ease"] = {
        "lambda": lam,
        "selected_by": f"val {LAMBDA_SELECTION_METRIC}",
        "val": val_m,
        "test": test_m,
        "val_sweep": sweep,
    }
    results["ease_lambda"] = lam
    return results


def format_table(rows: dict[str, dict]) -> str:
    """Aligned text table of Recall@20 / Recall@40 / NDCG@100, one row per model name."""
    cols = [("Recall@20", "recall@20"), ("Recall@40", "recall@40"), ("NDCG@100", "ndcg@100")]
    width = max([len("model")] + [len(name) for name in rows])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{title:>9}" for title, _ in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{m[key]:>9.4f}" for _, key in cols))
    return "\n".join(lines)
