"""`cllm4rec prepare` (data_shards.prepare / data_shards.raw): raw files -> preprocessing -> shards.

Small hand-written inputs in tmp_path, plus the real Amazon Musical Instruments 5-core file
from the shared data folder (skipped when absent).
"""
import csv
import gzip
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_shards.prepare import PrepareOptions, kcore, prepare, preprocess, split_per_user
from data_shards.raw import RawDataError, TableFormat
from data_shards.reader import load_index, load_split
from trainer.cli import main as cli_main

USERS = [f"u{k}" for k in range(6)]
ITEMS = [f"i{k}" for k in range(6)]


# ----------------------------------------------------------------------------- helpers


def _review(user, item, rating=5.0, text=None, **more):
    rec = {"reviewerID": user, "asin": item, "reviewerName": "N", "helpful": [0, 0],
           "reviewText": f"text {user} {item}" if text is None else text, "overall": rating,
           "summary": f"summary {user} {item}", "unixReviewTime": 1400000000, "reviewTime": "05 13, 2014"}
    rec.update(more)
    return rec


def _grid(users=USERS, items=ITEMS):
    """Every user reviewed every item with 5 stars: stable under the default 5-core (6 x 6)."""
    return [_review(u, i) for u in users for i in items]


def _write(path: Path, lines, gz=False) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _json_lines(path, records, gz=False):
    return _write(path, [json.dumps(r) for r in records], gz)


def _literal_lines(path, records, gz=False):
    return _write(path, [repr(r) for r in records], gz)


def _amazon(path, **kw):
    return PrepareOptions("amazon", path, **kw)


def _pairs_by_name(out: Path) -> dict:
    """{split: {(original user, original item)}} read back through the id maps."""
    users = json.loads((out / "id_maps" / "users.json").read_text())
    items = json.loads((out / "id_maps" / "items.json").read_text())
    result = {}
    for name in ("train", "val", "test"):
        m = load_split(out, name).tocoo()
        result[name] = {(users[u], items[i]) for u, i in zip(m.row.tolist(), m.col.tolist())}
    return result


