"""Run by tests/distributed/test_sharded_tables.py under `deepspeed --num_gpus W`: the same steps
(content, collab, rec, alternating, the same global batch at any W) with dense ID tables under
ZeRO-3 and with row-sharded ones, in LoRA and paper mode. After every step it checks that the
model that did not train and the frozen base did not change (bitwise); it writes every step's
loss and the final tables to <out>/<mode>-<tables>-w<W>.pt (rank 0)."""
import sys

import torch
import torch.distributed as dist

from tests.helpers import FixedReader
from trainer.batching import Collator
from trainer.config import load_config
from trainer.distributed import init_distributed, seed_everything
from trainer.engine import build_engine, build_model, load_ds_config
from trainer.loop import Epoch, TrainLog, train_epoch
from trainer.model_state import trainable_state
from trainer.optim import Optimizers

DOCS_PER_RANK_AT_W2 = 2


def tables(model) -> dict:
    """Every table in full, on every rank (collective): a test-sized gather."""
    if not model.sharded_tables:
        return {n.removeprefix("tables.").removesuffix(".weight"): t
                for n, t in trainable_state(model).items() if n.startswith("tables.")}
    out = {}
    for name, table in model.tables.items():
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, table.shard.detach().clone())
        out[name] = torch.cat(pieces)
    return out


def frozen_base(model) -> list[torch.Tensor]:
    """This rank's copy (or ZeRO-3 partition) of every frozen base weight."""
    return [getattr(p, "ds_tensor", p).detach().clone() for p in model.backbone.parameters() if not p.requires_grad]


def adapters(model, name: str) -> list[torch.Tensor]:
    return [getattr(p, "ds_tensor", p).detach().clone() for n, p in model.backbone.named_parameters()
            if f".{name}." in n and p.requires_grad]


def run(base_dir, shards, out, lora_r: int, id_tables: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config("configs/quickstart.yaml", [f"model.base_dir={base_dir}", f"data.shards={shards}",
                                                  f"lora.r={lora_r}", f"model.id_tables={id_tables}",
                                                  "lora.dropout=0", "loss.vocab_chunk=8", "run.seed=3"])
    seed_everything(cfg.run.seed)
    docs_per_rank = DOCS_PER_RANK_AT_W2 * 2 // world
    ds_config = load_ds_config(cfg.run.deepspeed, docs_per_rank)
    model, tok = build_model(cfg, ds_config, 40, 30)
    optimizers, schedule = Optimizers.build(model, cfg.pretrain, total_steps=6)
    engine = build_engine(model, ds_config, optimizers.module, schedule)
    col = Collator(tok, 0, 64, 50)
    # the global batch of each step: 4 documents; rank r takes its contiguous part
    collab = [{"user": u, "items": [(u * 7 + j * 3) % 30 for j in range(2 + u % 5)], "pos": u}
              for u in (0, 5, 39, 12)]
    content = [{"kind": "review", "user": u, "item": (u * 11) % 30, "text": "soft and gentle " * (1 + u % 3), "pos": u}
               for u in (1, 7, 20, 33)]
    mine = slice(rank * docs_per_rank, (rank + 1) * docs_per_rank)
    log = TrainLog(out, rank, log_every=100)
    losses = []
    base = frozen_base(model)
    for task, docs, make in (("content", content, col.content), ("collab", collab, col.collab),
                             ("rec", collab, col.rec)) * 2:
        owner = "content" if task == "content" else "collab"
        other = "collab" if owner == "content" else "content"
        before = tables(engine.module)
        before_adapter = adapters(engine.module, other)
        loss = train_epoch(engine, optimizers, Epoch(FixedReader([docs[mine]]), make, task, owner, label=task), log)
        losses.append(loss)
        after = tables(engine.module)
        for kind in ("user", "item"):
            assert torch.equal(before[f"{other}_{kind}"], after[f"{other}_{kind}"]), f"{task} moved {other}_{kind}"
        assert not torch.equal(before[f"{owner}_item"], after[f"{owner}_item"]), f"{task} did not train {owner}_item"
        assert all(torch.equal(a, b) for a, b in zip(before_adapter, adapters(engine.module, other))), \
            f"{task} moved the {other} adapter"
    assert all(torch.equal(a, b) for a, b in zip(base, frozen_base(engine.module))), "the frozen base changed"
    final = tables(engine.module)
    if rank == 0:
        torch.save({"losses": losses, "tables": final}, f"{out}/{'lora' if lora_r else 'paper'}-{id_tables}-w{world}.pt")
    dist.barrier()


if __name__ == "__main__":
    base_dir, shards, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_distributed()
    for lora_r in (8, 0):
        for id_tables in ("dense", "sharded"):
            run(base_dir, shards, out, lora_r, id_tables)
    if dist.get_rank() == 0:
        print("SHARDED STEPS OK")
