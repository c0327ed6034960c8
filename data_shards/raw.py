"""Read raw public recommendation data record by record: Amazon JSON lines and interaction tables.

Formats
-------
**Amazon review files** (McAuley lab), one record per line: the 2014 release
``reviews_<Category>_5.json(.gz)`` and the 2018 release ``<Category>_5.json(.gz)``. Fields used:
``reviewerID`` (user, required), ``asin`` (item, required), ``overall`` (rating, required),
``reviewText`` (optional), ``unixReviewTime`` (optional, only reported); everything else
(``summary``, ``vote``, ``style``, ``image``, ``verified``, ...) is ignored. **Amazon metadata**
``meta_<Category>.json(.gz)``: ``asin`` (required), optional ``title``, ``brand``,
``categories`` (2014: a list of category paths) or ``category`` (2018: one list),
``description`` (a string, or a list of strings in 2018).

Each line is strict JSON or, when that fails, a Python literal (``ast.literal_eval``, never
``eval``: the 2014 metadata is written as Python dicts). Blank lines are counted, not records.
Files are read as bytes and gunzipped when they start with the gzip magic bytes, whatever
their name; text is UTF-8.

**Tables**: delimited text or Parquet (``.parquet``, needs pyarrow). Delimited text is by
default UTF-8 with a header row, comma-separated when named ``.csv`` and tab-separated when
named ``.tsv`` (each optionally ``.gz``), with the csv module's quoting rules; a
:class:`TableFormat` sets another separator (a longer one such as MovieLens' ``::`` splits
lines plainly, without quoting), another encoding (MovieLens' ``u.item`` is Latin-1) or no
header row (MovieLens' ``u.data``: columns are then named by position, ``1``, ``2``, ..., or by
the names given). Only the named columns are read. Locations are reported as the 1-based line
of the file (the header is line 1) for delimited text and as the 1-based data row for
Parquet.

Values
------
Ids are strings or integers, compared after stripping surrounding whitespace; an empty id is
malformed. A rating is an int, a float or a numeric string, and must be finite. A timestamp
(optional, only reported) is a number of seconds since the epoch, a datetime (Parquet) or an
ISO 8601 string (naive = UTC). A missing or null text field is not an error: it is an empty
text.

Malformed records
-----------------
A record that cannot be used (not JSON nor a Python literal, not a dict, a required field
missing or empty, a non-numeric number, a wrong number of cells, invalid UTF-8) raises
:class:`RawDataError` naming the file, the line and the field, unless the file is read with
``bad_lines="skip"``: then the record is skipped, counted per reason with its first line
numbers (:meth:`BadLines.report`), and a warning is logged once the file is read. Problems of
the whole file (missing column, unreadable gzip) always raise.
"""
from __future__ import annotations

import ast
import codecs
import csv
import gzip
import json
import logging
import math
import zlib
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from .sources import DataFormatError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
BAD_LINE_POLICIES = ("error", "skip")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".csv.gz", ".tsv.gz")
_SKIP_HINT = ("fix or remove it, or pass --bad-lines skip to skip malformed records "
              "(they are counted in index.json)")
_FIRST_LINES = 5  # line numbers kept per skip reason, for the report and the warning
_MISSING = object()

class RawDataError(DataFormatError):
    """A raw input file cannot be used; the message names the file, the line, the field and the fix."""


class Malformed(Exception):
    """One record is unusable: ``field`` and a short, countable ``reason``, plus the offending value."""

    def __init__(self, field: str, reason: str, value=_MISSING):
        super().__init__(field, reason)
        self.field, self.reason = field, reason
        self.detail = "" if value is _MISSING else f" (got {value!r:.80})"