def _content_docs(out: Path) -> list[dict]:
    docs = []
    for path in sorted((out / "content").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                docs.append(json.loads(tar.extractfile(member).read()))
    return docs


def _named_texts(out: Path) -> Counter:
    """Content docs as Counter of (kind, original user, original item, text)."""
    users = json.loads((out / "id_maps" / "users.json").read_text())
    items = json.loads((out / "id_maps" / "items.json").read_text())
    return Counter((d["kind"], None if d["user"] is None else users[d["user"]],
                    None if d["item"] is None else items[d["item"]], d["text"]) for d in _content_docs(out))


def _split_pairs(prep) -> dict:
    ds = prep.dataset
    out = {}
    for name in ("train", "val", "test"):
        m = getattr(ds, name).tocoo()
        out[name] = {(prep.user_names[u], prep.item_names[i]) for u, i in zip(m.row.tolist(), m.col.tolist())}
    return out


# ----------------------------------------------------------------------------- the real file


def test_real_musical_instruments(amazon_raw_dir, tmp_path):
    path = amazon_raw_dir / "reviews_Musical_Instruments_5.json.gz"
    out = tmp_path / "mi"
    index = prepare(_amazon(path), out, docs_per_shard=1000)
    assert (index["num_users"], index["num_items"], index["num_interactions"]) == (526, 347, 3615)
    # val = test = max(1, floor(0.1 n)) per user, as the shared data's SOURCE.md states.
    assert index["splits"] == {"train": 2551, "val": 532, "test": 532}
    assert index == load_index(out)
    counts = index["preprocessing"]["counts"]
    assert counts["rows_read"] == 10261 and counts["rows_skipped"] == {}
    assert counts["after_rating_filter"] == 2084 + 6938  # ratings 4 and 5
    assert counts["after_dedupe"] == {"interactions": 9022, "users": 1429, "items": 900}
    assert counts["after_kcore"] == {"interactions": 3615, "users": 526, "items": 347}
    assert len(counts["kcore_passes"]) > 1
    assert index["id_maps"] == {"users": "id_maps/users.json", "items": "id_maps/items.json"}
    for name, n in index["splits"].items():
        m = load_split(out, name)
        assert m.shape == (526, 347) and m.nnz == n
    train, val, test = (load_split(out, s) for s in ("train", "val", "test"))
    assert (train.multiply(val).nnz, train.multiply(test).nnz, val.multiply(test).nnz) == (0, 0, 0)
    for m in (train, val, test):
        assert np.diff(m.indptr).min() >= 1

    # Reviews: exactly the train pairs whose first 4/5-star row has a non-empty reviewText.
    pairs = _pairs_by_name(out)
    expected = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            key = (r["reviewerID"], r["asin"])
            if r["overall"] > 3 and key in pairs["train"] and key not in expected and r.get("reviewText", "").strip():
                expected[key] = r["reviewText"].strip()
    texts = _named_texts(out)
    assert texts == Counter(("review", u, i, t) for (u, i), t in expected.items())
    assert index["streams"]["content"]["num_docs"] == len(expected) == index["text_sources"][0]["records"]
    assert index["text_sources"][0]["records"] + index["text_sources"][0]["skipped"] == 10261


# ----------------------------------------------------------------------------- Amazon formats


@pytest.mark.parametrize("writer,gz,name", [(_json_lines, False, "r.json"), (_json_lines, True, "r.json.gz"),
                                            (_literal_lines, False, "r.json"), (_literal_lines, True, "r.json.gz"),
                                            (_json_lines, True, "gzip_without_suffix.json")])
def test_amazon_line_formats(tmp_path, writer, gz, name):
    path = writer(tmp_path / name, _grid(), gz)
    out = tmp_path / "out"
    index = prepare(_amazon(path), out)
    assert (index["num_users"], index["num_items"], index["num_interactions"]) == (6, 6, 36)
    assert index["splits"] == {"train": 24, "val": 6, "test": 6}
    reference = preprocess(_amazon(_json_lines(tmp_path / "ref.json", _grid())))
    assert _pairs_by_name(out) == _split_pairs(reference)
    assert len(_named_texts(out)) == 24


def test_amazon_2018_style_missing_texts_and_duplicates(tmp_path):
    records = [_review(u, i, vote="3", verified=True, style={"Size:": " Large"}, image=["http://x/y.jpg"])
               for u in USERS for i in ITEMS]
    for r in records[:4]:
        del r["reviewText"]  # 2018 files have rows without reviewText: no review, not an error
    records[4]["reviewText"] = None
    records[5]["reviewText"] = "   "
    del records[6]["summary"]
    records += [dict(records[10]), dict(records[11])]  # exact duplicate rows
    prep = preprocess(_amazon(_json_lines(tmp_path / "Musical_Instruments_5.json", records)))
    c = prep.report["counts"]
    assert c["rows_read"] == 38 and c["after_rating_filter"] == 38 and c["after_dedupe"]["interactions"] == 36
    assert prep.dataset.train.nnz + prep.dataset.val.nnz + prep.dataset.test.nnz == 36
    textless = {(r["reviewerID"], r["asin"]) for r in records[:6]}
    train = _split_pairs(prep)["train"]
    reviews = [(prep.user_names[t.user], prep.item_names[t.item]) for t in prep.dataset.texts]
    assert sorted(reviews) == sorted(train - textless)
    reasons = prep.dataset.text_sources[0]["skip_reasons"]
    assert reasons["empty text"] == len(train & textless)
    assert reasons.get("duplicate (kind, user, item)", 0) == len(train & {("u1", "i4"), ("u1", "i5")})


def test_duplicates_collapse_and_review_from_first_kept_row(tmp_path):
    records = _grid()
    # (u0, i0) three more times: rated 2 (filtered out), 5 without text, 4 with text "later".
    records[1:1] = [_review("u0", "i0", 2.0, "low"), _review("u0", "i0", 5.0, ""), _review("u0", "i0", 4.0, "later")]
    records[0]["reviewText"] = ""
    path = _json_lines(tmp_path / "r.json", records)
    for seed in range(20):
        prep = preprocess(_amazon(path, seed=seed))
        if ("u0", "i0") in _split_pairs(prep)["train"]:
            break
    c = prep.report["counts"]
    assert (c["rows_read"], c["after_rating_filter"], c["after_dedupe"]["interactions"]) == (39, 38, 36)
    texts = {(prep.user_names[t.user], prep.item_names[t.item]): t.text for t in prep.dataset.texts}
    assert texts[("u0", "i0")] == "later"
    reasons = prep.dataset.text_sources[0]["skip_reasons"]
    assert reasons["removed by the rating filter"] == 1 and reasons["empty text"] >= 2


def test_rating_filter(tmp_path):
    records = _grid()
    records += [_review("u0", "x1", 3.0), _review("u1", "x1", 3.0), _review("u2", "x1", 4.0)]
    path = _json_lines(tmp_path / "r.json", records)
    strict = preprocess(_amazon(path, kcore=0))
    assert strict.report["counts"]["after_rating_filter"] == 37  # 3 is not > 3
    assert "x1" in strict.item_names and strict.dataset.num_items == 7
    assert strict.dataset.train.nnz + strict.dataset.val.nnz + strict.dataset.test.nnz == 37
    off = preprocess(_amazon(path, kcore=0, rating_above=None))
    assert off.report["counts"]["after_rating_filter"] == 39
    assert off.report["settings"]["rating_filter"] == "off (disabled)"
    high = preprocess(_amazon(path, kcore=0, rating_above=4.5))
    assert high.report["counts"]["after_rating_filter"] == 36 and "x1" not in high.item_names


def test_kcore_needs_several_passes(tmp_path):
    # Item X has 2 reviews (D, E) and goes in pass 1; only then do D and E fall to 2 items
    # and go in pass 2. The 3 x 3 core of A, B, C remains.
    core = [(u, i) for u in "ABC" for i in "123"]
    extra = [("D", "1"), ("D", "2"), ("D", "X"), ("E", "1"), ("E", "2"), ("E", "X")]
    path = _json_lines(tmp_path / "r.json", [_review(u, i) for u, i in core + extra])
    prep = preprocess(_amazon(path, kcore=3))
    passes = prep.report["counts"]["kcore_passes"]
    assert [p["interactions"] for p in passes] == [13, 9]
    assert prep.user_names == ["A", "B", "C"] and prep.item_names == ["1", "2", "3"]
    assert set().union(*_split_pairs(prep).values()) == set(core)


def test_kcore_function_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    u = rng.zipf(1.6, 4000) % 300
    i = rng.zipf(1.4, 4000) % 200
    keys = np.unique(u * 200 + i)
    u, i = (keys // 200).astype(np.int32), (keys % 200).astype(np.int32)
    got_u, got_i, passes = kcore(u, i, 5, 4, 300, 200)
    pairs = set(zip(u.tolist(), i.tolist()))
    while True:
        cu, ci = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
        kept = {(a, b) for a, b in pairs if cu[a] >= 5 and ci[b] >= 4}
        if kept == pairs:
            break
        pairs = kept
    assert set(zip(got_u.tolist(), got_i.tolist())) == pairs and len(passes) > 1


# ----------------------------------------------------------------------------- split, ids, texts


def _random_file(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for k in range(40):
        n = int(rng.integers(3, 26))
        for item in rng.choice(60, size=n, replace=False):
            records.append(_review(f"user{k:02d}", f"item{int(item):02d}"))
    return _json_lines(tmp_path / "random.json", records), records


def test_split_invariants_and_seeds(tmp_path):
    path, records = _random_file(tmp_path)
    prep = preprocess(_amazon(path, kcore=0, seed=7))
    ds = prep.dataset
    mats = [ds.train, ds.val, ds.test]
    total = ds.train + ds.val + ds.test
    assert total.max() == 1  # disjoint
    assert total.nnz == len({(r["reviewerID"], r["asin"]) for r in records})
    n = np.diff(total.tocsr().indptr)
    per_user = [np.diff(m.tocsr().indptr) for m in mats]
    assert all(p.min() >= 1 for p in per_user)
    assert np.array_equal(per_user[1], np.maximum(1, np.floor(n * 0.1 + 1e-9)))
    assert np.array_equal(per_user[2], per_user[1])
    again = preprocess(_amazon(path, kcore=0, seed=7))
    assert all((a != b).nnz == 0 for a, b in zip(mats, [again.dataset.train, again.dataset.val, again.dataset.test]))
    other = preprocess(_amazon(path, kcore=0, seed=8))
    assert (other.dataset.val != ds.val).nnz > 0
    assert (other.dataset.train + other.dataset.val + other.dataset.test != total).nnz == 0


def test_split_rounding_rule():
    counts = np.arange(3, 40)
    u = np.repeat(np.arange(counts.size), counts)
    for fractions in [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.02, 0.49, 0.49)]:
        label = split_per_user(u, counts.size, fractions, seed=0)
        per = [np.bincount(u[label == k], minlength=counts.size) for k in range(3)]
        val = np.maximum(1, np.floor(counts * fractions[1] + 1e-9))
        test = np.maximum(1, np.floor(counts * fractions[2] + 1e-9))
        if fractions[0] > 0.1:
            assert np.array_equal(per[1], val) and np.array_equal(per[2], test)
        assert per[0].min() >= 1 and per[1].min() >= 1 and per[2].min() >= 1
        assert np.array_equal(per[0] + per[1] + per[2], counts)


def test_id_maps_round_trip_and_overwrite(tmp_path):
    path, records = _random_file(tmp_path, seed=1)
    out = tmp_path / "out"
    prepare(_amazon(path, kcore=0), out)
    users = json.loads((out / "id_maps" / "users.json").read_text())
    items = json.loads((out / "id_maps" / "items.json").read_text())
    assert users == sorted(users) and items == sorted(items)
    assert len(users) == 40 and len(set(users)) == 40
    pairs = _pairs_by_name(out)
    assert set().union(*pairs.values()) == {(r["reviewerID"], r["asin"]) for r in records}
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(_amazon(path, kcore=0), out)
    # Overwrite with different data: maps and shards are replaced together.
    path2, records2 = _random_file(tmp_path, seed=2)
    prepare(_amazon(path2, kcore=0), out, overwrite=True)
    assert set().union(*_pairs_by_name(out).values()) == {(r["reviewerID"], r["asin"]) for r in records2}


def test_reviews_only_for_train_pairs(tmp_path):
    path, records = _random_file(tmp_path, seed=4)
    out = tmp_path / "out"
    index = prepare(_amazon(path, kcore=0), out, docs_per_shard=50)
    pairs = _pairs_by_name(out)
    texts = _named_texts(out)
    assert texts == Counter(("review", u, i, f"text {u} {i}") for u, i in pairs["train"])
    held_out_texts = {f"text {u} {i}" for u, i in pairs["val"] | pairs["test"]}
    assert not held_out_texts & {t for *_, t in texts}
    source = index["text_sources"][0]
    assert source["skip_reasons"] == {"val/test pair (held out: its text would leak it)":
                                      len(pairs["val"]) + len(pairs["test"])}
    assert index["streams"]["content"]["num_docs"] == len(pairs["train"])


def test_texts_are_reread_not_held(tmp_path):
    path = _json_lines(tmp_path / "r.json", _grid())
    prep = preprocess(_amazon(path))
    texts = prep.dataset.texts
    assert not isinstance(texts, list)
    first, second = list(texts), list(texts)
    assert first == second and len(first) == len(texts) == 24
    _json_lines(path, [_review(u, i) for u in reversed(USERS) for i in ITEMS])  # the file changes
    with pytest.raises(RawDataError, match="names other ids than on the first read"):
        list(texts)
    _json_lines(path, [_review(u, i, text="") for u in USERS for i in ITEMS])
    with pytest.raises(RawDataError, match="the review text is empty now"):
        list(texts)


def test_amazon_meta_texts(tmp_path):
    path = _json_lines(tmp_path / "r.json", _grid())
    meta2014 = [
        {"asin": "i0", "title": "Tuner", "brand": "Snark", "categories": [["Musical Instruments", "Tuners"]],
         "description": "Clip-on tuner.", "price": 9.99, "related": {"also_bought": ["i1"]}},
        {"asin": "i1", "title": "Strings", "categories": [["Musical Instruments", "Strings"],
                                                          ["Musical Instruments", "Guitar"]]},
        {"asin": "i1", "title": "Second i1 record, ignored"},
        {"asin": "zz", "title": "not in the data"},
        {"asin": "i2", "title": "", "brand": "Fender"},
    ]
    out = tmp_path / "out"
    index = prepare(_amazon(path, meta=_literal_lines(tmp_path / "meta.json.gz", meta2014, gz=True)), out)
    texts = _named_texts(out)
    items = {(k, i, t) for k, u, i, t in texts if k != "review"}
    assert items == {("title", "i0", "Tuner"), ("brand", "i0", "Snark"), ("description", "i0", "Clip-on tuner."),
                     ("categories", "i0", "Musical Instruments, Tuners"), ("title", "i1", "Strings"),
                     ("categories", "i1", "Musical Instruments, Strings, Guitar"), ("brand", "i2", "Fender")}
    sources = {s["kind"]: s for s in index["text_sources"]}
    assert sources["title"]["records"] == 2
    assert sources["title"]["skip_reasons"] == {"item not in the preprocessed data": 1, "empty text": 1,
                                                "duplicate (kind, user, item)": 1}
    assert sources["review"]["records"] == 24
    # 2018 metadata: JSON, "category" one list, "description" a list of strings.
    meta2018 = [{"asin": "i3", "title": "Capo", "category": ["Musical Instruments", "Capos"],
                 "description": ["Spring capo.", "Fits 6 strings."], "also_buy": []}]
    prep = preprocess(_amazon(path, meta=_json_lines(tmp_path / "meta2018.json", meta2018)))
    got = {(t.kind, prep.item_names[t.item], t.text) for t in prep.dataset.texts if t.kind != "review"}
    assert got == {("title", "i3", "Capo"), ("categories", "i3", "Musical Instruments, Capos"),
                   ("description", "i3", "Spring capo. Fits 6 strings.")}


# ----------------------------------------------------------------------------- tables


def _table_rows():
    rows = [(u, i, 5, 1400000000 + k) for k, (u, i) in enumerate((u, i) for u in USERS for i in ITEMS)]
    rows += [("u0", "i0", 5, 1), ("u1", "lowitem", 2, 2)]  # a duplicate and a filtered-out row
    return rows


def _write_table(path: Path, header, rows):
    if path.name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({h: [r[k] for r in rows] for k, h in enumerate(header)}), path)
        return path
    delimiter = "\t" if ".tsv" in path.name else ","
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".csv.gz", ".tsv.gz", ".parquet"])
def test_tables_with_text_tables(tmp_path, suffix):
    inter = _write_table(tmp_path / f"inter{suffix}", ["uid", "iid", "stars", "ts"], _table_rows())
    item_texts = _write_table(tmp_path / f"items{suffix}", ["iid", "title", "categories", "unused"],
                              [("i0", "Tuner", "Music, Tuners", "x"), ("i1", "Strings, \"nylon\"", "", "y"),
                               ("nope", "Not in data", "A", "z")])
    user_texts = _write_table(tmp_path / f"users{suffix}", ["uid", "biography"],
                              [("u0", "Plays guitar.\nAnd bass."), ("u5", "Drummer")])
    reviews = _write_table(tmp_path / f"reviews{suffix}", ["uid", "iid", "body"],
                           [(u, i, f"review {u} {i}") for u in USERS for i in ITEMS])
    opts = PrepareOptions("table", inter, item_texts=item_texts, user_texts=user_texts, reviews=reviews,
                          user_col="uid", item_col="iid", rating_col="stars", time_col="ts", review_col="body")
    out = tmp_path / "out"
    index = prepare(opts, out)
    assert (index["num_users"], index["num_items"], index["num_interactions"]) == (6, 6, 36)
    counts = index["preprocessing"]["counts"]
    assert (counts["rows_read"], counts["after_rating_filter"], counts["after_dedupe"]["interactions"]) == (38, 37, 36)
    assert counts["time_range"] == [1, 1400000035]
    texts = _named_texts(out)
    train = _pairs_by_name(out)["train"]
    assert Counter({k: v for k, v in texts.items() if k[0] == "review"}) == Counter(
        ("review", u, i, f"review {u} {i}") for u, i in train)
    assert {k for k in texts if k[0] != "review"} == {
        ("title", None, "i0", "Tuner"), ("categories", None, "i0", "Music, Tuners"),
        ("title", None, "i1", 'Strings, "nylon"'), ("biography", "u0", None, "Plays guitar.\nAnd bass."),
        ("biography", "u5", None, "Drummer")}
    kinds = [d["kind"] for d in _content_docs(out)]
    assert kinds.index("biography") > max(k for k, x in enumerate(kinds) if x in ("title", "categories"))
    assert kinds.index("review") > max(k for k, x in enumerate(kinds) if x == "biography")


