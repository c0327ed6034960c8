"""Loading CLLM4Rec folders (data_shards.sources): real data via the fixtures, validation on
synthetic copies."""
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp

from tests.helpers import batches

from data_shards.build import build_shards
from data_shards.reader import ShardReader, load_split
from data_shards.sources import DataFormatError, load_cllm4rec
from data_shards.synthetic import write_synthetic_cllm4rec


def _kinds(ds):
    return Counter(t.kind for t in ds.texts)


def _reviews_on_train(ds):
    tr = ds.train.tocsr()
    return all(tr[t.user, t.item] == 1 for t in ds.texts if t.kind == "review")


def test_mini(mini_dir):
    ds = load_cllm4rec(mini_dir)
    assert (ds.num_users, ds.num_items) == (88, 500)
    assert (ds.train.nnz, ds.val.nnz, ds.test.nnz) == (3375, 372, 406)
    for m in (ds.train, ds.val, ds.test):
        assert isinstance(m, sp.csr_matrix) and m.dtype == np.float32 and m.shape == (88, 500)
        assert set(np.unique(m.data)) == {1.0}
    assert _kinds(ds) == {"review": 3375, "title": 500, "categories": 500, "brand": 317, "description": 297}
    assert _reviews_on_train(ds)
    files = {s["file"]: s for s in ds.text_sources}
    assert files["mini/user_item_texts/review.pkl"]["records"] == 3375
    assert files["mini/item_texts/title.pkl"]["skipped"] == 0
    assert all(t.text == t.text.strip() and t.text for t in ds.texts)


def test_full_with_derived(full_dir, derived_dir):
    ds = load_cllm4rec(full_dir, text_dirs=[derived_dir])
    assert (ds.num_users, ds.num_items) == (10553, 6086)
    assert (ds.train.nnz, ds.val.nnz, ds.test.nnz) == (70614, 11767, 11767)
    kinds = _kinds(ds)
    assert kinds["tags"] == 6086
    assert {t.item for t in ds.texts if t.kind == "tags"} == set(range(6086))
    assert kinds["review"] == 3375
    assert (kinds["title"], kinds["categories"], kinds["brand"], kinds["description"]) == (1021, 1022, 717, 710)
    assert _reviews_on_train(ds)
    tag0 = next(t for t in ds.texts if t.kind == "tags" and t.item == 0)
    assert tag0.text.startswith("Beauty, Face, Mineral, Makeup")
    assert {s["file"] for s in ds.text_sources} >= {"full/tag_to_item.json", "derived/user_item_texts/review.pkl",
                                                     "derived/item_texts/title.pkl"}


def test_mini_shards_index_counts(mini_dir, tmp_path):
    ds = load_cllm4rec(mini_dir)
    index = build_shards(ds, tmp_path / "mini_shards", docs_per_shard=1000)
    assert (index["num_users"], index["num_items"]) == (88, 500)
    assert index["splits"] == {"train": 3375, "val": 372, "test": 406}
    users_with_train = int((np.diff(ds.train.indptr) > 0).sum())
    assert index["streams"]["collab"]["num_docs"] == index["streams"]["rec"]["num_docs"] == users_with_train == 88
    assert index["streams"]["content"]["num_docs"] == 3375 + 500 + 500 + 317 + 297
    assert len(index["streams"]["content"]["shards"]) == 5
    assert sum(s["records"] for s in index["text_sources"]) == index["streams"]["content"]["num_docs"]
    assert (load_split(tmp_path / "mini_shards", "test") != ds.test).nnz == 0
    collab = [d for b in batches(ShardReader(tmp_path / "mini_shards", "collab", 88), 0) for d in b]
    assert sum(len(d["items"]) for d in collab) == 3375


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def syn(tmp_path):
    return write_synthetic_cllm4rec(tmp_path / "syn", num_users=20, num_items=15, num_clusters=3, seed=2)


def _rw_pickle(path, fn):
    with open(path, "rb") as f:
        data = pickle.load(f)
    data = fn(data)
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_item_id_out_of_range(syn):
    _rw_pickle(syn / "item_texts" / "title.pkl", lambda d: d[:3] + [["The title of item_15 is:", " x"]] + d[3:])
    with pytest.raises(DataFormatError) as e:
        load_cllm4rec(syn)
    msg = str(e.value)
    assert "title.pkl" in msg and "record 3" in msg and "out of range" in msg