class BadLines:
    """The malformed-record policy of one input file: raise, or skip and count per reason."""

    def __init__(self, path: Path, policy: str = "error", unit: str = "line"):
        if policy not in BAD_LINE_POLICIES:
            raise ValueError(f"bad_lines must be one of {BAD_LINE_POLICIES}, got {policy!r}")
        self.path, self.policy, self.unit = path, policy, unit
        self.reasons: dict[str, dict] = {}

    def handle(self, where: int, error: Malformed) -> None:
        """Raise for policy "error"; otherwise count ``error`` at 1-based ``where``."""
        if self.policy == "error":
            raise RawDataError(f"{self.path}: {self.unit} {where}: field {error.field!r}: "
                               f"{error.reason}{error.detail}; {_SKIP_HINT}")
        entry = self.reasons.setdefault(f"{error.field}: {error.reason}", {"count": 0, f"first_{self.unit}s": []})
        entry["count"] += 1
        if len(entry[f"first_{self.unit}s"]) < _FIRST_LINES:
            entry[f"first_{self.unit}s"].append(where)

    @property
    def skipped(self) -> int:
        return sum(e["count"] for e in self.reasons.values())

    def report(self) -> dict:
        return {"policy": self.policy, "skipped": self.skipped, "reasons": self.reasons}

    def log_summary(self) -> None:
        if self.reasons:
            firsts = sorted(w for e in self.reasons.values() for w in e[f"first_{self.unit}s"])[:_FIRST_LINES]
            log.warning("%s: skipped %d malformed records (--bad-lines skip): %s; first %ss: %s",
                        self.path, self.skipped, {k: e["count"] for k, e in self.reasons.items()},
                        self.unit, firsts)


