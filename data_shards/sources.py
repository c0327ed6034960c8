"""Read CLLM4Rec-format data folders into plain Python/scipy objects.

A CLLM4Rec folder (the format of the authors' code) holds:

- ``meta.pkl``: a dict with ``num_users`` and ``num_items`` (numpy ints possible, so
  unpickling needs numpy);
- ``train_matrix.npz``, ``val_matrix.npz``, ``test_matrix.npz``: scipy CSR user x item
  matrices of 0/1;
- optional ``item_texts/{title,brand,categories,description}.pkl``,
  ``user_item_texts/review.pkl`` and ``user_texts/biography.pkl``: pickled lists of
  ``[prompt, text]`` whose prompt carries the ``user_<u>`` / ``item_<i>`` ids;
- optional HyperLLM tags ``id_to_tag.json`` + ``tag_to_item.json``.

Extra text folders (``text_dirs``, e.g. ``derived/`` next to ``full/``) may hold
``item_texts/``, ``user_item_texts/``, ``user_texts/`` and tag files keyed to the same ids.

Pickle runs code on load: these input folders are trusted local files. The project's own
formats (the shards written by :mod:`data_shards.build`) are JSON/npz, never pickle.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.sparse as sp

from .names import ITEM_TEXT_KINDS, SPLITS

log = logging.getLogger(__name__)


_USER_RE = re.compile(r"user_(\d+)")
_ITEM_RE = re.compile(r"item_(\d+)")


@dataclass
class TextRecord:
    """One piece of text about a user, an item, or a (user, item) pair.

    kind is one of TEXT_KINDS. ``review`` has both ids; item kinds (title, brand,
    categories, description, tags) have ``user=None``; ``biography`` has ``item=None``.
    ``text`` is stripped of leading/trailing whitespace.
    """

    kind: str
    user: int | None
    item: int | None
    text: str


@dataclass
class RawDataset:
    """Interactions (CSR float32 0/1, shape (num_users, num_items)) and texts."""

    num_users: int
    num_items: int
    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix
    texts: list[TextRecord] = field(default_factory=list)
    # One dict per text file read: {"file", "kind", "records", "skipped", "skip_reasons"}.
    text_sources: list[dict] = field(default_factory=list)


class DataFormatError(ValueError):
    """A CLLM4Rec input file is inconsistent; the message names the file and the fix."""


# ----------------------------------------------------------------------------- helpers


def _display(path: Path, folder: Path) -> str:
    """Path relative to the parent of its data folder (e.g. ``mini/item_texts/title.pkl``)."""
    try:
        return str(path.relative_to(folder.parent))
    except ValueError:
        return path.name


def _load_pickle(path: Path):
    # Trusted local CLLM4Rec input only (see module docstring).
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise DataFormatError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); "
                              "is this a CLLM4Rec-format file?") from e


ID_MAP = "id_map.json"  # a subset's ids -> the full split's: row_to_original_user, col_to_original_item


@dataclass
class OriginalIds:
    """A subset folder's id_map.json, inverted: the full split's id -> this folder's id."""

    users: dict[int, int]
    items: dict[int, int]


def _load_id_map(folder: Path) -> dict | None:
    path = folder / ID_MAP
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        id_map = json.load(f)
    missing = [k for k in ("num_users", "num_items", "row_to_original_user", "col_to_original_item") if k not in id_map]
    if missing:
        raise DataFormatError(f"{path}: missing {missing}; expected num_users, num_items, row_to_original_user and "
                              "col_to_original_item")
    if (len(id_map["row_to_original_user"]), len(id_map["col_to_original_item"])) != (id_map["num_users"],
                                                                                      id_map["num_items"]):
        raise DataFormatError(f"{path}: row_to_original_user / col_to_original_item do not have num_users / "
                              "num_items entries")
    return id_map


