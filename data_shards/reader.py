"""Read the shards written by :mod:`data_shards.build` in a world-size-independent global order.

Epoch order (identical on every rank, whatever the world size):

1. the stream's shards are permuted by ``np.random.default_rng([seed, epoch])``;
2. their samples are concatenated in that shard order (within a shard: written order);
3. a shuffle buffer of ``shuffle_buffer`` documents driven by
   ``np.random.default_rng([seed, epoch, 1])`` reorders them (``shuffle_buffer <= 1``: no
   buffer). The buffer: fill it to ``shuffle_buffer`` docs; then for every further doc, emit
   ``buf[k]`` with ``k = rng.integers(shuffle_buffer)`` and put the new doc in its place; at the
   end emit the remaining buffer in the order of ``rng.permutation(len(buf))``.

Position p (0-based) in this order is the document's ``"pos"``; callers seed the per-use
randomness with ``documents.doc_rng(seed, epoch, pos)``, so that too is independent of the
rank layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from .build import FORMAT_VERSION, INDEX_NAME, SPLIT_NAMES, sha256_of
_REBUILD = "rebuild the shards with `cllm4rec build-shards` (with --overwrite)"


class ShardError(RuntimeError):
    """A shard is missing, truncated or disagrees with index.json; the message names the shard."""


def load_index(shard_dir) -> dict:
    """Read ``<shard_dir>/index.json`` (format_version 1)."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {shard_dir} is not a finished shard folder; "
                                "run `cllm4rec build-shards` to create it")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); run `cllm4rec build-shards` (with --overwrite) "
                         "to rebuild it") from e
    version = index.get("format_version") if isinstance(index, dict) else None
    if version != FORMAT_VERSION:
        raise ShardError(f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}; "
                         "run `cllm4rec build-shards` (with --overwrite) to rebuild the shards with this version")
    return index