def open_binary(path: Path):
    """``path`` opened for reading bytes, gunzipped when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def _progress(iterable, desc: str, unit: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the bar is optional
        return iterable
    return tqdm(iterable, desc=desc, unit=unit, disable=None, mininterval=1.0)


# ----------------------------------------------------------------------------- values


def get_id(rec: dict, name: str) -> str:
    """The id in field ``name``: a string or an integer, whitespace-stripped, not empty."""
    v = rec.get(name, _MISSING)
    if v is _MISSING:
        raise Malformed(name, "missing")
    if v is None:
        raise Malformed(name, "null id")
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise Malformed(name, "id is not a string or an integer", v)
    s = str(v).strip()
    if not s:
        raise Malformed(name, "empty id")
    return s


def get_number(rec: dict, name: str, required: bool) -> float:
    """The finite number in field ``name``; NaN when it is absent/null/empty and not ``required``."""
    v = rec.get(name, _MISSING)
    if v is _MISSING or v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise Malformed(name, "missing" if v is _MISSING else "empty")
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise Malformed(name, "not a number", v)
    try:
        x = float(v)
    except ValueError:
        raise Malformed(name, "not a number", v) from None
    if not math.isfinite(x):
        raise Malformed(name, "not a finite number", v)
    return x


def get_time(rec: dict, name: str) -> float:
    """Seconds since the epoch in field ``name``: a number, a datetime (Parquet timestamps) or an
    ISO 8601 string (naive means UTC); NaN when absent/null/empty."""
    v = rec.get(name)
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(v, str) and v.strip():
        try:
            return get_number(rec, name, required=False)
        except Malformed:
            try:
                return get_time({name: datetime.fromisoformat(v.strip())}, name)
            except ValueError:
                raise Malformed(name, "not a number nor an ISO 8601 time", v) from None
    return get_number(rec, name, required=False)


def get_text(rec: dict, name: str) -> str:
    """The text in field ``name``, stripped; "" when absent or null. A list of strings is joined by spaces."""
    v = rec.get(name)
    if v is None:
        return ""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return " ".join(x.strip() for x in v if x.strip())
    raise Malformed(name, "not a string", v)


# ----------------------------------------------------------------------------- record files


class _RecordFile:
    """Shared record iteration of :class:`JsonLinesFile` and :class:`TableFile`.

    ``records()`` yields ``(index, where, record)``: the 0-based record index (stable across
    re-reads, so a first pass can select records by it), the 1-based line or row that messages
    name, and the record as a dict. A full pass counts records, blank lines and malformed
    records (``self.bad``); a pass with ``only`` (sorted indexes) parses just those records,
    which must parse again, else the file changed in between.
    """

    unit = "line"

    def __init__(self, path, bad_lines: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found")
        self.bad = BadLines(self.path, bad_lines, self.unit)
        self.num_records = 0
        self.blank_lines = 0

    def _rows(self, select: np.ndarray | None) -> Iterator[tuple[int, int, dict | Malformed | None]]:
        """(index, where, record, or Malformed, or None for a blank line); with ``select``
        (a bool mask over indexes) only the selected records."""
        raise NotImplementedError

    def records(self, only: np.ndarray | None = None, progress: bool = False) -> Iterator[tuple[int, int, dict]]:
        select = None
        if only is not None:
            if not len(only):
                return
            select = np.zeros(int(only[-1]) + 1, dtype=bool)
            select[only] = True
        else:
            self.num_records = self.blank_lines = 0
            self.bad = BadLines(self.path, self.bad.policy, self.unit)
        rows = self._rows(select)
        if progress:
            rows = _progress(rows, f"read {self.path.name}", self.unit)
        seen = 0
        for index, where, rec in rows:
            if select is not None:
                if not isinstance(rec, dict):
                    raise RawDataError(f"{self.path}: {self.unit} {where} no longer parses as it did on the first "
                                       "read; the file changed while it was being read: run again")
                yield index, where, rec
                seen += 1
                if seen == len(only):
                    return
            elif rec is None:
                self.blank_lines += 1
            else:
                self.num_records += 1
                if isinstance(rec, Malformed):
                    self.bad.handle(where, rec)
                else:
                    yield index, where, rec
        if select is not None:
            raise RawDataError(f"{self.path}: has fewer records than on the first read; the file changed while "
                               "it was being read: run again")
        self.bad.log_summary()

    def _read_error(self, where: int, e: Exception) -> RawDataError:
        return RawDataError(f"{self.path}: cannot read past {self.unit} {where} ({type(e).__name__}: {e}); the file "
                            "is truncated, corrupt or not UTF-8: fix it or download it again")


class JsonLinesFile(_RecordFile):
    """A JSON-lines file (strict JSON or Python-literal lines), gzip or plain; index = 0-based line."""

    def __init__(self, path, bad_lines: str = "error"):
        super().__init__(path, bad_lines)

    def _rows(self, select):
        index = -1
        try:
            with open_binary(self.path) as f:
                for index, raw in enumerate(f):
                    if select is not None:
                        if index >= len(select):
                            return
                        if not select[index]:
                            continue
                    try:
                        rec = self._parse(raw)
                    except Malformed as error:
                        rec = error
                    yield index, index + 1, rec
        except (OSError, EOFError, zlib.error) as e:
            raise self._read_error(index + 2, e) from e

    @staticmethod
    def _parse(raw: bytes) -> dict | None:
        raw = raw.strip()
        if not raw:
            return None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise Malformed("(whole line)", "not UTF-8 text") from None
        try:
            rec = json.loads(text)
        except (ValueError, RecursionError):
            try:
                rec = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise Malformed("(whole line)", "neither JSON nor a Python literal", text) from None
        if not isinstance(rec, dict):
            raise Malformed("(whole line)", f"not a dict but a {type(rec).__name__}", text)
        return rec


@dataclass
class Column:
    """A table column: its name, required or not, and the CLI flag that names it ("": a fixed name)."""

    name: str
    flag: str = ""
    required: bool = True


_SEPARATOR_WORDS = {"tab": "\t", "\\t": "\t", "comma": ",", "pipe": "|", "semicolon": ";", "space": " "}


@dataclass
class TableFormat:
    """How a delimited text table is laid out. The defaults read a UTF-8 table with a header row,
    comma-separated when named *.csv and tab-separated when named *.tsv.

    ``flags`` is the prefix of the command-line flags that set these fields ("--" for the
    interaction table, "--item-texts-" for the item texts, ...), so that errors name them.
    """

    sep: str | None = None  # None: from the file name; one character (csv quoting rules) or longer, like "::" (plain split)
    encoding: str = "utf-8"  # any ASCII-compatible codec: utf-8, latin-1, cp1252, ...
    header: bool = True  # False: the first line is data; columns are named by `columns`, the rest by 1-based position
    columns: tuple = ()  # names of a headerless table's leading columns ("" keeps a position name)
    flags: str = "--"

    def __post_init__(self):
        if self.columns:
            self.header = False
        if self.sep is not None:
            self.sep = _SEPARATOR_WORDS.get(self.sep.lower(), self.sep)
            if not self.sep or self.sep in ("\n", "\r", '"'):
                raise ValueError(f"{self.flags}sep {self.sep!r}: give the separator, e.g. tab, comma, '|' or '::'")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"{self.flags}encoding {self.encoding!r}: unknown encoding; use e.g. utf-8 or "
                             "latin-1") from None
        if "a,\t|\n".encode(self.encoding, errors="replace") != b"a,\t|\n":
            raise ValueError(f"{self.flags}encoding {self.encoding!r}: lines are read one by one, which needs an "
                             "ASCII-compatible encoding (utf-8, latin-1, cp1252, ...); convert the file to UTF-8")

    @property
    def is_default(self) -> bool:
        return self.sep is None and self.encoding == "utf-8" and self.header

    def describe(self) -> dict:
        return {"sep": self.sep, "encoding": self.encoding, "header": self.header, "columns": list(self.columns)}


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


class TableFile(_RecordFile):
    """A delimited text table (CSV/TSV, optionally gzip; see :class:`TableFormat`) or Parquet;
    index = 0-based data row.

    Only ``columns`` that the header has are read (records are ``{column: value}``); a
    required column that the header lacks raises at construction. A line that does not
    decode in the table's encoding is a malformed record on that line (so ``bad_lines="skip"``
    skips it), not an error of the whole file.
    """

    def __init__(self, path, columns: list[Column], bad_lines: str = "error", layout: TableFormat | None = None):
        self.layout = layout or TableFormat()
        name = Path(path).name.lower()
        kind = next((s for s in TABLE_SUFFIXES if name.endswith(s)), None)
        if kind is None and self.layout.sep is None:
            raise RawDataError(f"{path}: unknown table format; name the file *.csv, *.tsv (optionally .gz) "
                               f"or *.parquet, or give the separator with {self.layout.flags}sep (tab, comma, '|', "
                               "'::', ...)")
        self.format = kind.split(".")[1] if kind else "delimited"
        if self.format == "parquet" and not self.layout.is_default:
            raise RawDataError(f"{path}: a Parquet file has its own columns and types; {self.layout.flags}sep, "
                               f"{self.layout.flags}encoding, {self.layout.flags}no-header and "
                               f"{self.layout.flags}columns are for text tables")
        self.unit = "row" if self.format == "parquet" else "line"
        super().__init__(path, bad_lines)
        self.header = self._read_header()
        for c in columns:
            if c.required and c.name not in self.header:
                fix = f"name the right column with {c.flag}" if c.flag else f"add a column named {c.name!r}"
                raise RawDataError(f"{self.path}: header: column {c.name!r} not found; the columns are "
                                   f"{self.header[:30]}: {fix}")
        self.columns = [c.name for c in columns if c.name in self.header]

    def has(self, column: str | None) -> bool:
        return column in self.columns

    @property
    def _separator(self) -> str:
        return self.layout.sep or ("\t" if self.format == "tsv" else ",")

    def _lines(self) -> Iterator[tuple[int, str, bool]]:
        """(1-based line, text, decoded cleanly) of every physical line. Decoding line by line
        puts an undecodable byte on its own line; decoding the stream in blocks reported it
        blocks earlier."""
        encoding = self.layout.encoding
        with open_binary(self.path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    text, clean = raw.decode(encoding), True
                except UnicodeDecodeError:
                    text, clean = raw.decode(encoding, errors="replace"), False
                if number == 1:
                    text = text.lstrip("\ufeff")
                yield number, text, clean

    def _cells(self) -> Iterator[tuple[int, list | Malformed]]:
        """(last physical line, cells or Malformed) of every row, blank rows as []."""
        lines = self._lines()
        if len(self._separator) > 1:  # "::" and the like: no quoting, one row per line
            for number, text, clean in lines:
                text = text.rstrip("\r\n")
                yield number, (self._not_decoded() if not clean else text.split(self._separator) if text else [])
            return
        undecoded: list[int] = []

        def texts():
            for number, text, clean in lines:
                if not clean:
                    undecoded.append(number)
                yield text

        reader = csv.reader(texts(), delimiter=self._separator)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                row = Malformed("(whole line)", f"not valid CSV/TSV ({e})")
            if undecoded:  # named on its own line, not on the row's last
                yield undecoded[0], self._not_decoded()
                undecoded.clear()
            else:
                yield reader.line_num, row

    def _not_decoded(self) -> Malformed:
        return Malformed("(whole line)", f"not {self.layout.encoding} text (see {self.layout.flags}encoding)")

    def _read_header(self) -> list[str]:
        if self.format == "parquet":
            return list(_parquet(self.path).schema_arrow.names)
        try:
            line, first = next(((n, row) for n, row in self._cells() if row != []), (0, None))
        except (OSError, EOFError, zlib.error) as e:
            raise RawDataError(f"{self.path}: cannot read the first line ({type(e).__name__}: {e}); "
                               "the file is truncated or corrupt") from e
        if first is None:
            raise RawDataError(f"{self.path}: the file is empty; expected "
                               + ("a header row naming the columns" if self.layout.header else "rows of data"))
        if isinstance(first, Malformed):
            raise RawDataError(f"{self.path}: line {line}: {first.reason}")
        layout = self.layout
        if layout.header:
            header = [h.strip() for h in first]
            if all(_looks_numeric(h) for h in header):
                raise RawDataError(f"{self.path}: line 1 looks like data, not a header (every cell is a number: "
                                   f"{header[:8]}); if the table has no header row, pass {layout.flags}no-header "
                                   f"(columns are then named 1, 2, ... by position) or {layout.flags}columns "
                                   "NAME,NAME,...")
            return header
        if len(layout.columns) > len(first):
            raise RawDataError(f"{self.path}: {layout.flags}columns names {len(layout.columns)} columns but line "
                               f"{line} has {len(first)} cells (separator {self._separator!r}): check "
                               f"{layout.flags}sep and {layout.flags}columns")
        names = [str(k + 1) for k in range(len(first))]
        names[:len(layout.columns)] = [c.strip() or names[k] for k, c in enumerate(layout.columns)]
        return names

    def _rows(self, select):
        return self._parquet_rows(select) if self.format == "parquet" else self._csv_rows(select)

    def _csv_rows(self, select):
        pos = [self.header.index(c) for c in self.columns]
        width = len(self.header)
        what = "the header has" if self.layout.header else "the first row has"
        index, line = -1, 0
        limit = csv.field_size_limit()
        csv.field_size_limit(1 << 30)  # review texts can exceed the csv module's 128 KiB default field
        try:
            rows = self._cells()
            if self.layout.header:
                next(r for r in rows if r[1] != [])
            for line, row in rows:
                if row == []:  # a blank line
                    if select is None:
                        yield -1, line, None
                    continue
                index += 1
                if select is not None:
                    if index >= len(select):
                        return
                    if not select[index]:
                        continue
                if isinstance(row, Malformed):
                    yield index, line, row
                elif len(row) != width:
                    yield index, line, Malformed("(whole line)", f"has {len(row)} cells, {what} {width}")
                else:
                    yield index, line, {c: row[p] for c, p in zip(self.columns, pos)}
        except (OSError, EOFError, zlib.error) as e:
            raise self._read_error(line + 1, e) from e
        finally:
            csv.field_size_limit(limit)

    def _parquet_rows(self, select):
        index = -1
        for batch in _parquet(self.path).iter_batches(batch_size=65536, columns=self.columns):
            if select is not None and index + 1 >= len(select):
                return
            values = [batch.column(k).to_pylist() for k in range(batch.num_columns)]
            for cells in zip(*values):
                index += 1
                if select is not None and (index >= len(select) or not select[index]):
                    continue
                yield index, index + 1, dict(zip(self.columns, cells))


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install \"cllm4rec[parquet]\" "
                          "(or convert the table to CSV)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types; re-raised with the file name
        raise RawDataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- interactions


@dataclass
class InteractionFields:
    """Which fields of a record hold the user, item, rating, timestamp and (optionally) a text."""

    user: str
    item: str
    rating: str | None
    time: str | None
    text: str | None = None


AMAZON_REVIEW_FIELDS = InteractionFields("reviewerID", "asin", "overall", "unixReviewTime", "reviewText")


@dataclass
class Interactions:
    """The usable records of an interaction file as parallel arrays, one entry per record.

    ``user``/``item`` are codes into ``user_names``/``item_names`` (first-seen order),
    ``rating`` is NaN without a rating column, ``index`` is the record's 0-based index in the
    file (its line for JSON lines), ``has_text`` says whether the record carries a non-empty
    text field.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    index: np.ndarray
    has_text: np.ndarray
    user_codes: dict[str, int]
    item_codes: dict[str, int]
    time_range: list[float] | None
    file_report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.user.size)


