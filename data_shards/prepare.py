"""``cllm4rec prepare``: raw public data -> the CLLM4Rec preprocessing -> shards.

Inputs (formats in :mod:`data_shards.raw`):

- ``source="amazon"``: an Amazon review file (2014 ``reviews_<Category>_5.json.gz`` or 2018
  ``<Category>_5.json.gz``), optionally its ``meta_<Category>.json.gz`` for item texts;
- ``source="table"``: an interaction table (CSV/TSV/Parquet) with a user and an item column,
  optionally a rating and a timestamp column, plus optional text tables keyed by the same
  user/item columns: item texts (any of the columns title, brand, categories, description),
  user texts (biography) and reviews (user, item, review text).

Preprocessing, in this order (the paper's; every step is an option of :class:`PrepareOptions`):

1. **Rating filter**: keep rows with rating > ``rating_above`` (default 3). ``None`` turns it
   off; a table without a rating column keeps every row.
2. **Dedupe**: duplicate (user, item) rows collapse into one interaction.
3. **Iterative k-core** (default k=5): drop every user with fewer than max(k, 3) interactions
   and every item with fewer than k, and repeat until nothing changes. Users always need 3
   (one train, one val, one test item), so with ``kcore=0`` users with fewer than 3
   interactions are still dropped, and nothing else.
4. **Ids**: the surviving original ids are sorted as strings; a user's/item's contiguous id is
   its position in that order. Both maps are written as ``id_maps/users.json`` and
   ``id_maps/items.json`` (a JSON list: list index = contiguous id, value = original id).
5. **Split** per user, seeded: the interactions sorted by (user, item) get keys
   ``np.random.default_rng(seed).random(n)``; each user's items, ordered by key, go first to
   val, then test, then train. With n items and fractions (f_train, f_val, f_test),
   ``n_val = max(1, floor(n * f_val))``, ``n_test = max(1, floor(n * f_test))`` (floor with a
   1e-9 tolerance against float error) and train takes the rest; if that would leave train
   empty (only with a tiny f_train), val and then test give items back until train has one.
   So every user has >= 1 train, val and test item, and the splits are disjoint.
6. **Texts** (content documents): reviews only of TRAIN pairs (the text of a val/test pair
   would leak the held-out interaction); for Amazon the review text is ``reviewText`` alone,
   like the authors' ``review.pkl`` (``summary`` is not used), taken from the first row of
   the pair (in file order) that passed the rating filter and has a non-empty text. Item
   texts (title, brand, categories, description) and user biographies only for users/items
   that survive; the first non-empty text per (kind, user, item) wins. A missing or empty
   text is not an error: the interaction is kept, without that document. Every record of a
   text file is accounted for in ``text_sources`` (records + skipped by reason).

Texts are never held in memory: :class:`FileTexts` re-reads its file on every iteration and
yields only the records a first pass selected, which is how ``build_shards`` gets them.

Malformed input raises :class:`data_shards.raw.RawDataError` naming the file, the line and the
field, unless ``bad_lines="skip"`` (then such records are skipped, counted and reported). No
interactions at all, or none left after the k-core, is an error too.

The output folder is what ``cllm4rec build-shards`` writes (so it is a ``data.shards``
folder), plus ``id_maps/``; ``index.json`` carries a ``preprocessing`` report (settings, input
files, malformed records skipped, counts after every step) and ``id_maps`` (relative paths).
"""
from __future__ import annotations

import logging
import math
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp

from .build import build_shards
from .raw import (AMAZON_REVIEW_FIELDS, BAD_LINE_POLICIES, Column, InteractionFields, Interactions, JsonLinesFile,
                  Malformed, RawDataError, TableFile, TableFormat, file_report, get_id, get_text, read_interactions)
from .names import ITEM_TEXT_KINDS, SPLITS
from .sources import RawDataset, TextRecord

log = logging.getLogger(__name__)

SOURCES = ("amazon", "table")
ID_MAPS = "id_maps"
MIN_USER_INTERACTIONS = 3  # one train, one val and one test item
_TRAIN, _VAL, _TEST = 0, 1, 2


