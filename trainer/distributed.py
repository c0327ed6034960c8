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
