"""Templates and per-use randomness of data_shards.documents."""
import numpy as np
import pytest

from data_shards.documents import (
    collab_prompt,
    content_prompt,
    content_text,
    doc_rng,
    holdout_split,
    item_sequence,
    rec_prompt,
    shuffled,
)


def test_collab_templates():
    assert collab_prompt(7) == "user_7 has interacted with"
    assert collab_prompt(np.int64(7)) == "user_7 has interacted with"
    assert item_sequence([3, 10, 2]) == "item_3 item_10 item_2"
    assert item_sequence(np.array([5])) == "item_5"
    assert item_sequence([]) == ""


@pytest.mark.parametrize("kind, user, item, expected", [
    ("review", 4, 9, "user_4 wrote the following review for item_9:"),
    ("title", None, 9, "The title of item_9 is:"),
    ("brand", None, 9, "The brand of item_9 is:"),
    ("categories", None, 9, "The categories of item_9 are:"),
    ("description", None, 9, "The description of item_9 is:"),
    ("tags", None, 9, "The tags of item_9 are:"),
    ("biography", 4, None, "The biography of user_4 is:"),
])
def test_content_prompts(kind, user, item, expected):
    assert content_prompt(kind, user, item) == expected


def test_content_prompt_errors_and_text():
    with pytest.raises(ValueError, match="unknown content kind"):
        content_prompt("poem", 1, 2)
    with pytest.raises(ValueError, match="needs a user"):
        content_prompt("review", None, 2)
    with pytest.raises(ValueError, match="needs an item"):
        content_prompt("title", None, None)
    assert content_text("  Great stuff.\n") == " Great stuff."
    assert content_text("x") == " x"


def test_rec_prompt():
    assert rec_prompt(3, [5, 1]) == "user_3 has interacted with item_5 item_1, user_3 will interact with"
    assert rec_prompt(3, []) == "user_3 has interacted with, user_3 will interact with"


def test_shuffled_is_a_seeded_permutation():
    items = list(range(50))
    a = shuffled(items, doc_rng(0, 0, 1))
    assert sorted(a) == items and a != items
    assert a == shuffled(items, doc_rng(0, 0, 1))
    assert a != shuffled(items, doc_rng(0, 1, 1))
    assert a != shuffled(items, doc_rng(0, 0, 2))
    assert all(type(x) is int for x in a)
    assert shuffled([], doc_rng(0, 0, 0)) == []


@pytest.mark.parametrize("n, k", [(1, 1), (2, 1), (4, 1), (5, 1), (9, 1), (10, 2), (14, 2), (15, 3), (100, 20)])
def test_holdout_split_sizes_and_partition(n, k):
    items = list(range(100, 100 + n))
    history, heldout = holdout_split(items, 0.2, doc_rng(1, 0, n))
    assert len(heldout) == k
    assert len(history) == n - k
    if n >= 2:
        assert history
    assert not set(history) & set(heldout)
    assert sorted(history + heldout) == items
    assert heldout == sorted(heldout)


def test_holdout_split_edge_fractions():
    assert holdout_split([], 0.2, doc_rng(0, 0, 0)) == ([], [])
    h, o = holdout_split([1, 2, 3], 1.0, doc_rng(0, 0, 0))
    assert len(h) == 1 and len(o) == 2
    with pytest.raises(ValueError):
        holdout_split([1, 2], 0.0, doc_rng(0, 0, 0))
    with pytest.raises(ValueError, match="rng"):
        holdout_split([1, 2], 0.2)


def test_holdout_split_deterministic_and_varies_by_epoch():
    items = list(range(40))
    a = holdout_split(items, 0.2, doc_rng(5, 0, 3))
    assert a == holdout_split(items, 0.2, doc_rng(5, 0, 3))
    by_epoch = {tuple(holdout_split(items, 0.2, doc_rng(5, e, 3))[1]) for e in range(5)}
    assert len(by_epoch) > 1
    # the history is in random order, not sorted
    histories = [holdout_split(items, 0.2, doc_rng(5, e, 3))[0] for e in range(5)]
    assert any(h != sorted(h) for h in histories)


def test_doc_rng_is_a_seedsequence_generator():
    a = doc_rng(1, 2, 3).integers(1 << 30, size=4)
    b = np.random.default_rng(np.random.SeedSequence([1, 2, 3])).integers(1 << 30, size=4)
    assert (a == b).all()
