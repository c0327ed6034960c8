"""Read the shards written by :mod:`data_shards.build`: a world-size-independent global order,
split across ranks and DataLoader workers, with exact resume that reads nothing twice.

Epoch order (identical on every rank, whatever the world size):

1. the stream's shards are permuted by ``_rng((seed, epoch), SHARD_ORDER)``;
2. consecutive runs of ``window_shards`` shards of that order form *windows*;
3. the documents of window w (its shards in that order, each in written order) are permuted by
   ``_rng((seed, epoch, w), WINDOW_ORDER)``;
4. the epoch order is window 0's permuted documents, then window 1's, and so on.

A window's permutation depends on nothing read before it, so the document at any global
position can be located (shard, member) without reading earlier documents. Resuming at step s
reads only what steps >= s need, and every document is read by exactly one (rank, worker):
shards are random-access (tar member offsets are scanned from the headers once per shard).

Position p (0-based) in this order is the document's ``"pos"``; callers seed per-use
randomness with ``documents.doc_rng(seed, epoch, pos)``, so that too is independent of the
rank layout. ``"key"`` is the document's sample key inside its stream (``"000000042"``).

Batching (b = batch_size, W = world_size, G = b * W, N = num_docs):

- Step t's global batch is positions ``[t*G, (t+1)*G)``; rank r takes ``[t*G + r*b, t*G + (r+1)*b)``.
  One rank with batch 2b therefore sees exactly the concatenation of what two ranks with batch
  b see, step by step.
- Every rank runs the same number of steps, so no collective waits on a rank without data.
  The last, partial global batch of R = N - t*G docs gives every rank ``floor(R / W)`` docs;
  the ``R % W`` (< W) documents at the last positions are not used in that epoch (which ones
  changes every epoch with the order). If ``floor(R / W) == 0`` that step is dropped.
  ``unused_per_epoch`` is that count: the only deviation from exactly-once.
- DataLoader worker k of K (per rank) produces steps ``start, start+K, ...`` offset by k;
  PyTorch's DataLoader takes one batch from each worker in turn, so steps arrive in order.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .build import FORMAT_VERSION, INDEX_NAME, sha256_of
from .names import SPLITS

_REBUILD = "rebuild the shards with `cllm4rec build-shards` / `cllm4rec prepare` (with --overwrite)"
_SKIP = "or set data.bad_shards=skip to train without the bad shards"


# Spawn keys keep these streams apart from each other and from documents.doc_rng(seed, epoch, pos):
# SeedSequence pads the entropy to its pool size before appending a spawn key, so no entropy
# without one can produce the same state.
SHARD_ORDER, WINDOW_ORDER = 1, 2


def _rng(entropy: tuple, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(x) for x in entropy], spawn_key=(stream,)))


class ShardError(RuntimeError):
    """A shard is missing, truncated, empty or disagrees with index.json; the message names it."""


def load_index(shard_dir) -> dict:
    """Read ``<shard_dir>/index.json`` (this code's format_version)."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {shard_dir} is not a finished shard folder; "
                                "run `cllm4rec build-shards` or `cllm4rec prepare` to create it")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); {_REBUILD}") from e
    version = index.get("format_version") if isinstance(index, dict) else None
    if version != FORMAT_VERSION:
        raise ShardError(f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}; {_REBUILD}")
    listed = [f"splits/{name}.npz" for name in SPLITS] + sorted((index.get("id_maps") or {}).values())
    missing = [name for name in listed if not (Path(shard_dir) / name).is_file()]
    if missing:
        raise ShardError(f"{path} lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} missing "
                         f"from {shard_dir}: the folder was not finished; {_REBUILD}")
    return index