def test_table_without_rating_column_keeps_all_rows(tmp_path):
    rows = [(u, i) for u in USERS for i in ITEMS] + [("u0", "i9"), ("u1", "i9"), ("u2", "i9")]
    path = _write_table(tmp_path / "t.csv", ["user", "item"], rows)
    prep = preprocess(PrepareOptions("table", path, kcore=3))
    assert prep.report["counts"]["after_rating_filter"] == 39
    assert prep.report["settings"]["rating_filter"] == "off (the table has no rating column)"
    assert prep.dataset.num_items == 7 and "i9" in prep.item_names


def test_table_timestamps_numbers_iso_and_parquet_times(tmp_path):
    rows = [(u, i, "2014-05-13T00:00:00" if (u, i) == ("u0", "i0") else "1400000000")
            for u in USERS for i in ITEMS]
    prep = preprocess(PrepareOptions("table", _write_table(tmp_path / "t.tsv", ["user", "item", "timestamp"], rows)))
    assert prep.report["counts"]["time_range"] == [1399939200.0, 1400000000.0]
    bad = _write_table(tmp_path / "b.csv", ["user", "item", "when"], rows[:3] + [("u0", "i1", "soon")])
    with pytest.raises(RawDataError, match=r"b\.csv: line 5: field 'when': not a number nor an ISO 8601 time"):
        preprocess(PrepareOptions("table", bad, time_col="when"))
    pa = pytest.importorskip("pyarrow")
    import datetime as dt
    import pyarrow.parquet as pq
    stamps = [dt.datetime(2014, 5, 13) + dt.timedelta(days=k) for k in range(36)]
    pq.write_table(pa.table({"user": [u for u in USERS for _ in ITEMS], "item": ITEMS * 6, "timestamp": stamps}),
                   tmp_path / "t.parquet")
    prep = preprocess(PrepareOptions("table", tmp_path / "t.parquet"))
    assert prep.report["counts"]["time_range"] == [1399939200.0, 1399939200.0 + 35 * 86400]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r'pip install "cllm4rec\[parquet\]"'):
        preprocess(PrepareOptions("table", path))


