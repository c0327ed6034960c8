"""Write a RawDataset as WebDataset tar shards plus an index (the project's own format).

Layout of ``out_dir``::

    index.json                       format_version 1: counts, shard list (size, sha256), text sources,
                                     the ID vocabulary the documents use (tokenization)
    splits/{train,val,test}.npz      scipy.sparse CSR (save_npz), for evaluation and masking
    collab/collab-00000.tar ...      one sample per user with >= 1 train item
    rec/rec-00000.tar ...            one sample per user with >= 1 train item (hold-out drawn at read time)
    content/content-00000.tar ...    one sample per text record

Every sample is ``{"__key__": "<9-digit index in the stream>", "json": <utf-8 JSON doc>}``.
Documents are plain dicts of ids and text (no model, no tokenizer here):

- collab / rec: ``{"user": u, "items": [train items ascending]}``
- content: ``{"kind": k, "user": u or null, "item": i or null, "text": str}``

Shards are byte-reproducible (fixed tar mtime/owner), so the sha256 in the index identifies
the content. No pickle anywhere in this format.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import scipy.sparse as sp

from .names import SPLITS, STREAMS, TEXT_KINDS
from .sources import RawDataset, load_cllm4rec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
# What build_shards writes into out_dir (and what overwrite=True removes).
_OWNED = (*STREAMS, "splits", "id_maps", INDEX_NAME)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def id_vocabulary(num_users: int, num_items: int) -> dict:
    """What of tokenization the shards fix: no token ids (documents are ids + raw text, tokenized
    by the model's tokenizer when batches are built), only the ID words and how many there are.
    The fingerprint changes exactly when a model's ID tables would have to change."""
    vocabulary = {"token_ids": "none (text; tokenized at training time)", "user_words": "user_<u>",
                  "item_words": "item_<i>", "num_users": num_users, "num_items": num_items}
    fingerprint = hashlib.sha256(json.dumps(vocabulary, sort_keys=True).encode()).hexdigest()
    return {**vocabulary, "fingerprint": fingerprint}


def _user_docs(train: sp.csr_matrix) -> Iterator[dict]:
    indptr, indices = train.indptr, train.indices
    for u in range(train.shape[0]):
        row = indices[indptr[u]:indptr[u + 1]]
        if row.size:
            yield {"user": u, "items": [int(i) for i in np.sort(row)]}


def _content_docs(dataset: RawDataset) -> Iterator[dict]:
    for rec in dataset.texts:
        yield {"kind": rec.kind, "user": None if rec.user is None else int(rec.user),
               "item": None if rec.item is None else int(rec.item), "text": rec.text}


def _write_stream(out_dir: Path, stream: str, docs: Iterable[dict], total: int, docs_per_shard: int) -> dict:
    import webdataset as wds  # lazy: webdataset imports torch

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the bar is optional
        def tqdm(x, **_):
            return x

    sdir = out_dir / stream
    sdir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer, path, count, n = None, None, 0, 0

    def close():
        nonlocal writer
        writer.close()
        writer = None
        shards.append({"path": path.relative_to(out_dir).as_posix(), "num_docs": count,
                       "bytes": path.stat().st_size, "sha256": sha256_of(path)})

    for doc in tqdm(docs, total=total, desc=f"shards {stream}", unit="doc", disable=None):
        if writer is None or count >= docs_per_shard:
            if writer is not None:
                close()
            path = sdir / f"{stream}-{len(shards):05d}.tar"
            # Fixed mtime/owner: identical inputs give byte-identical shards (and sha256).
            writer = wds.TarWriter(str(path), encoder=False, mtime=0.0, user="cllm4rec", group="cllm4rec")
            count = 0
        payload = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        writer.write({"__key__": f"{n:09d}", "json": payload})
        count += 1
        n += 1
    if writer is not None:
        close()
    if n != total:
        raise RuntimeError(f"internal error: wrote {n} {stream} docs, expected {total}")
    log.info("%s: %d docs in %d shards", stream, n, len(shards))
    return {"num_docs": n, "shards": shards}


def _check_dataset(ds: RawDataset) -> None:
    shape = (int(ds.num_users), int(ds.num_items))
    for name in SPLITS:
        m = getattr(ds, name)
        if not sp.issparse(m) or m.shape != shape:
            raise ValueError(f"dataset.{name} must be a scipy sparse matrix of shape {shape}, "
                             f"got {type(m).__name__} {getattr(m, 'shape', None)}")
    for k, rec in enumerate(ds.texts):
        if rec.kind not in TEXT_KINDS:
            raise ValueError(f"dataset.texts[{k}]: unknown kind {rec.kind!r} (expected one of {TEXT_KINDS})")


def _written_by_a_build(relative: str) -> bool:
    """Whether a path (relative to the shard folder, with /) is one that build_shards writes."""
    return bool(re.fullmatch(rf"(?:{INDEX_NAME}|(?:{'|'.join(STREAMS)})/(?:{'|'.join(STREAMS)})-\d{{5}}\.tar"
                             rf"|splits/(?:{'|'.join(SPLITS)})\.npz|id_maps/(?:users|items)\.json)(?:\.tmp)?",
                             relative))


def _write_json_list(path: Path, values: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(values, f, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; refusing to overwrite it. Pass overwrite=True "
                                  "(cllm4rec build-shards --overwrite) to replace its shards, or choose an "
                                  "empty/new output folder")
        # Remove only the files a build writes; anything else, inside its folders too, is left alone.
        kept = []
        for path in sorted(out_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            relative = path.relative_to(out_dir).as_posix()
            if path.is_file() and _written_by_a_build(relative):
                path.unlink()
            elif path.is_dir() and relative in _OWNED and not any(path.iterdir()):
                path.rmdir()
            elif path.is_file():
                kept.append(relative)
        if kept:
            log.warning("%s: keeping files that build-shards does not own: %s", out_dir, kept[:10])
    out_dir.mkdir(parents=True, exist_ok=True)


def build_shards(dataset: RawDataset, out_dir, docs_per_shard: int = 2000, overwrite: bool = False,
                 source: dict | None = None, extra: dict | None = None, extra_lists: dict | None = None) -> dict:
    """Write ``dataset`` as shards under ``out_dir`` (layout in the module docstring); return the index.

    Order is deterministic: collab/rec docs by user ascending, content docs in load order.
    Refuses a non-empty ``out_dir`` unless ``overwrite=True``. ``index.json`` is written last
    (atomically), so a folder without it is an unfinished build. ``extra`` keys (e.g. a
    preprocessing report) are merged into index.json; they may not replace the keys above.
    ``extra_lists`` ({relative path under id_maps/: JSON list}) are written before index.json too.
    """
    if int(docs_per_shard) < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    docs_per_shard = int(docs_per_shard)
    _check_dataset(dataset)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    train = sp.csr_matrix(dataset.train, dtype=np.float32)
    splits = {}
    (out_dir / "splits").mkdir(exist_ok=True)
    for name in SPLITS:
        m = sp.csr_matrix(getattr(dataset, name), dtype=np.float32)
        m.sort_indices()
        sp.save_npz(out_dir / "splits" / f"{name}.npz", m)
        splits[name] = int(m.nnz)

    n_users_with_train = int(np.count_nonzero(np.diff(train.indptr)))
    streams = {
        "collab": _write_stream(out_dir, "collab", _user_docs(train), n_users_with_train, docs_per_shard),
        "rec": _write_stream(out_dir, "rec", _user_docs(train), n_users_with_train, docs_per_shard),
        "content": _write_stream(out_dir, "content", _content_docs(dataset), len(dataset.texts), docs_per_shard),
    }
    index = {
        "format_version": FORMAT_VERSION,
        "num_users": int(dataset.num_users),
        "num_items": int(dataset.num_items),
        "num_interactions": sum(splits.values()),
        "splits": splits,
        "streams": streams,
        "text_sources": dataset.text_sources,
        "source": source or {},
        "tokenization": id_vocabulary(int(dataset.num_users), int(dataset.num_items)),
    }
    clash = sorted(set(extra or {}) & set(index))
    if clash:
        raise ValueError(f"extra index keys {clash} would replace keys build_shards writes")
    index.update(extra or {})
    for relative, values in (extra_lists or {}).items():
        if not _written_by_a_build(relative):
            raise ValueError(f"extra list {relative!r}: build_shards writes only id_maps/users.json and items.json")
        _write_json_list(out_dir / relative, values)
    tmp = out_dir / (INDEX_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, out_dir / INDEX_NAME)
    log.info("wrote %s: %s", out_dir / INDEX_NAME,
             {k: v["num_docs"] for k, v in streams.items()})
    return index


def main_build(input_dir, output_dir, text_dirs=(), docs_per_shard: int = 2000, overwrite: bool = False,
               original_id_text_dirs=()) -> dict:
    """``load_cllm4rec(input_dir, text_dirs, original_id_text_dirs)`` then ``build_shards`` (what
    ``cllm4rec build-shards`` runs)."""
    text_dirs = [Path(d) for d in text_dirs]
    original_id_text_dirs = [Path(d) for d in original_id_text_dirs]
    dataset = load_cllm4rec(input_dir, text_dirs, original_id_text_dirs)
    source = {
        "format": "cllm4rec",
        "input_dir": str(Path(input_dir).resolve()),
        "text_dirs": [str(d.resolve()) for d in text_dirs],
        "original_id_text_dirs": [str(d.resolve()) for d in original_id_text_dirs],
    }
    return build_shards(dataset, output_dir, docs_per_shard=docs_per_shard, overwrite=overwrite, source=source)