def load_split(shard_dir, name) -> sp.csr_matrix:
    """The ``name`` split ("train", "val" or "test") as CSR float32 (num_users, num_items)."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
    path = Path(shard_dir) / "splits" / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `cllm4rec build-shards` to create {shard_dir}")
    return sp.csr_matrix(sp.load_npz(path), dtype=np.float32)


def _identity(src):
    return src


class ShardReader:
    """This rank's batches of one stream ("collab", "rec" or "content").

    Batching (b = batch_size, W = world_size, G = b * W, N = num_docs):

    - Step t's global batch is positions ``[t*G, (t+1)*G)`` of the epoch order (module
      docstring); rank r takes the contiguous slice ``[t*G + r*b, t*G + (r+1)*b)``. Hence one
      rank with batch 2b sees, at every full step, exactly the concatenation of what two ranks
      with batch b see.
    - Every rank runs the same number of steps (collectives must not deadlock). The last,
      partial global batch of R = N - t*G docs gives every rank ``floor(R / W)`` docs (rank r:
      ``[t*G + r*q, t*G + (r+1)*q)``, q = floor(R/W)); the ``R % W`` leftover docs (the last
      positions) are dropped for that epoch. If q == 0 that step is dropped entirely.
      So ``steps_per_epoch = ceil(N / G)``, minus one when that last step is dropped.
    - Docs are dicts as written by the builder plus ``"pos"``: the global position.

    Every rank reads every shard of the stream: the global order (shard permutation + shuffle
    buffer) is a function of the whole stream, and reading it all is what makes it identical
    on every rank and independent of the world size. Only this rank's docs are JSON-decoded.
    """

    def __init__(self, shard_dir, stream: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 1000):
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
        self.stream = stream
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shards: list[dict] = list(streams[stream]["shards"])
        self.num_docs: int = int(streams[stream]["num_docs"])
        if sum(int(s["num_docs"]) for s in self.shards) != self.num_docs:
            raise ShardError(f"{self.shard_dir / INDEX_NAME}: stream {stream!r} says num_docs={self.num_docs} "
                             f"but its shards sum to {sum(int(s['num_docs']) for s in self.shards)}; {_REBUILD}")
        self.global_batch_size = self.batch_size * self.world_size
        full, rest = divmod(self.num_docs, self.global_batch_size)
        self.steps_per_epoch: int = full + (1 if rest // self.world_size > 0 else 0)
        # Resuming: today ``epoch(e, start_step)`` replays, reading and discarding the first
        # start_step * G positions. A replay-free resume needs, at that point: the shard
        # permutation (recomputable from (seed, epoch)), the index of the current shard and the
        # sample offset inside it, the shuffle buffer's contents (or the positions they came
        # from), and the state of the buffer's Generator.

    # ------------------------------------------------------------------ layout

    def shard_path(self, shard: dict) -> Path:
        return self.shard_dir / shard["path"]

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``self.shards`` in this epoch's order."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        return [int(i) for i in rng.permutation(len(self.shards))]

    def step_slice(self, step: int) -> tuple[int, int]:
        """Global positions [lo, hi) that this rank gets at ``step``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} not in [0, {self.steps_per_epoch})")
        start = step * self.global_batch_size
        per = min(self.batch_size, (self.num_docs - start) // self.world_size)
        lo = start + self.rank * per
        return lo, lo + per

    # ------------------------------------------------------------------ checks

    def check_files(self) -> None:
        """Every shard listed in the index exists with its recorded byte size (cheap)."""
        for s in self.shards:
            p = self.shard_path(s)
            if not p.is_file():
                raise ShardError(f"shard {p} is missing (listed in {self.shard_dir / INDEX_NAME}); {_REBUILD}")
            size = p.stat().st_size
            if size != int(s["bytes"]):
                raise ShardError(f"shard {p} has {size} bytes but index.json records {s['bytes']} "
                                 f"(truncated or replaced); {_REBUILD}")

    def verify(self) -> None:
        """check_files() plus the sha256 of every shard (reads all bytes)."""
        self.check_files()
        for s in self.shards:
            p = self.shard_path(s)
            if sha256_of(p) != s["sha256"]:
                raise ShardError(f"shard {p}: sha256 differs from index.json (corrupted or replaced); {_REBUILD}")

    # ------------------------------------------------------------------ reading

    def _iter_shard(self, shard: dict) -> Iterator[bytes]:
        """Raw JSON payloads of one shard, in written order; checks the sample count."""
        import webdataset as wds  # lazy: webdataset imports torch

        path = self.shard_path(shard)
        # This reader does the node/worker split itself (by global position), so webdataset must
        # hand every sample of the shard to every rank: identity splitters, no shard shuffle.
        # seed=0: otherwise WebDataset draws a seed from Python's global `random`, changing it.
        ds = wds.WebDataset([str(path.resolve())], shardshuffle=False, nodesplitter=_identity,
                            workersplitter=_identity, empty_check=False, seed=0)
        n = 0
        try:
            for sample in ds:
                if "json" not in sample:
                    raise ShardError(f"shard {path}: sample {sample.get('__key__')!r} has no json payload; {_REBUILD}")
                n += 1
                yield sample["json"]
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - tar/IO errors, re-raised naming the shard
            raise ShardError(f"shard {path}: cannot read sample {n} ({type(e).__name__}: {e}); {_REBUILD}") from e
        if n != int(shard["num_docs"]):
            raise ShardError(f"shard {path} holds {n} docs but index.json records {shard['num_docs']}; {_REBUILD}")

    def _global_stream(self, epoch: int) -> Iterator[bytes]:
        """All docs of the stream (raw JSON) in the epoch's global order."""
        def concatenated():
            for i in self.shard_order(epoch):
                yield from self._iter_shard(self.shards[i])

        size = self.shuffle_buffer
        if size <= 1:
            yield from concatenated()
            return
        rng = np.random.default_rng([self.seed, int(epoch), 1])
        buf: list[bytes] = []
        for doc in concatenated():
            if len(buf) < size:
                buf.append(doc)
                continue
            k = int(rng.integers(size))
            out, buf[k] = buf[k], doc
            yield out
        for k in rng.permutation(len(buf)):
            yield buf[int(k)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[dict]]:
        """This rank's batches for ``epoch``, from step ``start_step`` on (earlier steps replayed
        and discarded). Shard files are checked (existence, byte size) before anything is
        yielded: this call raises :class:`ShardError` right away when one is missing or truncated."""
        epoch, start_step = int(epoch), int(start_step)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        self.check_files()
        return self._batches(epoch, start_step)

    def _batches(self, epoch: int, start_step: int) -> Iterator[list[dict]]:
        steps = self.steps_per_epoch
        stream = enumerate(self._global_stream(epoch))
        step = start_step
        batch: list[dict] = []
        lo, hi = self.step_slice(step) if step < steps else (0, 0)
        for pos, raw in stream:
            if step >= steps:
                continue  # drain: the per-shard sample-count checks run to the end of the stream
            if pos < lo:
                continue
            if pos < hi:
                doc = json.loads(raw)
                doc["pos"] = pos
                batch.append(doc)
            if pos == hi - 1:
                yield batch
                batch = []
                step += 1
                if step < steps:
                    lo, hi = self.step_slice(step)
        if step < steps:
            raise ShardError(f"stream {self.stream!r} of {self.shard_dir} ended after fewer docs than index.json "
                             f"records ({self.num_docs}); {_REBUILD}")

    def __len__(self) -> int:
        return self.steps_per_epoch