def _load_meta(folder: Path, id_map: dict | None) -> tuple[int, int]:
    path = folder / "meta.pkl"
    if not path.is_file():
        if id_map is not None:  # a subset folder: its sizes are in id_map.json
            return int(id_map["num_users"]), int(id_map["num_items"])
        raise FileNotFoundError(f"{path} is missing: a CLLM4Rec folder needs meta.pkl "
                                f"(or a subset's {ID_MAP}) with num_users and num_items")
    meta = _load_pickle(path)
    if not isinstance(meta, dict) or "num_users" not in meta or "num_items" not in meta:
        raise DataFormatError(f"{path}: expected a dict with keys 'num_users' and 'num_items', "
                              f"got {type(meta).__name__}"
                              + (f" with keys {sorted(map(str, meta))[:10]}" if isinstance(meta, dict) else ""))
    try:
        nu, ni = int(meta["num_users"]), int(meta["num_items"])
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{path}: num_users/num_items are not integers: {e}") from e
    if nu <= 0 or ni <= 0:
        raise DataFormatError(f"{path}: num_users={nu}, num_items={ni} must be positive")
    return nu, ni


def _load_matrix(path: Path, shape: tuple[int, int], meta_path: Path) -> sp.csr_matrix:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a CLLM4Rec folder needs "
                                "train_matrix.npz, val_matrix.npz and test_matrix.npz")
    try:
        m = sp.load_npz(path)
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(f"{path}: not a scipy.sparse .npz file ({type(e).__name__}: {e})") from e
    if m.shape != shape:
        raise DataFormatError(f"{path}: shape {m.shape} does not match {meta_path} "
                              f"(num_users={shape[0]}, num_items={shape[1]}); the matrix and meta.pkl "
                              "come from different datasets: use the meta.pkl of the same split")
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def _check_disjoint(mats: dict[str, sp.csr_matrix], paths: dict[str, Path]) -> None:
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = mats[a].multiply(mats[b]).tocoo()
        if both.nnz:
            u, i = int(both.row[0]), int(both.col[0])
            raise DataFormatError(
                f"{paths[a]} and {paths[b]} share {both.nnz} (user, item) pairs, e.g. (user {u}, item {i}): "
                "each interaction must be in exactly one split; re-split the data so the splits are disjoint")


def _pair_keys(m: sp.csr_matrix) -> set[int]:
    coo = m.tocoo()
    return set((coo.row.astype(np.int64) * m.shape[1] + coo.col.astype(np.int64)).tolist())


def _parse_id(regex: re.Pattern, prompt: str, what: str, limit: int, path: Path, k: int) -> int:
    m = regex.search(prompt)
    if m is None:
        raise DataFormatError(
            f"{path}: record {k}: prompt {prompt!r} has no {what}_<id>; every prompt of this file must "
            f"name the {what} (e.g. '{what}_12'): fix or remove the record")
    v = int(m.group(1))
    if v >= limit:
        raise DataFormatError(
            f"{path}: record {k}: {what} id {v} is out of range [0, {limit}); the text file is keyed to other "
            "ids than meta.pkl/the matrices: use text files of the same split (or re-key them)")
    return v


class _Collector:
    """Accumulates TextRecords, keeping one record per (kind, user, item)."""

    def __init__(self):
        self.records: list[TextRecord] = []
        self.sources: list[dict] = []
        self._seen: set[tuple] = set()

    def add(self, rec: TextRecord) -> bool:
        key = (rec.kind, rec.user, rec.item)
        if key in self._seen:
            return False
        self._seen.add(key)
        self.records.append(rec)
        return True


def _skip(reasons: dict[str, int], reason: str) -> None:
    reasons[reason] = reasons.get(reason, 0) + 1