# ----------------------------------------------------------------------------- bad input


def _lines_with(bad_line: str, at: int = 5):
    lines = [json.dumps(r) for r in _grid()]
    lines.insert(at - 1, bad_line)
    return lines


AMAZON_BAD = [
    ("{not json nor python", "(whole line)", "neither JSON nor a Python literal"),
    ("[1, 2, 3]", "(whole line)", "not a dict"),
    (json.dumps({"asin": "i0", "overall": 5.0}), "reviewerID", "missing"),
    (json.dumps({"reviewerID": "u0", "overall": 5.0}), "asin", "missing"),
    (json.dumps({"reviewerID": "u0", "asin": "i0"}), "overall", "missing"),
    (json.dumps(_review("u0", "i0", "five")), "overall", "not a number"),
    (json.dumps(_review("u0", "i0", float("nan"))), "overall", "not a finite number"),
    (json.dumps(_review("  ", "i0")), "reviewerID", "empty id"),
    (json.dumps(_review("u0", None)), "asin", "null id"),
    (json.dumps(_review("u0", ["i0"])), "asin", "not a string or an integer"),
    (json.dumps(_review("u0", "i0", text=7)), "reviewText", "not a string"),
    (json.dumps(_review("u0", "i0", unixReviewTime="yesterday")), "unixReviewTime", "not a number"),
]


