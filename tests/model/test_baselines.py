"""Popularity and EASE on the real Beauty split against the published reference numbers.

Popularity scores (and EASE's zero scores on mini) are full of ties, and the reference
numbers come from an unknown tie order. Our ranking breaks ties towards the lower item id,
so for those metrics we check (a) our own value, pinned, and (b) that the reference lies
between the worst and the best value that any tie order can give. Tie-free metrics are
checked against the reference directly.
"""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.baselines import EASE, popularity_scores
from trainer.baselines import format_table, fuse_ensemble, fuse_with_ease, reciprocal_rank_fusion, run_baselines
from trainer.metrics import RankingAccumulator, csr_rows, evaluate_topk, rank_all_users

KEYS = ("recall@20", "recall@40", "ndcg@100")
TOL = 5e-4


def _load(folder):
    return [sp.load_npz(folder / f"{s}_matrix.npz") for s in ("train", "val", "test")]


def _tie_bounds(score_fn, train, heldout, block=1024):
    """Worst and best metrics over all orders of tied scores (train items excluded).

    Within each run of equal scores, putting the relevant items last (first) minimises
    (maximises) hits@k and DCG@k for every k at once.
    """
    worst, best = RankingAccumulator(), RankingAccumulator()
    for start in range(0, train.shape[0], block):
        users = np.arange(start, min(start + block, train.shape[0]))
        scores = np.array(score_fn(users), dtype=np.float64)
        sub = train[users]
        scores[np.repeat(np.arange(len(users)), np.diff(sub.indptr)), sub.indices] = -np.inf
        rel = heldout[users].toarray() > 0
        relevant = csr_rows(heldout, users)
        worst.update(np.lexsort((rel, -scores), axis=1)[:, :100], relevant)
        best.update(np.lexsort((~rel, -scores), axis=1)[:, :100], relevant)
    return worst.result(), best.result()


def _check(ours, pinned, reference, bounds, tie_free):
    worst, best = bounds
    for key in KEYS:
        assert ours[key] == pytest.approx(pinned[key], abs=1e-4), (key, ours[key])
        assert worst[key] - 1e-9 <= ours[key] <= best[key] + 1e-9, key
        assert worst[key] - TOL <= reference[key] <= best[key] + TOL, (key, worst[key], best[key])
        if key in tie_free:
            assert best[key] - worst[key] < 1e-12, key
            assert ours[key] == pytest.approx(reference[key], abs=TOL), (key, ours[key])


def test_mini_popularity_and_ease(mini_dir):
    train, val, test = _load(mini_dir)
    res = run_baselines(train, val, test, lambdas=(50,), log=lambda _: None)
    assert res["ease"]["lambda"] == 50 == res["ease_lambda"]
    assert res["popularity"]["test"]["users"] == 88

    pop = popularity_scores(train)
    _check(
        res["popularity"]["test"],
        pinned={"recall@20": 0.1574, "recall@40": 0.2385, "ndcg@100": 0.1913},
        reference={"recall@20": 0.1450, "recall@40": 0.2439, "ndcg@100": 0.1911},
        bounds=_tie_bounds(lambda u: np.tile(pop, (len(u), 1)), train, test),
        tie_free=(),
    )
    ease = EASE(50).fit(train)
    _check(
        res["ease"]["test"],
        pinned={"recall@20": 0.3536, "recall@40": 0.4810, "ndcg@100": 0.3445},
        reference={"recall@20": 0.3536, "recall@40": 0.4810, "ndcg@100": 0.3422},
        bounds=_tie_bounds(lambda u: ease.score(train[u]), train, test),
        tie_free=("recall@20", "recall@40"),
    )


def test_mini_lambda_sweep_picks_best_val_recall20(mini_dir):
    train, val, test = _load(mini_dir)
    res = run_baselines(train, val, test, log=lambda _: None)
    sweep = res["ease"]["val_sweep"]
    best = max(sweep, key=lambda lam: sweep[lam]["recall@20"])
    assert res["ease_lambda"] == res["ease"]["lambda"] == best
    assert res["ease"]["val"] == sweep[best]
    table = format_table({"popularity": res["popularity"]["test"], "EASE": res["ease"]["test"]})
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["model", "Recall@20", "Recall@40", "NDCG@100"]
    assert f"{res['ease']['test']['ndcg@100']:.4f}" in lines[2]


def test_full_popularity(full_dir):
    train, _, test = _load(full_dir)
    pop = popularity_scores(train)
    assert pop.shape == (6086,) and pop.sum() == 70614
    pop_t = torch.from_numpy(pop)
    topk = rank_all_users(lambda u: pop_t.expand(len(u), -1), train.shape[0], train)
    _check(
        evaluate_topk(topk, test),
        pinned={"recall@20": 0.0407, "recall@40": 0.0699, "ndcg@100": 0.0302},
        reference={"recall@20": 0.0407, "recall@40": 0.0707, "ndcg@100": 0.0303},
        bounds=_tie_bounds(lambda u: np.tile(pop, (len(u), 1)), train, test),
        tie_free=("recall@20",),
    )