def test_prompt_without_id(syn):
    _rw_pickle(syn / "user_item_texts" / "review.pkl", lambda d: d[:1] + [["someone wrote about item_2:", " x"]])
    with pytest.raises(DataFormatError) as e:
        load_cllm4rec(syn)
    assert "review.pkl" in str(e.value) and "record 1" in str(e.value) and "user_<id>" in str(e.value)


def test_empty_and_non_train_reviews_are_skipped_and_counted(syn):
    val = sp.load_npz(syn / "val_matrix.npz").tocoo()
    vu, vi = int(val.row[0]), int(val.col[0])
    extra = [["user_0 wrote about item_0:", "   "], [f"user_{vu} wrote about item_{vi}:", " leaked val text"]]
    _rw_pickle(syn / "user_item_texts" / "review.pkl", lambda d: d + extra)
    ds = load_cllm4rec(syn)
    src = next(s for s in ds.text_sources if s["kind"] == "review")
    assert src["skipped"] == 2
    assert src["skip_reasons"] == {"empty text": 1, "pair is not a train interaction": 1}
    assert all(not (t.user == vu and t.item == vi) for t in ds.texts)
    assert src["records"] == ds.train.nnz


def test_shape_mismatch(syn):
    _rw_pickle(syn / "meta.pkl", lambda m: {**m, "num_items": 16})
    with pytest.raises(DataFormatError, match="shape .* does not match"):
        load_cllm4rec(syn)


def test_overlapping_splits(syn):
    train = sp.load_npz(syn / "train_matrix.npz").tocsr()
    test = sp.load_npz(syn / "test_matrix.npz").tocsr()
    test = test + sp.csr_matrix(([1.0], ([0], [train[0].indices[0]])), shape=train.shape)  # a train pair
    sp.save_npz(syn / "test_matrix.npz", sp.csr_matrix(test, dtype=np.float32))
    with pytest.raises(DataFormatError) as e:
        load_cllm4rec(syn)
    assert "train_matrix.npz" in str(e.value) and "test_matrix.npz" in str(e.value)


def test_duplicates_across_text_dirs_kept_once(syn, tmp_path):
    extra = tmp_path / "extra"
    shutil.copytree(syn / "item_texts", extra / "item_texts")
    _rw_pickle(extra / "item_texts" / "title.pkl", lambda d: d + [["The brand of item_1 is:", " ignored kind"]])
    with open(extra / "item_texts" / "brand.pkl", "wb") as f:
        pickle.dump([["The brand of item_1 is:", " Acme"]], f)
    base = load_cllm4rec(syn)
    ds = load_cllm4rec(syn, text_dirs=[extra])
    assert len(ds.texts) == len(base.texts) + 1
    assert [t.text for t in ds.texts if t.kind == "brand"] == ["Acme"]
    dup = next(s for s in ds.text_sources if s["file"] == "extra/item_texts/title.pkl")
    assert dup["records"] == 0 and dup["skip_reasons"] == {"duplicate (kind, user, item)": 16}


def test_missing_text_dir(syn, tmp_path):
    with pytest.raises(FileNotFoundError, match="text folder"):
        load_cllm4rec(syn, text_dirs=[tmp_path / "absent"])


def test_subset_with_id_map_reads_texts_keyed_to_the_full_split(derived_dir):
    """derived/subset_651u_1000i_aligned has id_map.json instead of meta.pkl, and its texts are
    those of derived/, keyed to the full split's ids."""
    import json

    subset = derived_dir / "subset_651u_1000i_aligned"
    id_map = json.loads((subset / "id_map.json").read_text())
    ds = load_cllm4rec(subset, original_id_text_dirs=[derived_dir])
    assert (ds.num_users, ds.num_items) == (651, 1000) and ds.train.shape == (651, 1000)
    titles = {rec.item: rec.text for rec in ds.texts if rec.kind == "title"}
    with open(derived_dir / "item_texts" / "title.pkl", "rb") as f:
        original = {int(prompt.split("item_")[1].split()[0].strip(".,:;")): text.strip() for prompt, text in pickle.load(f)}
    assert len(titles) > 900
    for item, text in titles.items():
        assert text == original[id_map["col_to_original_item"][item]]
    reviews = [rec for rec in ds.texts if rec.kind == "review"]
    assert reviews and all(ds.train[rec.user, rec.item] for rec in reviews)
    skipped = {s["kind"]: s["skip_reasons"] for s in ds.text_sources}
    assert skipped["title"] == {"user or item not in this subset": 22}
    with pytest.raises(FileNotFoundError, match="id_map.json is missing"):
        load_cllm4rec(derived_dir.parent / "full", original_id_text_dirs=[derived_dir])