@pytest.mark.parametrize("bad_line,field,reason", AMAZON_BAD)
def test_amazon_malformed_line_names_file_line_field(tmp_path, bad_line, field, reason):
    path = _write(tmp_path / "Bad_5.json", _lines_with(bad_line, at=5))
    with pytest.raises(RawDataError) as err:
        preprocess(_amazon(path))
    message = str(err.value)
    assert "Bad_5.json: line 5: " in message and f"field {field!r}" in message and reason in message
    assert "--bad-lines skip" in message


def test_amazon_invalid_utf8_line(tmp_path):
    path = tmp_path / "r.json"
    lines = [json.dumps(r).encode() for r in _grid()]
    lines.insert(2, b'{"reviewerID": "\xff\xfe"}')
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(RawDataError, match=r"r\.json: line 3: field '\(whole line\)': not UTF-8"):
        preprocess(_amazon(path))


def test_meta_malformed_line(tmp_path):
    path = _json_lines(tmp_path / "r.json", _grid())
    meta = _write(tmp_path / "meta_X.json", [repr({"asin": "i0", "title": "T"}), repr({"title": "no asin"})])
    with pytest.raises(RawDataError, match=r"meta_X\.json: line 2: field 'asin': missing"):
        preprocess(_amazon(path, meta=meta))


