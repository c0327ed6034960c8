"""Ranking metrics against values worked out by hand on tiny cases."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from trainer.metrics import RankingAccumulator, evaluate_topk, rank_all_users, topk_excluding

L3 = math.log2(3)

# ks_recall=(2, 3), ks_ndcg=(3,); gain at rank r is 1/log2(r + 1): 1, 1/log2(3), 1/2, ...
TOP = np.array([
    [5, 1, 7, 9],  # A: relevant {1, 7, 9, 4}; 9 sits at rank 4, beyond every k
    [2, 0, 3, 4],  # B: relevant {2}, fewer relevant items than k
    [0, 1, 2, 3],  # C: nothing relevant -> skipped, not counted
    [4, 6, 8, 5],  # D: relevant {8, 9}
])
REL = [np.array([1, 7, 9, 4]), np.array([2]), np.array([], dtype=np.int64), np.array([8, 9])]

# A: recall@2 = 1/min(2,4) = 1/2, recall@3 = 2/min(3,4) = 2/3,
#    ndcg@3 = (1/log2 3 + 1/2) / (1 + 1/log2 3 + 1/2)
# B: recall@2 = 1/min(2,1) = 1, recall@3 = 1, ndcg@3 = 1/1 = 1
# D: recall@2 = 0/2 = 0, recall@3 = 1/min(3,2) = 1/2, ndcg@3 = (1/2) / (1 + 1/log2 3)
NDCG_A = (1 / L3 + 1 / 2) / (1 + 1 / L3 + 1 / 2)
NDCG_D = (1 / 2) / (1 + 1 / L3)
EXPECTED = {
    "recall@2": (1 / 2 + 1 + 0) / 3,  # = 1/2
    "recall@3": (2 / 3 + 1 + 1 / 2) / 3,  # = 13/18
    "ndcg@3": (NDCG_A + 1 + NDCG_D) / 3,
    "users": 3,
}


def test_hand_computed_values():
    acc = RankingAccumulator(ks_recall=(2, 3), ks_ndcg=(3,))
    acc.update(TOP, REL)
    res = acc.result()
    assert set(res) == set(EXPECTED)
    assert res["users"] == 3 and isinstance(res["users"], int)
    assert res["recall@2"] == pytest.approx(1 / 2)
    assert res["recall@3"] == pytest.approx(13 / 18)
    for key in ("recall@2", "recall@3", "ndcg@3"):
        assert res[key] == pytest.approx(EXPECTED[key], abs=1e-12), key


def test_evaluate_topk_reads_heldout_csr():
    rows = np.concatenate([np.full(len(r), i) for i, r in enumerate(REL)])
    cols = np.concatenate(REL)
    heldout = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(4, 10))
    res = evaluate_topk(TOP, heldout, ks_recall=(2, 3), ks_ndcg=(3,))
    for key, value in EXPECTED.items():
        assert res[key] == pytest.approx(value, abs=1e-12), key


def test_default_keys_and_short_lists():
    acc = RankingAccumulator()
    assert set(acc.result()) == {"recall@20", "recall@40", "ndcg@100", "users"}
    assert acc.result()["users"] == 0
    with pytest.raises(ValueError):
        acc.update(np.zeros((1, 50), dtype=np.int64), [np.array([1])])  # needs >= 100 columns


def test_state_merge_of_halves_equals_whole():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 300
    top = np.stack([rng.permutation(n_items)[:100] for _ in range(n_users)])
    rel = [rng.choice(n_items, size=rng.integers(0, 8), replace=False) for _ in range(n_users)]
    whole = RankingAccumulator()
    whole.update(top, rel)
    first, second = RankingAccumulator(), RankingAccumulator()
    first.update(top[:20], rel[:20])
    second.update(top[20:], rel[20:])
    summed = first.state() + second.state()  # what an all-reduce SUM does
    np.testing.assert_allclose(summed, whole.state(), rtol=1e-12)
    merged = RankingAccumulator.from_state(summed)
    first.merge_state(second.state())
    for other in (merged, first):
        for key, value in whole.result().items():
            assert other.result()[key] == pytest.approx(value, rel=1e-12), key


def test_topk_excluding_never_returns_excluded_items():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    scores = torch.randn(6, 40)
    exclude = [rng.choice(40, size=n, replace=False) for n in (0, 1, 5, 10, 20, 30)]
    top = topk_excluding(scores, exclude, k=10)
    assert top.shape == (6, 10) and top.dtype == torch.long
    for row, ex, s in zip(top.numpy(), exclude, scores):
        assert not set(row) & set(ex.tolist())
        allowed = np.setdiff1d(np.arange(40), ex)
        best = allowed[np.argsort(-s.numpy()[allowed])][:10]
        np.testing.assert_array_equal(row, best)  # best first
    assert not torch.isinf(scores).any()  # input left untouched


def test_topk_excluding_breaks_ties_towards_lower_ids():
    scores = torch.zeros(2, 8)
    scores[1, 6] = 1.0
    top = topk_excluding(scores, [np.array([0, 2]), np.array([1])], k=4)
    assert top.tolist() == [[1, 3, 4, 5], [6, 0, 2, 3]]


def test_rank_all_users_blocks_equal_one_block():
    rng = np.random.default_rng(2)
    n_users, n_items = 23, 40
    scores = rng.standard_normal((n_users, n_items))
    train = sp.random(n_users, n_items, density=0.2, format="csr", random_state=3)
    seen = []

    def score_block(users):
        seen.append(len(users))
        return torch.from_numpy(scores[users])

    small = rank_all_users(score_block, n_users, train, k=10, block_size=5)
    assert max(seen) <= 5 and sum(seen) == n_users
    big = rank_all_users(score_block, n_users, train, k=10, block_size=1000)
    np.testing.assert_array_equal(small, big)
    assert small.shape == (n_users, 10)
    for u in range(n_users):
        assert not set(small[u]) & set(train[u].indices.tolist())


def test_topk_beyond_the_catalog_pads_with_no_item():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    top = topk_excluding(scores, [np.array([1]), np.array([], dtype=np.int64)], 5)
    assert top.tolist() == [[2, 0, 1, -1, -1], [0, 1, 2, -1, -1]]
    assert evaluate_topk(top.numpy(), sp.csr_matrix(np.array([[1, 0, 0], [0, 0, 1]])), ks_recall=(2,),
                         ks_ndcg=(5,))["recall@2"] == 0.5