@dataclass
class PrepareOptions:
    """What to read and how to preprocess it (defaults: the paper's settings)."""

    source: str
    input: Path
    meta: Path | None = None  # amazon: meta_<Category>.json(.gz)
    item_texts: Path | None = None  # table: item column + title/brand/categories/description
    user_texts: Path | None = None  # table: user column + biography
    reviews: Path | None = None  # table: user column, item column, review_col
    user_col: str = "user"
    item_col: str = "item"
    rating_col: str | None = None  # None: "rating" when the table has that column
    time_col: str | None = None  # None: "timestamp" when the table has that column
    review_col: str = "review"
    rating_above: float | None = 3.0  # keep rating > this; None: no rating filter
    kcore: int = 5
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    bad_lines: str = "error"
    # Layout (separator, encoding, header) of each delimited table, by the role of the file.
    input_format: TableFormat = field(default_factory=lambda: TableFormat(flags="--"))
    item_texts_format: TableFormat = field(default_factory=lambda: TableFormat(flags="--item-texts-"))
    user_texts_format: TableFormat = field(default_factory=lambda: TableFormat(flags="--user-texts-"))
    reviews_format: TableFormat = field(default_factory=lambda: TableFormat(flags="--reviews-"))

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.bad_lines not in BAD_LINE_POLICIES:
            raise ValueError(f"bad_lines must be one of {BAD_LINE_POLICIES}, got {self.bad_lines!r}")
        wrong = {"amazon": {"--item-texts": self.item_texts, "--user-texts": self.user_texts,
                            "--reviews": self.reviews},
                 "table": {"--meta": self.meta}}[self.source]
        given = [flag for flag, value in wrong.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be used with --source {self.source} (--meta is for amazon; "
                             "--item-texts, --user-texts and --reviews are for table)")
        if self.source == "amazon" and not self.input_format.is_default:
            raise ValueError("--sep, --encoding, --no-header and --columns are for --source table; Amazon review "
                             "files are JSON lines")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be three positive fractions train,val,test summing to 1, got {self.split}")
        if int(self.kcore) != self.kcore or self.kcore < 0:
            raise ValueError(f"kcore must be an integer >= 0, got {self.kcore}")
        if self.rating_above is not None and not math.isfinite(self.rating_above):
            raise ValueError(f"rating_above must be a finite number, got {self.rating_above}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def settings(self) -> dict:
        return {"source": self.source, "rating_above": self.rating_above, "kcore": self.kcore,
                "min_user_interactions": max(self.kcore, MIN_USER_INTERACTIONS),
                "min_item_interactions": max(self.kcore, 1), "split": list(self.split), "seed": self.seed,
                "bad_lines": self.bad_lines,
                "review_text": "reviewText" if self.source == "amazon" else self.review_col}


@dataclass
class Prepared:
    """The preprocessed dataset (texts lazy), the report and the id maps (index = contiguous id)."""

    dataset: RawDataset
    report: dict
    user_names: list[str]
    item_names: list[str]


# ----------------------------------------------------------------------------- entry points


def prepare(options: PrepareOptions, output, docs_per_shard: int = 2000, overwrite: bool = False) -> dict:
    """Preprocess ``options.input`` and write shards + ``id_maps/`` to ``output``; return the index."""
    options.check()
    out = Path(output)
    _check_output(out, overwrite)
    prep = preprocess(options)
    maps = {"users": f"{ID_MAPS}/users.json", "items": f"{ID_MAPS}/items.json"}
    source = {"format": options.source, "input": str(Path(options.input).resolve())}
    for name in ("meta", "item_texts", "user_texts", "reviews"):
        if getattr(options, name) is not None:
            source[name] = str(Path(getattr(options, name)).resolve())
    # The id maps are written before index.json, the folder's completion marker.
    index = build_shards(prep.dataset, out, docs_per_shard=docs_per_shard, overwrite=overwrite, source=source,
                         extra={"preprocessing": prep.report, "id_maps": maps},
                         extra_lists={maps["users"]: prep.user_names, maps["items"]: prep.item_names})
    return index


def preprocess(options: PrepareOptions) -> Prepared:
    """Read and preprocess (module docstring); texts stay in their files until iterated."""
    options.check()
    file, fields = _interaction_file(options)
    text_files = _text_files(options)
    inter = read_interactions(file, fields)
    report = {"settings": options.settings(), "inputs": [{"role": "interactions", **inter.file_report}]}
    if not len(inter):
        raise RawDataError(f"{file.path}: no usable interactions (records: {file.num_records}, malformed and "
                           f"skipped: {file.bad.skipped}); is it the right file?")
    if options.rating_above is None:
        report["settings"]["rating_filter"] = "off (disabled)"
    elif fields.rating is None:
        log.info("%s: no rating column %r: every row is kept", file.path, options.rating_col or "rating")
        report["settings"]["rating_filter"] = "off (the table has no rating column)"
        report["settings"]["rating_above"] = None
    else:
        report["settings"]["rating_filter"] = f"keep {fields.rating} > {options.rating_above:g}"
    counts = report["counts"] = {"rows_read": len(inter), "rows_skipped": _skipped_rows(inter.file_report)}
    if inter.time_range is not None:
        counts["time_range"] = inter.time_range

    row_ok = _rating_filter(inter.rating, report["settings"]["rating_above"])
    counts["after_rating_filter"] = int(row_ok.sum())
    u, i = _dedupe(inter.user[row_ok], inter.item[row_ok], len(inter.item_codes))
    counts["after_dedupe"] = _summary(u, i)
    min_user, min_item = max(options.kcore, MIN_USER_INTERACTIONS), max(options.kcore, 1)
    u, i, passes = kcore(u, i, min_user, min_item, len(inter.user_codes), len(inter.item_codes))
    counts["kcore_passes"] = passes
    if not u.size:
        raise RawDataError(f"{file.path}: no interactions left after the k-core (users need >= {min_user}, items "
                           f">= {min_item} interactions; after dedupe: {counts['after_dedupe']}); lower --kcore "
                           "or use a denser file")
    counts["after_kcore"] = _summary(u, i)

    user_names, user_of_code = _contiguous_ids(u, inter.user_codes)
    item_names, item_of_code = _contiguous_ids(i, inter.item_codes)
    u, i = user_of_code[u], item_of_code[i]
    order = np.lexsort((i, u))
    u, i = u[order], i[order]
    label = split_per_user(u, len(user_names), options.split, options.seed)
    shape = (len(user_names), len(item_names))
    mats = {name: _csr(u[label == k], i[label == k], shape) for k, name in enumerate(SPLITS)}
    counts["final"] = {"users": shape[0], "items": shape[1], "interactions": int(u.size),
                       **{name: int(m.nnz) for name, m in mats.items()}}
    log.info("%s: %d rows -> rating filter %d -> dedupe %d -> k-core (k=%d) %d (%d passes): %d users, %d items; "
             "train/val/test %d/%d/%d", file.path.name, len(inter), counts["after_rating_filter"],
             counts["after_dedupe"]["interactions"], options.kcore, u.size, len(passes), shape[0], shape[1],
             *(counts["final"][s] for s in SPLITS))

    pairs = _Pairs(u, i, label, shape[1])
    del u, i, label, order
    users = {name: k for k, name in enumerate(user_names)}
    items = {name: k for k, name in enumerate(item_names)}
    parts = [_scan_text_file(f, spec, users, items, user_names, item_names, pairs, report, role)
             for role, f, spec in text_files]
    if options.source == "amazon":
        parts.append(_amazon_reviews(file, inter, user_of_code, item_of_code, user_names, item_names, pairs, row_ok))
    del inter, users, items
    stream = TextStream(parts)
    for s in stream.sources():
        log.info("%s: %d %s records, skipped %d: %s", s["file"], s["records"], s["kind"], s["skipped"],
                 s["skip_reasons"])
    dataset = RawDataset(num_users=shape[0], num_items=shape[1], train=mats["train"], val=mats["val"],
                         test=mats["test"], texts=stream, text_sources=stream.sources())
    return Prepared(dataset, report, user_names, item_names)


def _check_output(out: Path, overwrite: bool) -> None:
    # The same rule build_shards applies, checked before the (long) preprocessing.
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; refusing to overwrite it. Pass --overwrite to replace its "
                              "shards, or choose an empty/new output folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:  # a real write, before the long preprocessing: permissions, a read-only mount, a full disk
        with tempfile.TemporaryDirectory(prefix=".write-check-", dir=existing):
            pass
    except OSError as error:
        raise PermissionError(f"{out}: cannot write there ({existing}: {error.strerror}); choose another output "
                              "folder") from None


# ----------------------------------------------------------------------------- interactions


def _interaction_file(options: PrepareOptions) -> tuple[JsonLinesFile | TableFile, InteractionFields]:
    """The interaction file and which of its fields are read (the rating only when filtering)."""
    filtering = options.rating_above is not None
    if options.source == "amazon":
        fields = AMAZON_REVIEW_FIELDS
        if not filtering:
            fields = InteractionFields(fields.user, fields.item, None, fields.time, fields.text)
        return JsonLinesFile(options.input, options.bad_lines), fields
    rating = options.rating_col or "rating"
    time = options.time_col or "timestamp"
    columns = [Column(options.user_col, "--user-col"), Column(options.item_col, "--item-col"),
               Column(time, "--time-col", required=options.time_col is not None)]
    if filtering:
        columns.append(Column(rating, "--rating-col", required=options.rating_col is not None))
    table = TableFile(options.input, columns, options.bad_lines, options.input_format)
    return table, InteractionFields(options.user_col, options.item_col, rating if table.has(rating) else None,
                                    time if table.has(time) else None)


def _skipped_rows(file_rep: dict) -> dict:
    out = {reason: e["count"] for reason, e in file_rep["bad_records"]["reasons"].items()}
    if file_rep["blank_lines"]:
        out["blank line"] = file_rep["blank_lines"]
    return out


def _rating_filter(rating: np.ndarray, above: float | None) -> np.ndarray:
    if above is None:
        return np.ones(rating.shape, dtype=bool)
    return rating > above


def _dedupe(u: np.ndarray, i: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.unique(u.astype(np.int64) * num_items + i)
    return (keys // num_items).astype(np.int32), (keys % num_items).astype(np.int32)


def _summary(u: np.ndarray, i: np.ndarray) -> dict:
    return {"interactions": int(u.size), "users": int(np.unique(u).size), "items": int(np.unique(i).size)}


def kcore(u: np.ndarray, i: np.ndarray, min_user: int, min_item: int, num_users: int,
          num_items: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Drop users with < ``min_user`` and items with < ``min_item`` interactions until stable.

    ``u``/``i`` are distinct pairs (codes < num_users / num_items). Returns the surviving
    pairs and, per pass that removed something, the counts after it.
    """
    passes = []
    while u.size:
        keep = ((np.bincount(u, minlength=num_users)[u] >= min_user)
                & (np.bincount(i, minlength=num_items)[i] >= min_item))
        if keep.all():
            break
        u, i = u[keep], i[keep]
        passes.append(_summary(u, i))
    return u, i, passes


def _contiguous_ids(codes: np.ndarray, names: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """Surviving original ids sorted as strings, and the array code -> contiguous id (-1: dropped)."""
    all_names = list(names)  # dict order = code order
    alive = np.unique(codes)
    alive_names = [all_names[c] for c in alive.tolist()]
    order = sorted(range(len(alive_names)), key=alive_names.__getitem__)
    of_code = np.full(len(all_names), -1, dtype=np.int32)
    of_code[alive[order]] = np.arange(len(order), dtype=np.int32)
    return [alive_names[k] for k in order], of_code


def split_per_user(u: np.ndarray, num_users: int, fractions, seed: int) -> np.ndarray:
    """Split label per interaction (0 train, 1 val, 2 test); rule in the module docstring.

    ``u`` lists the interactions in (user, item) order (the random keys are drawn in that
    order, which makes the split independent of the input's row order); every user must have
    >= 3 interactions.
    """
    n = np.bincount(u, minlength=num_users)
    if n.min() < MIN_USER_INTERACTIONS:
        raise ValueError(f"every user needs >= {MIN_USER_INTERACTIONS} interactions to be split, "
                         f"user {int(n.argmin())} has {int(n.min())}")
    _, f_val, f_test = fractions
    n_val = np.maximum(1, np.floor(n * f_val + 1e-9).astype(np.int64))
    n_test = np.maximum(1, np.floor(n * f_test + 1e-9).astype(np.int64))
    short = np.maximum(0, n_val + n_test + 1 - n)  # items train lacks for one
    give = np.minimum(short, n_val - 1)
    n_val -= give
    n_test -= short - give
    keys = np.random.default_rng(seed).random(u.size)
    order = np.lexsort((keys, u))  # by user, then key
    start = np.cumsum(n) - n
    rank = np.arange(u.size) - start[u[order]]
    users = u[order]
    label = np.full(u.size, _TRAIN, dtype=np.int8)
    label[order[rank < n_val[users]]] = _VAL
    label[order[(rank >= n_val[users]) & (rank < n_val[users] + n_test[users])]] = _TEST
    return label


def _csr(u: np.ndarray, i: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(u.size, dtype=np.float32), (u, i)), shape=shape)
    m.sort_indices()
    return m


class _Pairs:
    """The final (user, item) pairs with their split, for looking up where a text's pair went."""

    def __init__(self, u: np.ndarray, i: np.ndarray, label: np.ndarray, num_items: int):
        self.num_items = num_items
        keys = u.astype(np.int64) * num_items + i
        order = np.argsort(keys)
        self.keys, self.label = keys[order], label[order]

    def key(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Pair keys; -1 where the user or the item is not in the data."""
        return np.where((u >= 0) & (i >= 0), u.astype(np.int64) * self.num_items + i, -1)

    def split_of(self, keys: np.ndarray) -> np.ndarray:
        """Split label per key; -1 for a pair that is not in the data."""
        pos = np.minimum(np.searchsorted(self.keys, keys), max(self.keys.size - 1, 0))
        found = self.keys[pos] == keys
        return np.where(found, self.label[pos], -1)


# ----------------------------------------------------------------------------- texts


@dataclass
class TextSpec:
    """How a text file's records name their user/item and carry each kind of text."""

    kinds: tuple[str, ...]
    ids: Callable[[dict], tuple[str | None, str | None]]  # (user name or None, item name or None)
    text: Callable[[dict, str], str]  # (record, kind) -> stripped text ("" if none); may raise Malformed


class FileTexts:
    """TextRecords of one file, re-read from the file on every iteration (never held in memory).

    ``index`` (sorted record indexes), ``user``/``item`` (contiguous ids, -1 for none) and
    ``kinds`` (bit k set: yield ``spec.kinds[k]``) are what the first pass selected; ``len()``
    is the number of records an iteration yields. An iteration that finds the file changed
    (ids or texts differ from the first pass) raises instead of yielding other data.
    """

    def __init__(self, file, spec: TextSpec, index: np.ndarray, user: np.ndarray, item: np.ndarray,
                 kinds: np.ndarray, user_names: list[str], item_names: list[str], sources: list[dict]):
        self.file, self.spec = file, spec
        self.index, self.user, self.item, self.kinds = index, user, item, kinds
        self.user_names, self.item_names = user_names, item_names
        self.text_sources = sources
        self._len = int(sum(int(np.count_nonzero(kinds & (1 << b))) for b in range(len(spec.kinds))))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[TextRecord]:
        k = 0
        for _, where, rec in self.file.records(only=self.index):
            u, i = int(self.user[k]), int(self.item[k])
            try:
                names = self.spec.ids(rec)
            except Malformed:
                names = None
            if names != (self.user_names[u] if u >= 0 else None, self.item_names[i] if i >= 0 else None):
                raise RawDataError(f"{self.file.path}: {self.file.unit} {where} names other ids than on the first "
                                   "read; the file changed while it was being read: run again")
            for b, kind in enumerate(self.spec.kinds):
                if self.kinds[k] & (1 << b):
                    try:
                        text = self.spec.text(rec, kind)
                    except Malformed:
                        text = ""
                    if not text:
                        raise RawDataError(f"{self.file.path}: {self.file.unit} {where}: the {kind} text is empty "
                                           "now but was not on the first read; the file changed: run again")
                    yield TextRecord(kind, u if u >= 0 else None, i if i >= 0 else None, text)
            k += 1


class TextStream:
    """Several :class:`FileTexts` one after the other: the ``texts`` that build_shards iterates."""

    def __init__(self, parts: list[FileTexts]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __iter__(self) -> Iterator[TextRecord]:
        for part in self.parts:
            yield from part

    def sources(self) -> list[dict]:
        return [s for p in self.parts for s in p.text_sources]


def _text_files(options: PrepareOptions) -> list[tuple[str, JsonLinesFile | TableFile, TextSpec]]:
    """The separate text inputs as (role, file, spec), in document order: item texts, user texts,
    reviews (the order load_cllm4rec uses). Opened before the interaction pass, so that a
    missing file or column fails fast."""
    out = []
    if options.meta is not None:
        out.append(("item metadata", JsonLinesFile(options.meta, options.bad_lines), AMAZON_META))
    if options.item_texts is not None:
        kinds = ITEM_TEXT_KINDS
        table = TableFile(options.item_texts, [Column(options.item_col, "--item-col")]
                          + [Column(k, required=False) for k in kinds], options.bad_lines, options.item_texts_format)
        present = tuple(k for k in kinds if table.has(k))
        if not present:
            raise RawDataError(f"{table.path}: header: none of the text columns {list(kinds)}; the columns are "
                               f"{table.header[:30]}: name the text columns title, brand, categories or description")
        out.append(("item texts", table, TextSpec(present, lambda r: (None, get_id(r, options.item_col)), get_text)))
    if options.user_texts is not None:
        table = TableFile(options.user_texts, [Column(options.user_col, "--user-col"), Column("biography")],
                          options.bad_lines, options.user_texts_format)
        out.append(("user texts", table,
                    TextSpec(("biography",), lambda r: (get_id(r, options.user_col), None), get_text)))
    if options.reviews is not None:
        col = options.review_col
        table = TableFile(options.reviews, [Column(options.user_col, "--user-col"),
                                            Column(options.item_col, "--item-col"), Column(col, "--review-col")],
                          options.bad_lines, options.reviews_format)
        out.append(("reviews", table, TextSpec(("review",),
                                               lambda r: (get_id(r, options.user_col), get_id(r, options.item_col)),
                                               lambda r, kind: get_text(r, col))))
    return out


def _amazon_reviews(file: JsonLinesFile, inter: Interactions, user_of_code, item_of_code, user_names, item_names,
                    pairs: _Pairs, row_ok: np.ndarray) -> FileTexts:
    """Review texts of the interaction file itself, selected from the arrays of its first read."""
    u, i = user_of_code[inter.user], item_of_code[inter.item]
    keys = pairs.key(u, i)
    split = pairs.split_of(keys)
    chosen, reasons = _select(keys, split, inter.has_text, row_ok)
    fields = AMAZON_REVIEW_FIELDS
    spec = TextSpec(("review",), lambda r: (get_id(r, fields.user), get_id(r, fields.item)),
                    lambda r, kind: get_text(r, fields.text))
    return FileTexts(file, spec, inter.index[chosen], u[chosen], i[chosen], np.ones(chosen.size, dtype=np.uint8),
                     user_names, item_names, [_source_entry(file, "review", chosen.size, reasons)])


def _select(keys: np.ndarray, split: np.ndarray, has_text: np.ndarray, row_ok: np.ndarray | None = None
            ) -> tuple[np.ndarray, dict]:
    """Rows (ascending) whose text becomes a review document, and the skip counts of the others.

    A row is skipped, in this order of reasons: removed by the rating filter, its pair is not
    in the preprocessed data, its pair is a val/test interaction, its text is empty, or an
    earlier row of the same pair was chosen.
    """
    reasons = {}
    alive = np.ones(keys.size, dtype=bool) if row_ok is None else row_ok.copy()
    _count(reasons, "removed by the rating filter", keys.size - int(alive.sum()))
    for reason, drop in (("pair not in the preprocessed data", split < 0),
                         ("val/test pair (held out: its text would leak it)", split > _TRAIN),
                         ("empty text", ~has_text)):
        _count(reasons, reason, int((alive & drop).sum()))
        alive &= ~drop
    rows = np.flatnonzero(alive)
    _, first = np.unique(keys[rows], return_index=True)
    chosen = np.sort(rows[first])
    _count(reasons, "duplicate (kind, user, item)", rows.size - chosen.size)
    return chosen, reasons


def _count(reasons: dict, reason: str, n: int) -> None:
    if n:
        reasons[reason] = n


def _source_entry(file, kind: str, records: int, reasons: dict) -> dict:
    return {"file": file.path.name, "kind": kind, "records": int(records), "skipped": int(sum(reasons.values())),
            "skip_reasons": reasons}


def _scan_text_file(file, spec: TextSpec, users: dict, items: dict, user_names, item_names, pairs: _Pairs,
                    report: dict, role: str) -> FileTexts:
    """First pass over a separate text file: which records give which texts (see :func:`_select`)."""
    # Compact arrays, not Python objects per record: a reviews table can have millions of rows.
    index, user, item, flags = array("q"), array("i"), array("i"), array("B")
    for rec_index, where, rec in file.records(progress=True):
        try:
            uname, iname = spec.ids(rec)
            bits = 0
            for b, kind in enumerate(spec.kinds):
                if spec.text(rec, kind):
                    bits |= 1 << b
        except Malformed as error:
            file.bad.handle(where, error)
            continue
        index.append(rec_index)
        user.append(-1 if uname is None else users.get(uname, -2))
        item.append(-1 if iname is None else items.get(iname, -2))
        flags.append(bits)
    report["inputs"].append({"role": role, **file_report(file)})
    index, user, item = (np.frombuffer(index, dtype=np.int64), np.frombuffer(user, dtype=np.int32),
                         np.frombuffer(item, dtype=np.int32))
    flags = np.frombuffer(flags, dtype=np.uint8)
    # -2: an id that is not (or no longer) in the data; -1: the record names no user (or no item).
    if "review" in spec.kinds:
        keys = pairs.key(np.where(user < 0, -1, user), np.where(item < 0, -1, item))
        chosen, reasons = _select(keys, pairs.split_of(keys), flags.astype(bool))
        return FileTexts(file, spec, index[chosen], user[chosen], item[chosen], flags[chosen] & 1,
                         user_names, item_names, [_source_entry(file, "review", chosen.size, reasons)])
    entity = user if spec.kinds == ("biography",) else item
    what = "user" if spec.kinds == ("biography",) else "item"
    selected = np.zeros(index.size, dtype=np.uint8)
    sources = []
    for b, kind in enumerate(spec.kinds):
        has = (flags & (1 << b)).astype(bool)
        reasons = {}
        _count(reasons, f"{what} not in the preprocessed data", int((entity < 0).sum()))
        _count(reasons, "empty text", int(((entity >= 0) & ~has).sum()))
        rows = np.flatnonzero((entity >= 0) & has)
        _, first = np.unique(entity[rows], return_index=True)
        _count(reasons, "duplicate (kind, user, item)", rows.size - first.size)
        selected[rows[first]] |= 1 << b
        sources.append(_source_entry(file, kind, first.size, reasons))
    keep = np.flatnonzero(selected)
    user, item = np.where(user < 0, -1, user), np.where(item < 0, -1, item)
    return FileTexts(file, spec, index[keep], user[keep], item[keep], selected[keep], user_names, item_names,
                     sources)


def _amazon_meta_text(rec: dict, kind: str) -> str:
    if kind != "categories":
        return get_text(rec, kind)
    # 2014: "categories" is a list of category paths; 2018: "category" is one list.
    name = "categories" if "categories" in rec else "category"
    value = rec.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    flat, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        elif isinstance(v, str):
            if v.strip() and v.strip() not in flat:
                flat.append(v.strip())
        else:
            raise Malformed(name, "not a list of strings", value)
    return ", ".join(flat)


AMAZON_META = TextSpec(ITEM_TEXT_KINDS, lambda r: (None, get_id(r, "asin")), _amazon_meta_text)