def test_skip_policy_counts_and_reports(tmp_path, caplog):
    lines = [json.dumps(r) for r in _grid()]
    for at, bad in [(3, "garbage"), (10, json.dumps({"asin": "i0", "overall": 4})), (20, "also garbage"),
                    (30, json.dumps(_review("u1", "i1", "x")))]:
        lines.insert(at - 1, bad)
    lines.insert(15, "")  # a blank line is counted, not malformed
    path = _write(tmp_path / "r.json", lines)
    with caplog.at_level(logging.WARNING, logger="data_shards.raw"):
        index = prepare(_amazon(path, bad_lines="skip"), tmp_path / "out")
    assert index["num_interactions"] == 36
    bad = index["preprocessing"]["inputs"][0]["bad_records"]
    assert bad["policy"] == "skip" and bad["skipped"] == 4
    assert bad["reasons"] == {
        "(whole line): neither JSON nor a Python literal": {"count": 2, "first_lines": [3, 21]},
        "reviewerID: missing": {"count": 1, "first_lines": [10]},
        "overall: not a number": {"count": 1, "first_lines": [31]}}
    assert index["preprocessing"]["counts"]["rows_skipped"] == {
        "(whole line): neither JSON nor a Python literal": 2, "reviewerID: missing": 1,
        "overall: not a number": 1, "blank line": 1}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 4 malformed records" in w and "[3, 10, 21, 31]" in w for w in warning)
    # The same file with the default policy stops at the first bad line.
    with pytest.raises(RawDataError, match="line 3:"):
        preprocess(_amazon(path))


@pytest.mark.parametrize("header,rows,kw,expect", [
    (["user", "item"], [("u0", "i0")], {"user_col": "uid"}, r"column 'uid' not found.*--user-col"),
    (["user", "item"], [("u0", "i0")], {"rating_col": "stars"}, r"column 'stars' not found.*--rating-col"),
    (["user", "item", "rating"], [("u0", "i0", "5"), ("u0", "i1")], {}, r"t\.csv: line 3: field '\(whole line\)': "
                                                                          r"has 2 cells, the header has 3"),
    (["user", "item", "rating"], [("u0", "i0", "5"), ("", "i1", "5")], {}, r"t\.csv: line 3: field 'user': empty id"),
    (["user", "item", "rating"], [("u0", "i0", "good")], {}, r"t\.csv: line 2: field 'rating': not a number"),
    (["user", "item", "rating"], [("u0", "i0", "")], {}, r"t\.csv: line 2: field 'rating': empty"),
])
def test_table_malformed(tmp_path, header, rows, kw, expect):
    path = _write_table(tmp_path / "t.csv", header, rows)
    with pytest.raises(RawDataError, match=expect):
        preprocess(PrepareOptions("table", path, **kw))


def test_parquet_malformed_row(tmp_path):
    rows = [("u0", "i0", 5.0), ("u1", None, 5.0)]
    path = _write_table(tmp_path / "t.parquet", ["user", "item", "rating"], rows)
    with pytest.raises(RawDataError, match=r"t\.parquet: row 2: field 'item': null id"):
        preprocess(PrepareOptions("table", path))


def test_text_table_malformed_and_missing_columns(tmp_path):
    inter = _write_table(tmp_path / "t.csv", ["user", "item"], [(u, i) for u in USERS for i in ITEMS])
    bad_reviews = _write_table(tmp_path / "rv.csv", ["user", "item", "review"], [("u0", "i0", "ok"), ("u0", "", "x")])
    with pytest.raises(RawDataError, match=r"rv\.csv: line 3: field 'item': empty id"):
        preprocess(PrepareOptions("table", inter, reviews=bad_reviews))
    no_bio = _write_table(tmp_path / "ut.csv", ["user", "bio"], [("u0", "x")])
    with pytest.raises(RawDataError, match=r"ut\.csv: header: column 'biography' not found.*add a column named"):
        preprocess(PrepareOptions("table", inter, user_texts=no_bio))
    # Text headers are checked before the (long) interaction pass, which would fail at line 2 here.
    bad_inter = _write_table(tmp_path / "bad.csv", ["user", "item"], [("", "i0")])
    with pytest.raises(RawDataError, match=r"ut\.csv: header"):
        preprocess(PrepareOptions("table", bad_inter, user_texts=no_bio))
    no_text = _write_table(tmp_path / "it.csv", ["item", "price"], [("i0", "3")])
    with pytest.raises(RawDataError, match=r"it\.csv: header: none of the text columns"):
        preprocess(PrepareOptions("table", inter, item_texts=no_text))


def test_empty_file_and_nothing_left(tmp_path):
    empty = tmp_path / "empty.json.gz"
    empty.write_bytes(gzip.compress(b""))
    with pytest.raises(RawDataError, match="empty.json.gz: no usable interactions"):
        preprocess(_amazon(empty))
    sparse = _json_lines(tmp_path / "sparse.json", [_review(f"u{k}", f"i{k}") for k in range(10)])
    with pytest.raises(RawDataError, match=r"no interactions left after the k-core \(users need >= 5, items >= 5"):
        preprocess(_amazon(sparse))
    with pytest.raises(RawDataError, match=r"header\.csv: the file is empty"):
        preprocess(PrepareOptions("table", _write(tmp_path / "header.csv", [""])))