def load_split(shard_dir, name) -> sp.csr_matrix:
    """The ``name`` split ("train", "val" or "test") as CSR float32 (num_users, num_items)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    path = Path(shard_dir) / "splits" / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `cllm4rec build-shards` to create {shard_dir}")
    return sp.csr_matrix(sp.load_npz(path), dtype=np.float32)


# ---------------------------------------------------------------------------- shard files


def scan_members(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sample keys, data offsets and sizes of a shard's ``<key>.json`` members (tar headers only).

    webdataset's readers stream a shard from its first byte; locating one document without
    reading the ones before it needs the member offsets, which the tar headers give. The
    headers the builder writes (plain ustar regular files) are parsed directly from a memory
    map, about 20x faster than ``tarfile``; anything else (pax or GNU long-name headers) goes
    through ``tarfile``.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ShardError(f"shard {path}: not a readable tar file (the file is empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                found = _scan_ustar(data, size)
    except OSError as e:
        raise ShardError(f"shard {path}: not a readable tar file ({type(e).__name__}: {e})") from e
    except _NotPlain:
        found = _scan_with_tarfile(path)
    except (_Broken, ValueError, UnicodeDecodeError) as e:  # ValueError: a numeric header field is not octal
        raise ShardError(f"shard {path}: not a readable tar file ({type(e).__name__}: {e})") from e
    keys, offsets, sizes = found
    for name in keys:
        if not name.endswith(".json"):
            raise ShardError(f"shard {path}: member {name!r} is not a <key>.json document")
    return [k[:-5] for k in keys], np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


class _NotPlain(Exception):
    """A header the direct parser does not handle."""


class _Broken(Exception):
    """The bytes are not a well-formed tar file."""


def _scan_ustar(data, size: int) -> tuple[list[str], list[int], list[int]]:
    names, offsets, sizes = [], [], []
    at = 0
    while True:
        if at + 512 > size:
            raise _Broken(f"cut short at byte {at}")
        header = data[at:at + 512]
        if header == b"\0" * 512:
            return names, offsets, sizes  # end-of-archive marker
        stored = int(header[148:156].split(b"\0")[0].strip() or b"-1", 8)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise _Broken(f"bad header checksum at byte {at}")
        kind = header[156:157]
        length = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        name = header[:100].split(b"\0")[0].decode("utf-8")
        end = at + 512 + -(-length // 512) * 512
        if end > size:
            raise _Broken(f"member {name!r} runs past the end of the file")
        if kind == b"x":  # pax extended header of the next member (the builder's: "mtime=0.0")
            pax = _pax_records(bytes(data[at + 512:at + 512 + length]))
            if set(pax) - {"mtime", "atime", "ctime", "uname", "gname", "uid", "gid"}:
                raise _NotPlain
        elif kind in (b"0", b"\0"):
            prefix = header[345:500].split(b"\0")[0].decode("utf-8") if header[257:262] == b"ustar" else ""
            names.append(f"{prefix}/{name}" if prefix else name)
            offsets.append(at + 512)
            sizes.append(length)
        else:
            raise _NotPlain
        at = end


def _pax_records(body: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax header."""
    records, at = {}, 0
    while at < len(body) and body[at:at + 1] != b"\0":
        length = int(body[at:body.index(b" ", at)])
        key, _, value = body[body.index(b" ", at) + 1:at + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        at += length
    return records


def _scan_with_tarfile(path: Path) -> tuple[list[str], list[int], list[int]]:
    names, offsets, sizes = [], [], []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    names.append(member.name)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {path}: not a readable tar file ({type(e).__name__}: {e})") from e
    return names, offsets, sizes


def checked_members(path: Path, shard: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """scan_members, also failing when the document count differs from the index entry."""
    keys, offsets, sizes = scan_members(path)
    if len(keys) != int(shard["num_docs"]):
        raise ShardError(f"shard {path} holds {len(keys)} documents but index.json records {shard['num_docs']}")
    return keys, offsets, sizes


def shard_problem(path: Path, shard: dict, checksum: bool) -> str | None:
    """What is wrong with one shard file against its index entry, or None."""
    if not path.is_file():
        return f"shard {path} is missing"
    if int(shard["num_docs"]) < 1 or path.stat().st_size == 0:
        return f"shard {path} is empty"
    size = path.stat().st_size
    if size != int(shard["bytes"]):
        return f"shard {path} has {size} bytes but index.json records {shard['bytes']} (truncated or replaced)"
    try:
        checked_members(path, shard)
    except ShardError as e:
        return str(e)
    if checksum and sha256_of(path) != shard["sha256"]:
        return f"shard {path}: sha256 differs from index.json (corrupted or replaced)"
    return None


class _OpenShards:
    """Open file descriptors and member tables of the shards one reader needs right now.

    ``os.pread`` keeps no file position, so DataLoader workers forked from a process that
    holds these descriptors cannot disturb each other's reads.
    """

    def __init__(self, shard_dir: Path, shards: list[dict]):
        self.shard_dir = shard_dir
        self.shards = shards
        self.open: dict[int, tuple[int, list[str], np.ndarray, np.ndarray]] = {}

    def keep_only(self, wanted: set[int]) -> None:
        for i in [i for i in self.open if i not in wanted]:
            os.close(self.open.pop(i)[0])

    def read(self, shard: int, member: int) -> tuple[str, bytes]:
        if shard not in self.open:
            path = self.shard_dir / self.shards[shard]["path"]
            try:
                keys, offsets, sizes = checked_members(path, self.shards[shard])
            except ShardError as e:
                raise ShardError(f"{e}; {_REBUILD}") from e
            self.open[shard] = (os.open(path, os.O_RDONLY), keys, offsets, sizes)
        fd, keys, offsets, sizes = self.open[shard]
        raw = os.pread(fd, int(sizes[member]), int(offsets[member]))
        if len(raw) != int(sizes[member]):
            raise ShardError(f"shard {self.shard_dir / self.shards[shard]['path']}: document {keys[member]} is "
                             f"cut short; {_REBUILD}")
        return keys[member], raw

    def close(self) -> None:
        self.keep_only(set())


# ---------------------------------------------------------------------------- the reader


class ShardReader:
    """This rank's batches of one stream ("collab", "rec" or "content"); see the module docstring."""

    def __init__(self, shard_dir, stream: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, window_shards: int = 8, skip_shards: tuple = ()):
        self.shard_dir = Path(shard_dir)
        self.index = load_index(self.shard_dir)
        streams = self.index.get("streams", {})
        if stream not in streams:
            raise ValueError(f"{self.shard_dir / INDEX_NAME} has no stream {stream!r} (has {sorted(streams)})")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0 (it seeds a numpy SeedSequence), got {seed}")
        if int(window_shards) < 1:
            raise ValueError(f"window_shards must be >= 1, got {window_shards}")
        self.stream = stream
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.window_shards = int(window_shards)
        listed: list[dict] = list(streams[stream]["shards"])
        if sum(int(s["num_docs"]) for s in listed) != int(streams[stream]["num_docs"]):
            raise ShardError(f"{self.shard_dir / INDEX_NAME}: stream {stream!r} says num_docs="
                             f"{streams[stream]['num_docs']} but its shards sum to "
                             f"{sum(int(s['num_docs']) for s in listed)}; {_REBUILD}")
        skip = set(skip_shards)
        self.skipped = [s["path"] for s in listed if s["path"] in skip]
        self.shards = [s for s in listed if s["path"] not in skip]
        self.num_docs = sum(int(s["num_docs"]) for s in self.shards)
        if self.num_docs == 0:
            raise ShardError(f"stream {stream!r} of {self.shard_dir} has no documents left to read")
        self.global_batch_size = self.batch_size * self.world_size
        full, rest = divmod(self.num_docs, self.global_batch_size)
        self.steps_per_epoch: int = full + (1 if rest // self.world_size > 0 else 0)
        self.unused_per_epoch: int = rest % self.world_size if rest // self.world_size > 0 else rest
        self._layout: tuple[int, tuple[np.ndarray, list[np.ndarray]]] | None = None  # (epoch, layout) cached
        self._window_key: tuple[int, int] | None = None  # the window whose permutation is cached
        self._window: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    # ------------------------------------------------------------------ layout

    def shard_path(self, shard: dict) -> Path:
        return self.shard_dir / shard["path"]

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``self.shards`` in this epoch's order."""
        rng = _rng((self.seed, int(epoch)), SHARD_ORDER)
        return [int(i) for i in rng.permutation(len(self.shards))]

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(window start positions, per window: its shard indices in order)."""
        if self._layout is None or self._layout[0] != epoch:
            order = self.shard_order(epoch)
            windows = [np.asarray(order[k:k + self.window_shards]) for k in range(0, len(order), self.window_shards)]
            sizes = [sum(int(self.shards[i]["num_docs"]) for i in w) for w in windows]
            self._layout = (epoch, (np.cumsum([0] + sizes), windows))
        return self._layout[1]

    def locate(self, epoch: int, positions: np.ndarray) -> list[tuple[int, int]]:
        """(shard index, member index) of each global position of ``epoch`` (reads no data)."""
        starts, windows = self._epoch_layout(epoch)
        out = []
        for p in np.asarray(positions, dtype=np.int64):
            w = int(np.searchsorted(starts, p, side="right")) - 1
            if self._window_key != (epoch, w):
                shard_ids = windows[w]
                counts = np.asarray([int(self.shards[i]["num_docs"]) for i in shard_ids])
                perm = _rng((self.seed, int(epoch), w), WINDOW_ORDER).permutation(int(counts.sum()))
                self._window = (shard_ids, np.cumsum(np.concatenate([[0], counts])), perm)
                self._window_key = (epoch, w)
            shard_ids, shard_starts, perm = self._window
            j = int(perm[p - starts[w]])
            k = int(np.searchsorted(shard_starts, j, side="right")) - 1
            out.append((int(shard_ids[k]), j - int(shard_starts[k])))
        return out

    def step_slice(self, step: int) -> tuple[int, int]:
        """Global positions [lo, hi) that this rank gets at ``step``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} not in [0, {self.steps_per_epoch})")
        start = step * self.global_batch_size
        per = min(self.batch_size, (self.num_docs - start) // self.world_size)
        lo = start + self.rank * per
        return lo, lo + per

    # ------------------------------------------------------------------ checks

    def problems(self, checksum: bool = True, which: range | None = None) -> list[str]:
        """One message per bad shard among ``which`` (default all): missing, empty, wrong size,
        unreadable tar, wrong document count, and (``checksum``) wrong sha256. Also every tar
        file in the stream's folder that index.json does not list."""
        found = []
        for k in which if which is not None else range(len(self.shards)):
            problem = shard_problem(self.shard_path(self.shards[k]), self.shards[k], checksum)
            if problem:
                found.append(problem)
        if which is None or 0 in which:
            listed = {self.shard_path(s).name for s in self.index["streams"][self.stream]["shards"]}
            folder = self.shard_dir / self.stream
            for extra in sorted(folder.glob("*.tar")) if folder.is_dir() else []:
                if extra.name not in listed:
                    found.append(f"shard {extra} is not listed in {self.shard_dir / INDEX_NAME}")
        return found

    # ------------------------------------------------------------------ reading

    def read_step(self, epoch: int, step: int, files: _OpenShards) -> list[dict]:
        """This rank's documents at ``step`` of ``epoch``, each with ``"pos"`` and ``"key"``."""
        lo, hi = self.step_slice(step)
        where = self.locate(epoch, np.arange(lo, hi))
        docs = []
        for pos, (shard, member) in zip(range(lo, hi), where):
            key, raw = files.read(shard, member)
            try:
                doc = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ShardError(f"shard {self.shard_path(self.shards[shard])}: document {key} is not JSON "
                                 f"({e}); {_REBUILD}") from e
            doc["pos"], doc["key"] = pos, key
            docs.append(doc)
        # Keep the open files bounded to what the current windows use.
        if len(files.open) > 2 * self.window_shards:
            files.keep_only({s for s, _ in where})
        return docs

    def _check_range(self, epoch: int, start_step: int, stop_step: int | None) -> int:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        stop = self.steps_per_epoch if stop_step is None else min(int(stop_step), self.steps_per_epoch)
        if not 0 <= int(start_step) <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        return stop

    def loader(self, epoch: int, start_step: int = 0, stop_step: int | None = None,
               transform: Callable[[list[dict], int], object] | None = None,
               num_workers: int = 0) -> Iterator[tuple[int, list[dict], object]]:
        """``(step, docs, transform(docs, epoch))`` for steps [start_step, stop_step) in order,
        produced by ``num_workers`` DataLoader worker processes (0: in this process)."""
        stop = self._check_range(epoch, start_step, stop_step)
        steps = EpochSteps(self, int(epoch), int(start_step), stop, transform)
        if num_workers <= 0:
            return iter(steps)
        # A private generator: the DataLoader draws its worker base seed from it instead of
        # from the global torch RNG, which stays as the training loop left it (exact resume).
        return iter(torch.utils.data.DataLoader(steps, batch_size=None, num_workers=int(num_workers),
                                                generator=torch.Generator().manual_seed(self.seed),
                                                prefetch_factor=2, worker_init_fn=_ignore_stop_signals))

    # ------------------------------------------------------------------ resume

    def fingerprint(self) -> str:
        """Identifies the shards (paths, counts, sha256) this reader orders: a resumed run
        must see the same ones to continue the same order."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s['path']}:{s['num_docs']}:{s['sha256']};".encode())
        return h.hexdigest()

    def state(self, epoch: int, next_step: int, num_workers: int = 0) -> dict:
        """Where this rank and each of its workers stand: enough to continue at ``next_step``
        without reading anything before it."""
        workers = max(1, int(num_workers))
        return {"stream": self.stream, "epoch": int(epoch), "next_step": int(next_step), "seed": self.seed,
                "global_batch_size": self.global_batch_size, "window_shards": self.window_shards,
                "num_docs": self.num_docs, "shards": self.fingerprint(), "rank": self.rank,
                "next_position": int(next_step) * self.global_batch_size + self.rank * self.batch_size,
                "workers": [{"worker": k, "next_step": int(next_step) + (k - int(next_step)) % workers}
                            for k in range(workers)]}

    def resume_point(self, state: dict) -> tuple[int, int]:
        """(epoch, next_step) of a saved :meth:`state`, after checking it describes this order."""
        expected = {"stream": self.stream, "seed": self.seed, "global_batch_size": self.global_batch_size,
                    "window_shards": self.window_shards, "num_docs": self.num_docs, "shards": self.fingerprint()}
        differ = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"cannot continue the {self.stream!r} data order of the checkpoint: {detail}. "
                             "Resume with the same shards, run.seed, data.window_shards and global batch "
                             "(per-rank batch x ranks)")
        return int(state["epoch"]), int(state["next_step"])


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM/SIGUSR1 reaches the whole process group; whether to stop is the
    training process's call (it may finish a step and save first), and it ends its workers."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class EpochSteps(torch.utils.data.IterableDataset):
    """An iterable dataset of one epoch's steps of one rank (see :meth:`ShardReader.loader`)."""

    def __init__(self, reader: ShardReader, epoch: int, start: int, stop: int, transform):
        self.reader, self.epoch, self.start, self.stop, self.transform = reader, epoch, start, stop, transform

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        files = _OpenShards(self.reader.shard_dir, self.reader.shards)
        try:
            for step in range(self.start + worker, self.stop, workers):
                docs = self.reader.read_step(self.epoch, step, files)
                yield step, docs, None if self.transform is None else self.transform(docs, self.epoch)
        finally:
            files.close()
