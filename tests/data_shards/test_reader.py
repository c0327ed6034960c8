"""The streaming reader at cluster shape: ranks x DataLoader workers, exact resume, shard faults."""
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from tests.helpers import batches

import data_shards.reader as reader_module
from data_shards.build import build_shards
from data_shards.reader import ShardError, ShardReader, load_index
from data_shards.sources import load_cllm4rec
from data_shards.synthetic import write_synthetic_cllm4rec


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Shards of unequal sizes: 13 docs per shard, so every stream ends with a short shard."""
    root = tmp_path_factory.mktemp("uneven")
    src = write_synthetic_cllm4rec(root / "syn", num_users=50, num_items=30, num_clusters=3, seed=5)
    out = root / "shards"
    index = build_shards(load_cllm4rec(src), out, docs_per_shard=13)
    sizes = [s["num_docs"] for s in index["streams"]["content"]["shards"]]
    assert len(set(sizes)) > 1
    return out, index


def _consume(out, stream, batch, world, workers, epoch=0, start_step=0, window_shards=3):
    """Per rank: list of (step, [(pos, key), ...]) through the worker-backed loader."""
    per_rank = []
    for rank in range(world):
        r = ShardReader(out, stream, batch, rank=rank, world_size=world, seed=11, window_shards=window_shards)
        per_rank.append([(step, [(d["pos"], d["key"]) for d in docs])
                         for step, docs, _ in r.loader(epoch, start_step, num_workers=workers)])
    return per_rank


@pytest.mark.parametrize("stream, batch", [("content", 5), ("collab", 4)])
def test_two_ranks_two_workers_use_every_document_once(uneven, stream, batch):
    out, index = uneven
    world = 2
    per_rank = _consume(out, stream, batch, world, workers=2, epoch=1)
    reader = ShardReader(out, stream, batch, world_size=world, seed=11, window_shards=3)
    # equal step counts, steps in order on every rank
    assert [[s for s, _ in r] for r in per_rank] == [list(range(reader.steps_per_epoch))] * world
    used = [key for r in per_rank for _, docs in r for _, key in docs]
    positions = [pos for r in per_rank for _, docs in r for pos, _ in docs]
    n = index["streams"][stream]["num_docs"]
    assert len(used) == len(set(used)) == n - reader.unused_per_epoch  # nothing twice
    assert sorted(positions) == list(range(n - reader.unused_per_epoch))
    assert reader.unused_per_epoch < world
    all_keys = {f"{k:09d}" for k in range(n)}
    assert set(used) <= all_keys
    # the worker split does not change what each rank gets
    assert per_rank == _consume(out, stream, batch, world, workers=0, epoch=1)


def test_workers_and_transform_run_in_the_worker(uneven):
    out, _ = uneven
    r = ShardReader(out, "rec", 3, seed=2)
    got = list(r.loader(0, transform=lambda docs, epoch: (os.getpid(), epoch, len(docs)), num_workers=2))
    assert [step for step, _, _ in got] == list(range(r.steps_per_epoch))
    pids = {pid for _, _, (pid, _, _) in got}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(epoch == 0 and n == len(docs) for _, docs, (_, epoch, n) in got)


@pytest.mark.parametrize("start_step", [1, 4, 7])
def test_resume_continues_the_order_without_rereading(uneven, monkeypatch, start_step):
    out, _ = uneven
    full = _consume(out, "content", 3, 2, workers=0, epoch=2)

    reads = Counter()
    original = reader_module._OpenShards.read

    def counting(self, shard, member):
        reads[(shard, member)] += 1
        return original(self, shard, member)

    monkeypatch.setattr(reader_module._OpenShards, "read", counting)
    for rank in range(2):
        r = ShardReader(out, "content", 3, rank=rank, world_size=2, seed=11, window_shards=3)
        state = r.state(epoch=2, next_step=start_step, num_workers=2)
        assert [w["next_step"] % 2 for w in state["workers"]] == [0, 1]
        fresh = ShardReader(out, "content", 3, rank=rank, world_size=2, seed=11, window_shards=3)
        epoch, step = fresh.resume_point(json.loads(json.dumps(state)))
        reads.clear()
        tail = [(s, [(d["pos"], d["key"]) for d in docs]) for s, docs, _ in fresh.loader(epoch, step)]
        assert tail == full[rank][start_step:]
        # only the documents of the remaining steps were read, each once
        assert sum(reads.values()) == sum(len(docs) for _, docs in tail) and max(reads.values()) == 1


def test_resume_refuses_a_different_order(uneven):
    out, _ = uneven
    state = ShardReader(out, "content", 3, world_size=2, seed=11).state(0, 2)
    for other in (ShardReader(out, "content", 3, world_size=2, seed=12),
                  ShardReader(out, "content", 4, world_size=2, seed=11),
                  ShardReader(out, "content", 3, world_size=2, seed=11, window_shards=2)):
        with pytest.raises(ValueError, match="cannot continue"):
            other.resume_point(state)
    # same global batch on another world size: the same global positions continue
    assert ShardReader(out, "content", 6, world_size=1, seed=11).resume_point(state) == (0, 2)


def test_item_reorder_seed_is_the_position(uneven):
    from data_shards.documents import doc_rng, shuffled

    out, _ = uneven
    one = {d["key"]: d for _, b, _ in ShardReader(out, "collab", 8, seed=3).loader(0) for d in b}
    two = {d["key"]: d for r in range(2) for b in batches(ShardReader(out, "collab", 4, rank=r, world_size=2, seed=3), 0)
           for d in b}
    for key in two:
        a, b = one[key], two[key]
        assert a["pos"] == b["pos"]
        assert shuffled(a["items"], doc_rng(3, 0, a["pos"])) == shuffled(b["items"], doc_rng(3, 0, b["pos"]))


# ---------------------------------------------------------------------------- shard faults


@pytest.fixture
def copy(uneven, tmp_path):
    out, _ = uneven
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _edit_index(path, fn):
    p = path / "index.json"
    idx = json.loads(p.read_text())
    fn(idx)
    p.write_text(json.dumps(idx))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_same_size(path):
    data = bytearray(path.read_bytes())
    at = data.index(b'"text"')  # inside a document, not a header: only the checksum can tell
    data[at + 1:at + 5] = b"TEXT"
    path.write_bytes(bytes(data))


def _garble_header(path):
    data = bytearray(path.read_bytes())
    data[100:160] = b"\xff" * 60  # mode/uid/size/checksum fields of the first header
    path.write_bytes(bytes(data))


def _empty(path):
    path.write_bytes(b"")


def _unlisted(path):
    shutil.copy(path, path.with_name("content-09999.tar"))


FAULTS = {"missing": (os.remove, "is missing"), "truncated": (_truncate, "bytes but index.json records"),
          "corrupt": (_corrupt_same_size, "sha256 differs"), "garbled tar": (_garble_header, "not a readable tar"),
          "empty": (_empty, "is empty"), "unlisted": (_unlisted, "not listed")}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_shard_fault_names_the_shard(copy, fault):
    damage, says = FAULTS[fault]
    shard = copy / "content" / "content-00001.tar"
    damage(shard)
    named = shard.with_name("content-09999.tar") if fault == "unlisted" else shard
    found = " ".join(ShardReader(copy, "content", 4).problems())
    assert str(named) in found and says in found


def test_index_count_that_disagrees_names_the_shard(copy):
    def bump(idx):
        s = idx["streams"]["rec"]
        s["shards"][0]["num_docs"] += 1
        s["num_docs"] += 1
    _edit_index(copy, bump)
    shard = copy / "rec" / "rec-00000.tar"
    r = ShardReader(copy, "rec", 4)
    found = " ".join(r.problems(checksum=False))
    assert str(shard) in found and "documents but index.json records" in found
    with pytest.raises(ShardError) as e:  # reading it anyway also names the shard
        list(r.loader(0))
    assert str(shard) in str(e.value)


def test_index_errors(copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="cllm4rec build-shards"):
        load_index(tmp_path / "nowhere")
    _edit_index(copy, lambda idx: idx.update(format_version=99))
    with pytest.raises(ShardError, match="format_version"):
        load_index(copy)


def test_skip_policy_trains_on_the_rest(copy, uneven):
    _, index = uneven
    shard = copy / "content" / "content-00002.tar"
    _truncate(shard)
    bad = ShardReader(copy, "content", 4).problems()
    assert len(bad) == 1 and str(shard) in bad[0]
    r = ShardReader(copy, "content", 4, skip_shards=("content/content-00002.tar",))
    assert r.skipped == ["content/content-00002.tar"]
    assert not r.problems()
    lost = index["streams"]["content"]["shards"][2]["num_docs"]
    assert r.num_docs == index["streams"]["content"]["num_docs"] - lost
    docs = [d for _, b, _ in r.loader(0) for d in b]
    assert len(docs) == r.num_docs - r.unused_per_epoch
    assert not {d["key"] for d in docs} & {f"{k:09d}" for k in range(26, 26 + lost)}


def test_split_verification_covers_every_shard(uneven):
    out, index = uneven
    r = ShardReader(out, "content", 4)
    n = len(r.shards)
    assert r.problems(which=range(0, n, 2)) == [] and r.problems(which=range(1, n, 2)) == []
    assert np.all(np.diff([int(s["path"][-9:-4]) for s in r.shards]) == 1)


def test_training_setup_stops_or_skips_naming_the_shard(copy, uneven):
    """The recipes' reader setup (ranks split the checks): error by default, skip on request."""
    from trainer.config import load_config
    from trainer.distributed import init_distributed
    from trainer.readers import stream_readers

    init_distributed()
    shard = copy / "content" / "content-00003.tar"
    _corrupt_same_size(shard)
    cfg = load_config(None, [f"data.shards={copy}"])
    with pytest.raises(ShardError) as e:
        stream_readers(cfg, {"content": 4, "rec": 4})
    assert str(shard) in str(e.value) and "data.bad_shards=skip" in str(e.value)
    skipping = stream_readers(load_config(None, [f"data.shards={copy}", "data.bad_shards=skip"]), {"content": 4})["content"]
    assert skipping.skipped == ["content/content-00003.tar"]
    fast = stream_readers(load_config(None, [f"data.shards={copy}", "data.checksums=false"]), {"content": 4})["content"]
    assert fast.skipped == []  # same size, same tar headers: only the checksum sees this damage