def _read_prompt_text_file(path: Path, folder: Path, kind: str, num_users: int, num_items: int,
                           train_pairs: set[int], out: _Collector, original: OriginalIds | None = None) -> None:
    """`original`: the file is keyed to the full split's ids, mapped to this folder's through it;
    records of users or items outside the subset are skipped and counted."""
    data = _load_pickle(path)
    if not isinstance(data, (list, tuple)):
        raise DataFormatError(f"{path}: expected a list of [prompt, text] pairs, got {type(data).__name__}")
    added, reasons = 0, {}
    not_train_examples = []
    limits = (num_users, num_items) if original is None else (1 << 62, 1 << 62)  # original ids: any
    for k, rec in enumerate(data):
        if not (isinstance(rec, (list, tuple)) and len(rec) == 2
                and isinstance(rec[0], str) and isinstance(rec[1], str)):
            raise DataFormatError(f"{path}: record {k}: expected [prompt: str, text: str], got {rec!r:.200}; "
                                  "fix or remove the record")
        prompt, text = rec
        user = item = None
        if kind in ("review", "biography"):
            user = _parse_id(_USER_RE, prompt, "user", limits[0], path, k)
        if kind != "biography":
            item = _parse_id(_ITEM_RE, prompt, "item", limits[1], path, k)
        if original is not None:
            user = None if user is None else original.users.get(user, -1)
            item = None if item is None else original.items.get(item, -1)
            if user == -1 or item == -1:
                _skip(reasons, "user or item not in this subset")
                continue
        text = text.strip()
        if not text:
            _skip(reasons, "empty text")
            continue
        if kind == "review" and (user * num_items + item) not in train_pairs:
            # Only train interactions may carry review text: text of a val/test pair would leak
            # the held-out interaction into training.
            _skip(reasons, "pair is not a train interaction")
            if len(not_train_examples) < 5:
                not_train_examples.append((k, user, item))
            continue
        if out.add(TextRecord(kind, user, item, text)):
            added += 1
        else:
            _skip(reasons, "duplicate (kind, user, item)")
    skipped = sum(reasons.values())
    name = _display(path, folder)
    if reasons:
        log.warning("%s: kept %d %s records, skipped %d: %s%s", name, added, kind, skipped, reasons,
                    f"; non-train pairs (record, user, item), first ones: {not_train_examples}"
                    if not_train_examples else "")
    else:
        log.info("%s: %d %s records", name, added, kind)
    out.sources.append({"file": name, "kind": kind, "records": added, "skipped": skipped,
                        "skip_reasons": reasons})


def _read_tags(tdir: Path, folder: Path, num_items: int, out: _Collector) -> None:
    id_path, item_path = tdir / "id_to_tag.json", tdir / "tag_to_item.json"
    with open(id_path, encoding="utf-8") as f:
        id_to_tag = json.load(f)
    with open(item_path, encoding="utf-8") as f:
        tag_to_item = json.load(f)
    if not isinstance(id_to_tag, dict) or not isinstance(tag_to_item, dict):
        raise DataFormatError(f"{id_path} / {item_path}: expected JSON objects (tag id -> tag, tag id -> items)")
    per_item: dict[int, list[str]] = {}

    def tag_order(key: str):
        try:
            return (0, int(key), key)
        except ValueError:
            return (1, 0, key)

    for k, tid in enumerate(sorted(tag_to_item, key=tag_order)):
        if tid not in id_to_tag:
            raise DataFormatError(f"{item_path}: entry {k} (tag id {tid!r}) has no tag string in {id_path}; "
                                  "use id_to_tag.json and tag_to_item.json from the same export")
        tag = str(id_to_tag[tid]).strip()
        if not tag:
            continue
        for item in tag_to_item[tid]:
            try:
                item = int(item)
            except (TypeError, ValueError) as e:
                raise DataFormatError(f"{item_path}: entry {k} (tag id {tid!r}): item {item!r} is not an integer") from e
            if not 0 <= item < num_items:
                raise DataFormatError(
                    f"{item_path}: entry {k} (tag id {tid!r}): item id {item} is out of range [0, {num_items}); "
                    "the tag files are keyed to other ids than meta.pkl: use the tags of the same split")
            tags = per_item.setdefault(item, [])
            if tag not in tags:
                tags.append(tag)
    added, reasons = 0, {}
    for item in sorted(per_item):
        if out.add(TextRecord("tags", None, item, ", ".join(per_item[item]))):
            added += 1
        else:
            _skip(reasons, "duplicate (kind, user, item)")
    name = _display(item_path, folder)
    log.info("%s (+ id_to_tag.json): %d items with tags", name, added)
    out.sources.append({"file": name, "kind": "tags", "records": added, "skipped": sum(reasons.values()),
                        "skip_reasons": reasons, "also_read": [_display(id_path, folder)]})


