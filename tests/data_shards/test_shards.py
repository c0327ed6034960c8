"""Shard build + world-size-independent reading (data_shards.build / data_shards.reader)."""
import json
from collections import Counter

import numpy as np
import pytest

from tests.helpers import batches
import scipy.sparse as sp

from data_shards.build import build_shards, main_build
from data_shards.reader import ShardReader, load_index, load_split
from data_shards.sources import load_cllm4rec
from data_shards.synthetic import write_synthetic_cllm4rec

STREAMS = ("collab", "rec", "content")
DOCS_PER_SHARD = 23  # small and not a divisor of the stream sizes: unequal last shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    src = write_synthetic_cllm4rec(root / "syn", num_users=60, num_items=40, num_clusters=4, seed=1)
    dataset = load_cllm4rec(src)
    out = root / "out"
    index = build_shards(dataset, out, docs_per_shard=DOCS_PER_SHARD, source={"test": True})
    return dataset, out, index


def _key(doc):
    return json.dumps({k: v for k, v in doc.items() if k not in ("pos", "key")}, sort_keys=True)


def _expected(dataset, stream):
    if stream == "content":
        return [{"kind": r.kind, "user": r.user, "item": r.item, "text": r.text} for r in dataset.texts]
    tr = dataset.train
    return [{"user": u, "items": sorted(int(i) for i in tr.indices[tr.indptr[u]:tr.indptr[u + 1]])}
            for u in range(dataset.num_users) if tr.indptr[u + 1] > tr.indptr[u]]


def _read_all(out, stream, batch, world, epoch=0, seed=0, window_shards=2):
    """Per rank: list of batches."""
    return [list(batches(ShardReader(out, stream, batch, rank=r, world_size=world, seed=seed,
                             window_shards=window_shards), epoch)) for r in range(world)]


def test_index_and_splits(built):
    dataset, out, index = built
    assert index == load_index(out)
    assert index["format_version"] == 1
    assert (index["num_users"], index["num_items"]) == (60, 40)
    assert index["splits"] == {"train": dataset.train.nnz, "val": dataset.val.nnz, "test": dataset.test.nnz}
    assert index["text_sources"] == dataset.text_sources and index["source"] == {"test": True}
    for name in ("train", "val", "test"):
        m = load_split(out, name)
        assert m.dtype == np.float32 and m.shape == (60, 40)
        assert (m != getattr(dataset, name)).nnz == 0
    for stream in STREAMS:
        s = index["streams"][stream]
        assert s["num_docs"] == len(_expected(dataset, stream))
        assert [x["num_docs"] for x in s["shards"][:-1]] == [DOCS_PER_SHARD] * (len(s["shards"]) - 1)
        for i, shard in enumerate(s["shards"]):
            assert shard["path"] == f"{stream}/{stream}-{i:05d}.tar"
            assert (out / shard["path"]).stat().st_size == shard["bytes"]
            assert len(shard["sha256"]) == 64
    assert not ShardReader(out, "content", 4).problems()