def test_options_are_checked(tmp_path):
    path = _json_lines(tmp_path / "r.json", _grid())
    with pytest.raises(ValueError, match="--reviews cannot be used with --source amazon"):
        preprocess(_amazon(path, reviews=path))
    with pytest.raises(ValueError, match="three positive fractions"):
        preprocess(_amazon(path, split=(0.9, 0.1, 0.0)))
    with pytest.raises(RawDataError, match="unknown table format"):
        preprocess(PrepareOptions("table", path))


# ----------------------------------------------------------------------------- CLI


def test_cli_prepare(tmp_path, capsys):
    path = _json_lines(tmp_path / "r.json", _grid())
    out = tmp_path / "out"
    cli_main(["prepare", "--source", "amazon", "--input", str(path), "--output", str(out), "--split", "0.6,0.2,0.2",
              "--seed", "3", "--docs-per-shard", "10"])
    assert "6 users, 6 items, 36 interactions" in capsys.readouterr().out
    index = load_index(out)
    assert index["splits"] == {"train": 24, "val": 6, "test": 6}
    assert index["preprocessing"]["settings"]["split"] == [0.6, 0.2, 0.2]
    assert index["preprocessing"]["settings"]["seed"] == 3
    assert len(index["streams"]["content"]["shards"]) == 3

    bad = _write(tmp_path / "bad.json", _lines_with('{"reviewerID": "u0", "asin": "i0", "overall": "x"}', at=2))
    with pytest.raises(SystemExit) as err:
        cli_main(["prepare", "--source", "amazon", "--input", str(bad), "--output", str(tmp_path / "o2")])
    message = str(err.value.code)
    assert message.startswith("cllm4rec prepare: ") and "bad.json: line 2: field 'overall'" in message
    assert "\n" not in message
    cli_main(["prepare", "--source", "amazon", "--input", str(bad), "--output", str(tmp_path / "o2"),
              "--bad-lines", "skip", "--no-rating-filter", "--kcore", "0"])
    assert load_index(tmp_path / "o2")["preprocessing"]["settings"]["rating_above"] is None
    with pytest.raises(SystemExit, match="--split"):
        cli_main(["prepare", "--source", "amazon", "--input", str(path), "--output", str(out), "--split", "a,b"])


def test_id_maps_are_written_before_the_completion_marker(tmp_path, monkeypatch):
    """A kill between the maps and index.json must not leave a folder that looks finished."""
    from data_shards import build
    from data_shards.reader import ShardError, load_index

    path, _ = _random_file(tmp_path, seed=1)
    written = []
    real = build._write_json_list

    def record_then_die_on_items(p, values):
        written.append(p.name)
        if p.name == "items.json":
            raise KeyboardInterrupt  # stands in for a SIGKILL at this moment
        real(p, values)

    monkeypatch.setattr(build, "_write_json_list", record_then_die_on_items)
    with pytest.raises(KeyboardInterrupt):
        prepare(_amazon(path, kcore=0), tmp_path / "out")
    assert written == ["users.json", "items.json"] and not (tmp_path / "out" / "index.json").exists()
    monkeypatch.undo()
    prepare(_amazon(path, kcore=0), tmp_path / "out", overwrite=True)
    (tmp_path / "out" / "id_maps" / "users.json").unlink()  # lost after the fact
    with pytest.raises(ShardError, match=r"lists id_maps/users.json, which is missing"):
        load_index(tmp_path / "out")


def test_overwrite_deletes_only_what_the_project_wrote(tmp_path):
    from data_shards.reader import ShardReader

    path, _ = _random_file(tmp_path, seed=1)
    out = tmp_path / "out"
    prepare(_amazon(path, kcore=0), out)
    notes = [out / "content" / "my_notes.txt", out / "id_maps" / "README", out / "notes.txt",
             out / "splits" / "mine.npz"]
    for note in notes:
        note.write_text("keep me")
    prepare(_amazon(path, kcore=0), out, overwrite=True)
    assert all(note.read_text() == "keep me" for note in notes)
    assert not ShardReader(out, "content", 4).problems()


def test_an_output_that_cannot_be_written_is_refused_before_preprocessing(tmp_path, monkeypatch):
    from data_shards import prepare as prepare_module

    path, _ = _random_file(tmp_path, seed=1)
    monkeypatch.setattr(prepare_module, "preprocess", lambda options: pytest.fail("preprocessed first"))
    with pytest.raises(PermissionError, match="cannot write there"):
        prepare(_amazon(path, kcore=0), Path("/proc/cllm4rec-shards"))


# ----------------------------------------------------------------------------- table layouts (MovieLens files)


def _movielens_100k(folder: Path) -> tuple[Path, Path]:
    """u.data (tab-separated user, item, rating, timestamp, no header) and u.item (pipe-separated,
    Latin-1, no header, 24 columns), laid out as MovieLens 100K ships them."""
    rows = [f"{u}\t{i}\t{4 + (u + i) % 2}\t{881250949 + u * 10 + i}" for u in range(1, 7) for i in range(1, 7)]
    rows.append("1\t9\t1\t881250000")  # rated 1: filtered out
    (folder / "u.data").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    items = [f"{i}|Café {i} (1995)|01-Jan-1995||http://x/{i}|" + "|".join("01"[(i + g) % 2] for g in range(19))
             for i in range(1, 7)]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return folder / "u.data", folder / "u.item"