def _read_text_dir(tdir: Path, num_users: int, num_items: int, train_pairs: set[int], out: _Collector,
                   original: OriginalIds | None = None) -> None:
    for kind in ITEM_TEXT_KINDS:
        p = tdir / "item_texts" / f"{kind}.pkl"
        if p.is_file():
            _read_prompt_text_file(p, tdir, kind, num_users, num_items, train_pairs, out, original)
    if original is None and (tdir / "id_to_tag.json").is_file() and (tdir / "tag_to_item.json").is_file():
        _read_tags(tdir, tdir, num_items, out)
    p = tdir / "user_texts" / "biography.pkl"
    if p.is_file():
        _read_prompt_text_file(p, tdir, "biography", num_users, num_items, train_pairs, out, original)
    p = tdir / "user_item_texts" / "review.pkl"
    if p.is_file():
        _read_prompt_text_file(p, tdir, "review", num_users, num_items, train_pairs, out, original)


# ----------------------------------------------------------------------------- public


def load_cllm4rec(folder, text_dirs: Iterable = (), original_id_text_dirs: Iterable = ()) -> RawDataset:
    """Load a CLLM4Rec-format folder (plus optional extra text folders keyed to the same ids).

    A subset folder may carry id_map.json instead of meta.pkl (its sizes and, for each of its
    users and items, the id in the full split it was cut from); ``original_id_text_dirs`` are
    then text folders keyed to the full split's ids, re-keyed through that map (texts of users
    and items outside the subset are skipped and counted; tags are not read from them).

    Texts are read from ``folder`` first, then from each of ``text_dirs`` in order; per folder
    in this order: item_texts (title, brand, categories, description), tags, user_texts
    (biography), user_item_texts (review). A (kind, user, item) seen before is kept once
    (the first one wins). Empty texts and reviews of pairs that are not TRAIN interactions are
    skipped, counted in ``text_sources`` and logged. Inconsistent inputs raise
    :class:`DataFormatError` naming the file, the record and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (expected a CLLM4Rec-format folder with meta.pkl "
                                "and {train,val,test}_matrix.npz)")
    original_dirs = [Path(d) for d in original_id_text_dirs]
    needs_map = original_dirs or not (folder / "meta.pkl").is_file()
    id_map = _load_id_map(folder) if needs_map else None
    num_users, num_items = _load_meta(folder, id_map)
    paths = {s: folder / f"{s}_matrix.npz" for s in SPLITS}
    mats = {s: _load_matrix(paths[s], (num_users, num_items), folder / "meta.pkl") for s in SPLITS}
    _check_disjoint(mats, paths)
    train_pairs = _pair_keys(mats["train"])

    out = _Collector()
    dirs = [folder] + [Path(d) for d in text_dirs]
    for d in dirs[1:]:
        if not d.is_dir():
            raise FileNotFoundError(f"text folder {d} does not exist (text_dirs must be folders holding "
                                    f"item_texts/ and/or user_item_texts/ keyed to the ids of {folder})")
    for d in dirs:
        _read_text_dir(d, num_users, num_items, train_pairs, out)
    if original_dirs:
        if id_map is None:
            raise FileNotFoundError(f"{folder / ID_MAP} is missing: text folders keyed to the full split's ids "
                                    f"({', '.join(map(str, original_dirs))}) need the subset's id map")
        original = OriginalIds(users={int(o): k for k, o in enumerate(id_map["row_to_original_user"])},
                               items={int(o): k for k, o in enumerate(id_map["col_to_original_item"])})
        for d in original_dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"text folder {d} does not exist")
            _read_text_dir(d, num_users, num_items, train_pairs, out, original)
    log.info("%s: %d users, %d items, train/val/test %d/%d/%d, %d text records",
             folder.name, num_users, num_items, mats["train"].nnz, mats["val"].nnz, mats["test"].nnz,
             len(out.records))
    return RawDataset(num_users=num_users, num_items=num_items, train=mats["train"], val=mats["val"],
                      test=mats["test"], texts=out.records, text_sources=out.sources)
