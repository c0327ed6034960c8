"""Pretraining recipe: collaborative + content LLMs with mutual regularization.

    setup:  process group, shards, tokenizer + frozen base + ID tables (+ LoRA), DeepSpeed engine
    train:  content-only warm-up epochs, then rounds of one collaborative epoch (L-step:
            item-head LM on `user_i has interacted with item_a item_b ...`) and one content
            epoch (C-step: vocabulary LM on reviews and item texts); each step updates only the
            model whose loss it computed
    save:   ID tables + adapters to <run.dir>/pretrain; training checkpoints (every
            run.save_every_steps steps and at epoch ends) to <run.dir>/pretrain/checkpoints,
            from which run.resume=auto continues exactly
"""
from __future__ import annotations

import logging
from pathlib import Path

from data_shards.reader import load_index
from trainer.batching import Collator
from trainer.checkpoint import Checkpointer
from trainer.config import Config
from trainer.distributed import init_distributed, seed_everything
from trainer.engine import build_engine, build_model, load_ds_config, throughput_meter
from trainer.readers import stream_readers
from trainer.resources import ResourceReport
from trainer.loop import Epoch, Progress, TrainLog, epoch_steps, train_epoch
from trainer.model_state import save_model_state
from trainer.optim import Optimizers

log = logging.getLogger("cllm4rec")


def epoch_plan(content_warmup_epochs: int, rounds: int, content: bool = True) -> list[str]:
    if not content:  # model.content=false: the collaborative model alone
        return ["collab"] * rounds
    return ["content"] * content_warmup_epochs + ["collab", "content"] * rounds


def main(cfg: Config) -> Path:
    # ----- setup -----
    resources = ResourceReport("pretrain")
    rank, world = init_distributed(cfg.run.collective_timeout_s)
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.dir) / "pretrain"
    out_dir.mkdir(parents=True, exist_ok=True)
    index = load_index(cfg.data.shards)
    p = cfg.pretrain
    readers = stream_readers(cfg, {"collab": p.collab_batch_size, "content": p.content_batch_size})
    ds_config = load_ds_config(cfg.run.deepspeed, max(p.collab_batch_size, p.content_batch_size))
    model, tokenizer = build_model(cfg, ds_config, index["num_users"], index["num_items"])
    plan = epoch_plan(p.content_warmup_epochs, p.rounds, cfg.model.content)
    total_steps = sum(epoch_steps(readers[stream], p.max_steps_per_epoch) for stream in plan)
    optimizers, schedule = Optimizers.build(model, p, total_steps)
    engine = build_engine(model, ds_config, optimizers.module, schedule)
    resources.setup_done()
    collator = Collator.from_config(tokenizer, cfg)
    batchers = {"collab": collator.collab, "content": collator.content}
    checkpoints = Checkpointer(engine, out_dir, cfg.run.save_every_steps, cfg.run.keep_checkpoints, cfg.to_dict(),
                               optimizers.shards, stage_clock=resources.elapsed)
    resume_from = checkpoints.find(cfg.run.resume)
    state = checkpoints.load(resume_from) if resume_from else None
    progress = Progress.from_dict(state["progress"]) if state else Progress()
    resources.resumed_after(progress.wall_s)
    if rank == 0:
        cfg.dump(out_dir / "config.json")
    log.info("pretrain on %d rank(s): %d collab docs, %d content docs; plan %s%s", world,
             readers["collab"].num_docs, readers["content"].num_docs, plan,
             f"; resuming at epoch {progress.plan_index + 1} step {progress.next_step}" if state else "")

    # ----- train -----
    train_log = TrainLog(out_dir, rank, cfg.run.log_every, cfg.data.log_documents, state["step"] if state else 0,
                         throughput_meter(cfg, engine.module, ds_config), engine.monitor)
    for number in range(progress.plan_index, len(plan)):
        model = plan[number]  # each model trains on the stream of its name
        epoch = Epoch(readers[model], batchers[model], task=model, model=model, number=progress.epochs_done[model],
                      label=f"pretrain {number + 1} {model}", max_steps=p.max_steps_per_epoch,
                      num_workers=cfg.data.num_workers)
        mean = train_epoch(engine, optimizers, epoch, train_log, progress, checkpoints)
        log.info("%s epoch %d: mean loss %.4f", model, epoch.number, mean)
        progress.epochs_done[model] += 1
        progress.finish_entry()
        checkpoints.epoch_end(train_log.step, progress)
    train_log.close()

    # ----- save -----
    save_model_state(engine.module, out_dir, rank)
    log.info("saved ID tables%s to %s", " and adapters" if engine.module.lora else "", out_dir)
    resources.write(out_dir, {s: r.skipped for s, r in readers.items()})
    return out_dir