def test_movielens_headerless_tab_table_and_latin1_pipe_item_texts(tmp_path, capsys):
    data, item = _movielens_100k(tmp_path)
    out = tmp_path / "out"
    cli_main(["prepare", "--source", "table", "--input", str(data), "--output", str(out), "--sep", "tab",
              "--columns", "user,item,rating,timestamp", "--item-texts", str(item), "--item-texts-sep", "|",
              "--item-texts-encoding", "latin-1", "--item-texts-columns", "item,title"])
    index = load_index(out)
    counts = index["preprocessing"]["counts"]
    assert counts["rows_read"] == 37 and counts["after_rating_filter"] == 36  # no data row taken as a header
    assert index["num_users"] == 6 and index["num_items"] == 6
    titles = {k[2]: k[3] for k in _named_texts(out) if k[0] == "title"}
    assert titles == {str(i): f"Café {i} (1995)" for i in range(1, 7)}
    assert index["preprocessing"]["inputs"][0]["layout"] == {"sep": "\t", "encoding": "utf-8", "header": False,
                                                             "columns": ["user", "item", "rating", "timestamp"]}
    # The same file by column position.
    by_position = tmp_path / "by_position"
    cli_main(["prepare", "--source", "table", "--input", str(data), "--output", str(by_position), "--sep", "\\t",
              "--no-header", "--user-col", "1", "--item-col", "2", "--rating-col", "3", "--time-col", "4"])
    assert _pairs_by_name(by_position) == _pairs_by_name(out)


def test_a_data_row_is_not_taken_for_a_header(tmp_path):
    data, _ = _movielens_100k(tmp_path)
    with pytest.raises(SystemExit) as err:
        cli_main(["prepare", "--source", "table", "--input", str(data), "--output", str(tmp_path / "o"),
                  "--sep", "tab", "--user-col", "1", "--item-col", "1", "--rating-col", "5"])
    assert "u.data: line 1 looks like data, not a header" in str(err.value.code)
    assert "--no-header" in str(err.value.code)
    with pytest.raises(RawDataError, match=r"unknown table format.*--sep"):
        preprocess(PrepareOptions("table", data))


def test_multi_character_separator(tmp_path):
    """MovieLens 1M's ratings.dat: UserID::MovieID::Rating::Timestamp, split plainly."""
    path = _write(tmp_path / "ratings.dat", [f"{u}::{i}::5::97830{u}{i}" for u in range(6) for i in range(6)])
    prep = preprocess(PrepareOptions("table", path, input_format=TableFormat(
        sep="::", columns=("user", "item", "rating", "timestamp"))))
    assert prep.report["counts"]["rows_read"] == 36 and len(prep.user_names) == 6
    with pytest.raises(RawDataError, match=r"--columns names 4 columns but line 1 has 1 cells"):
        preprocess(PrepareOptions("table", path, input_format=TableFormat(sep="|", columns=("user", "item", "r", "t"))))


def test_layout_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--encoding 'nope': unknown encoding"):
        TableFormat(encoding="nope")
    with pytest.raises(ValueError, match="--reviews-encoding 'utf-16': .*ASCII-compatible"):
        TableFormat(encoding="utf-16", flags="--reviews-")
    path = _json_lines(tmp_path / "r.json", _grid())
    with pytest.raises(ValueError, match="are for --source table"):
        preprocess(_amazon(path, input_format=TableFormat(sep="\t")))
    parquet = _write_table(tmp_path / "t.parquet", ["user", "item"], [("u0", "i0")])
    with pytest.raises(RawDataError, match="Parquet file has its own columns"):
        preprocess(PrepareOptions("table", parquet, input_format=TableFormat(encoding="latin-1")))


def test_undecodable_line_is_named_and_can_be_skipped(tmp_path):
    """A bad byte on line 800 is reported on line 800 (stream decoding named a line blocks
    earlier), and --bad-lines skip skips that line alone."""
    rows = [f"u{k % 40},i{k % 37},5,{k}" for k in range(1, 1200)]
    lines = ["user,item,rating,timestamp"] + rows
    data = "\n".join(lines).encode() + b"\n"
    cut = sum(len(line) + 1 for line in lines[:799])  # start of line 800
    data = data[:cut] + b"u9\xff" + data[cut + 2:]  # "u9\xff,..." replaces line 800's user
    path = tmp_path / "t.csv"
    path.write_bytes(data)
    with pytest.raises(RawDataError, match=r"t\.csv: line 800: .*not utf-8 text \(see --encoding\)"):
        preprocess(PrepareOptions("table", path, kcore=0))
    prep = preprocess(PrepareOptions("table", path, kcore=0, bad_lines="skip"))
    assert prep.report["counts"]["rows_read"] == 1198
    assert prep.report["counts"]["rows_skipped"] == {"(whole line): not utf-8 text (see --encoding)": 1}
    assert prep.report["inputs"][0]["bad_records"]["reasons"] == {
        "(whole line): not utf-8 text (see --encoding)": {"count": 1, "first_lines": [800]}}
    # Latin-1 decodes every byte: the same file reads whole.
    whole = preprocess(PrepareOptions("table", path, kcore=0, input_format=TableFormat(encoding="latin-1")))
    assert whole.report["counts"]["rows_read"] == 1199 and whole.report["counts"]["rows_skipped"] == {}