@pytest.mark.parametrize("stream", STREAMS)
def test_world1_reads_back_exactly_the_written_docs(built, stream):
    dataset, out, index = built
    reader = ShardReader(out, stream, batch_size=7, seed=3)
    steps = batches(reader, 0)
    docs = [d for b in steps for d in b]
    assert len(steps) == reader.steps_per_epoch == -(-reader.num_docs // 7)
    assert Counter(map(_key, docs)) == Counter(map(_key, _expected(dataset, stream)))
    assert [d["pos"] for d in docs] == list(range(reader.num_docs))


@pytest.mark.parametrize("stream, batch, world", [("collab", 4, 2), ("content", 5, 2), ("content", 7, 3),
                                                  ("rec", 3, 4)])
def test_multi_rank_equal_steps_disjoint_union(built, stream, batch, world):
    dataset, out, index = built
    per_rank = _read_all(out, stream, batch, world, epoch=1)
    n = index["streams"][stream]["num_docs"]
    g = batch * world
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1  # every rank runs the same number of steps
    # every rank gets the same batch size at every step
    for t in range(len(per_rank[0])):
        assert len({len(per_rank[r][t]) for r in range(world)}) == 1
    positions = [d["pos"] for r in range(world) for b in per_rank[r] for d in b]
    assert len(positions) == len(set(positions))  # disjoint
    rest = n % g
    leftover = rest % world if rest else 0
    assert sorted(positions) == list(range(n - leftover))  # union = all but the documented leftover
    if rest and rest // world == 0:
        assert len(per_rank[0]) == n // g  # the empty last step is dropped
    # union of docs (as multiset) = what the 1-rank reader yields for those positions
    one = {d["pos"]: _key(d) for b in _read_all(out, stream, batch, 1, epoch=1)[0] for d in b}
    assert Counter(one[p] for p in positions) == Counter(_key(d) for r in range(world) for b in per_rank[r] for d in b)


@pytest.mark.parametrize("stream, b", [("content", 4), ("content", 5), ("collab", 3), ("rec", 8)])
def test_one_rank_2b_equals_two_ranks_b(built, stream, b):
    _, out, index = built
    one = _read_all(out, stream, 2 * b, 1, epoch=2, seed=7)[0]
    two = _read_all(out, stream, b, 2, epoch=2, seed=7)
    assert len(one) == len(two[0]) == len(two[1])
    for t in range(len(one)):
        concat = two[0][t] + two[1][t]
        if len(one[t]) == 2 * b:
            assert concat == one[t]
        else:  # last partial global batch: the odd leftover doc is dropped on 2 ranks
            assert concat == one[t][:2 * (len(one[t]) // 2)]


def test_order_depends_on_seed_and_epoch_only(built):
    _, out, _ = built

    def order(epoch, seed, world=1, batch=8):
        ranks = _read_all(out, "content", batch, world, epoch=epoch, seed=seed)
        by_pos = {d["pos"]: _key(d) for r in ranks for b in r for d in b}
        return [by_pos[p] for p in sorted(by_pos)]

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(1, 0)
    assert a != order(0, 1)
    b2 = order(0, 0, world=2, batch=4)
    assert b2 == a[:len(b2)]


def test_window_of_one_shard_keeps_shards_together(built):
    _, out, index = built
    r = ShardReader(out, "collab", 1000, seed=4, window_shards=1)
    users = [d["user"] for d in next(iter(batches(r, 3)))]
    shards = index["streams"]["collab"]["shards"]
    flat = sorted(users)
    start = {i: sum(s["num_docs"] for s in shards[:i]) for i in range(len(shards))}
    # shard by shard in the permuted shard order; each shard's own docs permuted inside it
    at = 0
    for i in r.shard_order(3):
        n = shards[i]["num_docs"]
        assert sorted(users[at:at + n]) == flat[start[i]:start[i] + n]
        at += n
    assert users != flat
    whole = [d["user"] for d in next(iter(batches(ShardReader(out, "collab", 1000, seed=4, window_shards=99), 3)))]
    assert sorted(whole) == flat and whole != users  # one window: a full permutation


def test_start_step_skips_steps(built):
    _, out, _ = built
    r = ShardReader(out, "content", 6, rank=1, world_size=2, seed=2)
    full = list(batches(r, 4))
    assert list(batches(r, 4, start_step=5)) == full[5:]
    assert list(batches(r, 4, start_step=r.steps_per_epoch)) == []
    with pytest.raises(ValueError):
        batches(r, 4, start_step=r.steps_per_epoch + 1)


def test_overwrite_refusal_and_reproducible_bytes(built, tmp_path):
    dataset, out, index = built
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shards(dataset, out, docs_per_shard=DOCS_PER_SHARD)
    dst = tmp_path / "again"
    dst.mkdir()
    (dst / "stale").mkdir()
    (dst / "content").mkdir()
    (dst / "content" / "content-00999.tar").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        build_shards(dataset, dst, docs_per_shard=DOCS_PER_SHARD)
    again = build_shards(dataset, dst, docs_per_shard=DOCS_PER_SHARD, overwrite=True, source={"test": True})
    assert again == index  # same bytes -> same sizes and sha256
    assert not (dst / "content" / "content-00999.tar").exists()
    assert (dst / "stale").is_dir()  # files a build does not own are left alone


def test_main_build_records_source(tmp_path):
    src = write_synthetic_cllm4rec(tmp_path / "syn", num_users=12, num_items=10, num_clusters=2, seed=3)
    index = main_build(src, tmp_path / "out", docs_per_shard=100)
    assert index["source"]["format"] == "cllm4rec"
    assert index["streams"]["collab"]["num_docs"] == 12
    r = ShardReader(tmp_path / "out", "rec", 5, world_size=2, rank=1)
    assert r.steps_per_epoch == 2  # 12 docs, G=10: one full step, last R=2 -> 1 doc per rank


def test_synthetic_is_learnable_and_deterministic(tmp_path):
    a = write_synthetic_cllm4rec(tmp_path / "a")
    b = write_synthetic_cllm4rec(tmp_path / "b")
    for f in ("meta.pkl", "train_matrix.npz", "val_matrix.npz", "test_matrix.npz",
              "item_texts/title.pkl", "item_texts/categories.pkl", "user_item_texts/review.pkl"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ds = load_cllm4rec(a)
    assert (ds.num_users, ds.num_items) == (300, 200)
    allm = ds.train + ds.val + ds.test
    assert np.diff(allm.indptr).min() >= 5
    assert np.diff(ds.val.indptr).min() >= 1 and np.diff(ds.test.indptr).min() >= 1
    kinds = Counter(t.kind for t in ds.texts)
    assert kinds == {"title": 200, "categories": 200, "review": ds.train.nnz}
    assert sum(s["skipped"] for s in ds.text_sources) == 0

    # EASE clearly beats popularity (Recall@20 on test)
    X = ds.train.toarray().astype(np.float64)

    def recall20(scores):
        scores = np.where(X > 0, -np.inf, scores)
        top = np.argsort(-scores, axis=1)[:, :20]
        T = ds.test.toarray() > 0
        return np.mean([T[u, top[u]].sum() / min(20, T[u].sum()) for u in range(X.shape[0]) if T[u].any()])

    G = X.T @ X + 50.0 * np.eye(X.shape[1])
    P = np.linalg.inv(G)
    B = P / -np.diag(P)
    np.fill_diagonal(B, 0.0)
    pop = recall20(np.tile(X.sum(0), (X.shape[0], 1)))
    ease = recall20(X @ B)
    assert ease > pop + 0.2, (ease, pop)
    assert isinstance(ds.train, sp.csr_matrix) and ds.train.dtype == np.float32
