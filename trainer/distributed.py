"""Process setup: the process group (gloo on CPU, NCCL on GPUs), logging and seeds."""
from __future__ import annotations

import logging
import os
import random
import socket

import numpy as np
import torch

from trainer import compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, fn, args: tuple, results) -> None:
    """One rank of run_gloo_ranks: join the group, run fn, report its value (or the error)."""
    import io
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        buffer = io.BytesIO()  # bytes: a tensor would be shared through a handle that dies with its rank
        torch.save(fn(rank, world, *args), buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 (raised in the parent)
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) in `world` processes joined in a gloo process group on this machine
    (one thread each), without a launcher; each rank's return value, by rank. For benchmarks and
    tests of collectives; `fn` must be a module-level function. A rank that fails, or dies without
    a word (out of memory), stops all of them with its error.

    The ranks come from a fork server, not from a fork of this process: a process group that
    this process already holds (a test's, a recipe's) must not be copied into them, and a copied
    one can neither be used nor torn down there."""
    import io
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "trainer.distributed"])
    results, port = ctx.Queue(), free_port()
    ranks = [ctx.Process(target=_gloo_rank, args=(r, world, port, fn, args, results)) for r in range(world)]
    for process in ranks:
        process.start()
    reports = {}
    try:
        while len(reports) < world:
            try:
                rank, value, error = results.get(timeout=5)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(ranks) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{world} ranks: rank(s) died without a report (rank, exit code): {dead}")
                continue
            if error is not None:
                raise RuntimeError(f"{world} ranks: rank {rank} failed:\n{error}")
            reports[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for process in ranks:
            process.join(timeout=30 if len(reports) == world else 0)
            if process.is_alive():
                process.terminate()
                process.join()
    return [reports[r] for r in range(world)]


def init_distributed(collective_timeout_s: float = 1800) -> tuple[int, int]:
    """Start (or join) the process group; returns (rank, world_size). A collective that waits
    longer than `collective_timeout_s` (a rank hung or gone on another node) fails on every rank
    still waiting, instead of holding its nodes until the job's wall-time limit."""
    import deepspeed

    # Tokenization runs in DataLoader worker processes; the tokenizer's own thread pool would
    # be forked with them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        # Started by mpirun (LAUNCHER=openmpi): DeepSpeed would need mpi4py to read these;
        # MASTER_ADDR/MASTER_PORT come from .deepspeed_env.
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    if "RANK" not in os.environ:  # a plain `python`/pytest process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        compat.disable_shm_comm()
    if not torch.distributed.is_initialized():
        from datetime import timedelta

        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl",
                                   timeout=timedelta(seconds=collective_timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    setup_logging(rank)
    return rank, world


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
