"""Run by tests/distributed/test_distributed.py under `deepspeed --num_gpus 2`: ranks get batches of
different shapes and contents (one rank only user-less item texts, the other long reviews; one
rank with no item position in a collab step) and must still make the same collectives, ZeRO-3's
and the sharded ID tables', or this script hangs. Dense tables first, then sharded ones."""
import sys

import torch.distributed as dist

from tests.helpers import FixedReader, toy_engine
from trainer.batching import Collator
from trainer.distributed import init_distributed
from trainer.loop import Epoch, TrainLog, train_epoch


base_dir, shards, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
rank, world = init_distributed()
for tables in ("dense", "sharded"):
    engine, optimizer, tok = toy_engine(base_dir, shards, "loss.vocab_chunk=4", f"model.id_tables={tables}")
    col = Collator(tok, 0, 64, 50)
    if rank == 0:
        content = [{"kind": "review", "user": u, "item": u, "text": "great shampoo smells nice " * 5, "pos": u}
                   for u in range(3)]
        collab = [{"user": 0, "items": list(range(20)), "pos": 0}]
    else:
        content = [{"kind": "title", "user": None, "item": 7, "text": "wash", "pos": 9}]
        collab = [{"user": 5, "items": [1], "pos": 1}, {"user": 6, "items": [2, 3], "pos": 2}]
    no_items = [{"user": 8, "items": [], "pos": 3}] if rank == 1 else collab  # a rank without item positions
    log = TrainLog(out, rank, log_every=1)
    for task, docs, make in (("content", content, col.content), ("collab", collab, col.collab),
                             ("rec", collab, col.rec), ("collab", no_items, col.collab)):
        owner = "content" if task == "content" else "collab"
        train_epoch(engine, optimizer, Epoch(FixedReader([docs, docs]), make, task, owner, label=task), log)
dist.barrier()
if rank == 0:
    print("UNEVEN BATCHES OK")
