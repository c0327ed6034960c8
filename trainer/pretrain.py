"""Pretraining recipe: collaborative + content LLMs with mutual regularization.

    setup:  process group, shards, tokenizer + frozen base + ID tables (+ LoRA), DeepSpeed engine
    train:  content-only warm-up epochs, then rounds of one collaborative epoch (L-step:
            item-head LM on `user_i has interacted with item_a item_b ...`) and one content
            epoch (C-step: vocabulary LM on reviews and item texts); each step updates only the
            model whose loss it computed
    save:   ID tables + adapters to <run.dir>/pretrain
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from data_shards.reader import load_index
from trainer.batching import Collator
from trainer.config import Config
from trainer.engine import (build_engine, build_model, init_distributed, load_ds_config, report_resources,
                            seed_everything, stream_reader)
from trainer.loop import TrainLog, train_epoch
from trainer.model_state import save_model_state
from trainer.optim import AlternatingAdamW, param_groups

log = logging.getLogger("cllm4rec")


def epoch_plan(content_warmup_epochs: int, rounds: int) -> list[str]:
    return ["content"] * content_warmup_epochs + ["collab", "content"] * rounds


def main(cfg: Config) -> Path:
    # ----- setup -----
    started = time.time()
    rank, world = init_distributed()
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.dir) / "pretrain"
    out_dir.mkdir(parents=True, exist_ok=True)
    index = load_index(cfg.data.shards)
    p = cfg.pretrain
    ds_config = load_ds_config(cfg.run.deepspeed, max(p.collab_batch_size, p.content_batch_size))
    model, tokenizer = build_model(cfg, ds_config, index["num_users"], index["num_items"])
    optimizer = AlternatingAdamW(param_groups(model, p.weight_decay), lr=p.lr)
    engine = build_engine(model, ds_config, optimizer)
    collator = Collator(tokenizer, cfg.run.seed, cfg.data.max_text_tokens, cfg.data.max_items)
    readers = {"collab": stream_reader(cfg, "collab", p.collab_batch_size),
               "content": stream_reader(cfg, "content", p.content_batch_size)}
    batchers = {"collab": collator.collab, "content": collator.content}
    if rank == 0:
        cfg.dump(out_dir / "config.json")
    log.info("pretrain on %d rank(s): %d collab docs, %d content docs; plan %s", world,
             readers["collab"].num_docs, readers["content"].num_docs, epoch_plan(p.content_warmup_epochs, p.rounds))

    # ----- train -----
    train_log = TrainLog(out_dir / "train_log.jsonl", rank, cfg.run.log_every)
    epochs_done = {"collab": 0, "content": 0}
    for number, kind in enumerate(epoch_plan(p.content_warmup_epochs, p.rounds)):
        epoch = epochs_done[kind]
        label = f"pretrain {number + 1} {kind}"
        mean = train_epoch(engine, optimizer, readers[kind], batchers[kind], kind, kind, epoch, label, train_log,
                           p.max_steps_per_epoch)
        log.info("%s epoch %d: mean loss %.4f", kind, epoch, mean)
        epochs_done[kind] += 1
    train_log.close()

    # ----- save -----
    save_model_state(engine.module, out_dir, rank)
    log.info("saved ID tables%s to %s", " and adapters" if engine.module.lora else "", out_dir)
    report_resources(out_dir, "pretrain", started)
    return out_dir