def read_interactions(file: JsonLinesFile | TableFile, fields: InteractionFields) -> Interactions:
    """Stream ``file`` once into compact arrays; ids are interned, nothing per record is kept."""
    user_codes: dict[str, int] = {}
    item_codes: dict[str, int] = {}
    users, items, indexes = array("i"), array("i"), array("q")
    ratings, has_text = array("f"), array("b")
    t_min, t_max = math.inf, -math.inf
    for index, where, rec in file.records(progress=True):
        try:
            u = get_id(rec, fields.user)
            i = get_id(rec, fields.item)
            r = get_number(rec, fields.rating, required=True) if fields.rating else math.nan
            t = get_time(rec, fields.time) if fields.time else math.nan
            text = bool(get_text(rec, fields.text)) if fields.text else False
        except Malformed as error:
            file.bad.handle(where, error)
            continue
        code = user_codes.get(u)
        if code is None:
            code = user_codes[u] = len(user_codes)
        users.append(code)
        code = item_codes.get(i)
        if code is None:
            code = item_codes[i] = len(item_codes)
        items.append(code)
        ratings.append(r)
        indexes.append(index)
        has_text.append(text)
        if t == t:  # not NaN
            t_min, t_max = min(t_min, t), max(t_max, t)
    report = file_report(file)
    log.info("%s: %d usable records, %d malformed skipped, %d blank lines", file.path.name, len(users),
             file.bad.skipped, file.blank_lines)
    return Interactions(
        user=np.frombuffer(users, dtype=np.int32).copy(), item=np.frombuffer(items, dtype=np.int32).copy(),
        rating=np.frombuffer(ratings, dtype=np.float32).copy(), index=np.frombuffer(indexes, dtype=np.int64).copy(),
        has_text=np.frombuffer(has_text, dtype=np.int8).astype(bool), user_codes=user_codes,
        item_codes=item_codes, time_range=None if t_min > t_max else [t_min, t_max], file_report=report)


def file_report(file: JsonLinesFile | TableFile) -> dict:
    """What reading ``file`` found: lines/rows, blank lines, malformed records (policy and counts)."""
    out = {"file": str(file.path), "format": file.format if isinstance(file, TableFile) else "json lines",
           "records": file.num_records, "blank_lines": file.blank_lines}
    if isinstance(file, TableFile):
        out["columns"] = file.columns
        if file.format != "parquet":
            out["layout"] = file.layout.describe()
    out["bad_records"] = file.bad.report()
    return out
