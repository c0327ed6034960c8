"""This rank's shard readers, after every shard of every stream has been checked."""
from __future__ import annotations

import logging

import torch

from trainer.config import Config

log = logging.getLogger("cllm4rec")


def stream_readers(cfg: Config, batch_sizes: dict[str, int]) -> dict:
    """This rank's reader of each shard stream (name -> documents per rank per step), after every
    shard of every stream has been checked. The recipes call it before loading the base, so a bad
    shard folder is reported in seconds, however large the base.

    The ranks split the checks (rank r checks shards r, r+W, ...) and share what they found,
    so every rank makes the same decision: stop naming every bad shard of every stream
    (data.bad_shards=error) or leave the bad shards out of the order and report how many (skip).
    """
    from data_shards.reader import ShardError, ShardReader

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def reader(stream, skip=()):
        return ShardReader(cfg.data.shards, stream, batch_sizes[stream], rank, world, cfg.run.seed,
                           cfg.data.window_shards, skip_shards=tuple(skip))

    readers = {stream: reader(stream) for stream in batch_sizes}
    mine = {stream: r.problems(cfg.data.checksums, range(rank, len(r.shards), world)) for stream, r in readers.items()}
    found: list = [None] * world
    torch.distributed.all_gather_object(found, mine)
    problems = {stream: [p for part in found for p in part[stream]] for stream in readers}
    bad_streams = {stream: found_here for stream, found_here in problems.items() if found_here}
    if bad_streams and cfg.data.bad_shards == "error":
        raise ShardError("; ".join(f"stream {stream!r}: " + "; ".join(found_here)
                                   for stream, found_here in bad_streams.items())
                         + ". Rebuild the shards (cllm4rec prepare/build-shards --overwrite), or set "
                         "data.bad_shards=skip to train without them")
    for stream, found_here in bad_streams.items():
        r = readers[stream]
        bad = [s["path"] for s in r.shards if any(str(r.shard_path(s)) in p for p in found_here)]
        log.warning("stream %r: skipping %d bad shard(s) (data.bad_shards=skip): %s", stream, len(bad), found_here)
        readers[stream] = reader(stream, bad)
    for stream, r in readers.items():
        log.info("stream %r: %d docs in %d shards, %d steps/epoch of %d docs%s%s", stream, r.num_docs,
                 len(r.shards), r.steps_per_epoch, r.global_batch_size,
                 f"; {r.unused_per_epoch} doc(s) sit out each epoch (the last global batch does not split evenly "
                 "across the ranks)" if r.unused_per_epoch else "",
                 f"; {len(r.skipped)} bad shard(s) skipped" if r.skipped else "")
    return readers