def test_full_ease_lambda_100(full_dir):
    # EASE has no ties in the top 100 on full/, so every metric must match the reference.
    train, _, test = _load(full_dir)
    ease = EASE(100).fit(train)
    topk = rank_all_users(lambda u: torch.from_numpy(ease.score(train[u])), train.shape[0], train)
    res = evaluate_topk(topk, test)
    assert res["users"] == 10553
    reference = {"recall@20": 0.1768, "recall@40": 0.2252, "ndcg@100": 0.1153}
    for key in KEYS:
        assert res[key] == pytest.approx(reference[key], abs=TOL), (key, res[key])


def test_reciprocal_rank_fusion_hand_computed():
    """Two users, six items; user 0 has seen item 5, which ends the model's list (a list deeper
    than the unseen items). Scores are w_list / (60 + rank)."""
    train = sp.csr_matrix(([1.0], ([0], [5])), shape=(2, 6))
    model = np.array([[0, 1, 2, 5], [3, 4, -1, -1]])
    ease = np.array([[2, 3, 0, 1], [4, 0, 3, -1]])
    # equal weights. user 0: items 0 and 2 both score 1/61 + 1/63 (a tie: the lower id first), then
    # item 1 (1/62 + 1/64), then item 3 (1/62 alone). User 1: item 4 (1/62 + 1/61), item 3
    # (1/61 + 1/63), item 0 (1/62); no fourth candidate.
    np.testing.assert_array_equal(reciprocal_rank_fusion([model, ease], [0.5, 0.5], train, k=4), [[0, 2, 1, 3], [4, 3, 0, -1]])
    # weight 0: the model's order, EASE's other items after it (score 0, by id)
    np.testing.assert_array_equal(reciprocal_rank_fusion([model, ease], [1.0, 0.0], train, k=5), [[0, 1, 2, 3, -1],
                                                                                         [3, 4, 0, -1, -1]])
    np.testing.assert_array_equal(reciprocal_rank_fusion([model, ease], [0.0, 1.0], train, k=3), [[2, 3, 0], [4, 0, 3]])


def test_ensemble_fusion_hand_computed():
    """Three members, equal weights 1/3. Item 1: ranks 2, 1, 1; item 0: 1, 2; item 2: 3, 2;
    items 3 and 4: rank 3 once each (a tie: the lower id first)."""
    members = [np.array([[0, 1, 2]]), np.array([[1, 0, 3]]), np.array([[1, 2, 4]])]
    nothing_seen = sp.csr_matrix((1, 6))
    np.testing.assert_array_equal(fuse_ensemble(members, nothing_seen, k=6), [[1, 0, 2, 3, 4, -1]])
    seen_1 = sp.csr_matrix(([1.0], ([0], [1])), shape=(1, 6))
    np.testing.assert_array_equal(fuse_ensemble(members, seen_1, k=3), [[0, 2, 3]])
    # one member: its own ranking
    np.testing.assert_array_equal(fuse_ensemble(members[:1], nothing_seen, k=3), members[0])


def test_fusion_weight_is_chosen_on_validation_and_test_is_its_ranking(mini_dir):
    train, val, test = _load(mini_dir)
    ease = run_baselines(train, val, test, lambdas=(50,), log=lambda _: None, ease_depth=500)["ease"]
    assert ease["topk"].shape == (88, 500)
    scores = torch.from_numpy(np.random.default_rng(0).random((88, 500)))  # a weak "model"
    model = rank_all_users(lambda u: scores[u], 88, train, k=500)
    fusion = fuse_with_ease(model, ease["topk"], train, val, test, [0.0, 0.3, 0.7, 1.0], log=lambda _: None)
    sweep = fusion["val_sweep"]
    assert fusion["ease_weight"] == max(sweep, key=lambda w: sweep[w]["recall@20"]) and fusion["val"] == sweep[fusion["ease_weight"]]
    assert fusion["test"] == evaluate_topk(reciprocal_rank_fusion([model, ease["topk"]], [1 - fusion["ease_weight"], fusion["ease_weight"]], train), test)
    assert fusion["topk"].shape == (88, 100)
    # weight 1 is EASE's own ranking; weight 0 the model's
    assert sweep[1.0] == ease["val"] and sweep[0.0] == evaluate_topk(model, val)
    assert sweep[0.3]["recall@20"] > sweep[0.0]["recall@20"]
