"""Recommendation-oriented finetuning recipe, with model selection on validation.

    setup:  process group, shards, model initialised from the pretrain output, DeepSpeed engine
    train:  per epoch, rec steps on the collaborative model (prompt: a user's train items with a
            random 20% masked out; target: the masked items, multi-hot, through the tied rec
            head; mutual regularization towards the content tables), then (content_epochs) one
            content epoch so regularization works both ways; then rank the validation users
    save:   the epoch with the best validation metric to <run.dir>/finetune; training
            checkpoints to <run.dir>/finetune/checkpoints (run.resume=auto continues exactly)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from data_shards.reader import load_index, load_split
from trainer.batching import Collator
from trainer.checkpoint import Checkpointer
from trainer.config import Config
from trainer.distributed import init_distributed, seed_everything
from trainer.engine import build_engine, build_model, load_ds_config, throughput_meter
from trainer.readers import stream_readers
from trainer.resources import ResourceReport
from trainer.ranking import rank_users
from trainer.metrics import evaluate_topk
from trainer.loop import Epoch, Progress, TrainLog, epoch_steps, train_epoch
from trainer.model_state import load_model_state, save_model_state
from trainer.optim import Optimizers

log = logging.getLogger("cllm4rec")


def main(cfg: Config) -> Path:
    # ----- setup -----
    resources = ResourceReport("finetune")
    rank, world = init_distributed(cfg.run.collective_timeout_s)
    seed_everything(cfg.run.seed)
    f = cfg.finetune
    run_dir = Path(cfg.run.dir)
    out_dir = run_dir / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    index = load_index(cfg.data.shards)
    readers = stream_readers(cfg, {"rec": f.batch_size, "content": f.content_batch_size})
    ds_config = load_ds_config(cfg.run.deepspeed, max(f.batch_size, f.content_batch_size))
    model, tokenizer = build_model(cfg, ds_config, index["num_users"], index["num_items"])
    load_model_state(model, Path(f.init_from or run_dir / "pretrain"))
    # Each epoch: the rec stream trains the collaborative model; then (content_epochs) the
    # content stream the content model, so that mutual regularization works both ways.
    streams = ["rec", "content"] if f.content_epochs and cfg.model.content else ["rec"]
    plan = [(epoch, stream) for epoch in range(f.epochs) for stream in streams]
    total_steps = sum(epoch_steps(readers[stream], f.max_steps_per_epoch) for _, stream in plan)
    optimizers, schedule = Optimizers.build(model, f, total_steps)
    engine = build_engine(model, ds_config, optimizers.module, schedule)
    resources.setup_done()
    collator = Collator.from_config(tokenizer, cfg, holdout_fraction=f.holdout_fraction, rec_target=f.target)
    train, val_items = load_split(cfg.data.shards, "train"), load_split(cfg.data.shards, "val")
    if rank == 0:
        cfg.dump(out_dir / "config.json")
    log.info("finetune on %d rank(s): %d users, %d epochs, target=%s", world, readers["rec"].num_docs, f.epochs,
             f.target)

    batchers = {"rec": collator.rec, "content": collator.content}
    checkpoints = Checkpointer(engine, out_dir, cfg.run.save_every_steps, cfg.run.keep_checkpoints, cfg.to_dict(),
                               optimizers.shards, stage_clock=resources.elapsed)
    resume_from = checkpoints.find(cfg.run.resume)
    state = checkpoints.load(resume_from) if resume_from else None
    progress = Progress.from_dict(state["progress"]) if state else Progress()
    resources.resumed_after(progress.wall_s)
    if state and progress.plan_index < len(plan):
        epoch_number, stream = plan[progress.plan_index]
        log.info("resuming at finetune %d %s step %d", epoch_number + 1, stream, progress.next_step)

    # ----- train, selecting on validation -----
    train_log = TrainLog(out_dir, rank, cfg.run.log_every, cfg.data.log_documents, state["step"] if state else 0,
                         throughput_meter(cfg, engine.module, ds_config), engine.monitor)
    for number in range(progress.plan_index, len(plan)):
        epoch_number, stream = plan[number]
        epoch = Epoch(readers[stream], batchers[stream], task=stream, model="collab" if stream == "rec" else "content",
                      number=epoch_number, label=f"finetune {epoch_number + 1} {stream}",
                      max_steps=f.max_steps_per_epoch, num_workers=cfg.data.num_workers)
        train_epoch(engine, optimizers, epoch, train_log, progress, checkpoints)

        # ----- validate, after each epoch's last stream; save the best epoch so far -----
        if stream == streams[-1]:
            val = evaluate_topk(rank_users(engine, collator, train, cfg.evaluate.batch_size,
                                           item_block=cfg.evaluate.item_block), val_items)
            progress.history.append({"epoch": epoch_number, **val})
            train_log.events([(f"Val/{k}", v, epoch_number + 1) for k, v in val.items() if k != "users"])
            improved = progress.best is None or val[f.select_metric] > progress.best[f.select_metric]
            log.info("finetune epoch %d: val %s%s", epoch_number,
                     " ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "users"), "  (best so far)" if improved else "")
            if improved:
                progress.best = {"epoch": epoch_number, **val}
                save_model_state(engine.module, out_dir, rank)
        progress.finish_entry()
        checkpoints.epoch_end(train_log.step, progress)
    train_log.close()
    best = progress.best
    if rank == 0:
        (out_dir / "selection.json").write_text(json.dumps({"metric": f.select_metric, "best": best,
                                                             "history": progress.history}, indent=2))
    log.info("best epoch %d (val %s %.4f) saved to %s", best["epoch"], f.select_metric, best[f.select_metric],
             out_dir)
    resources.write(out_dir, {s: r.skipped for s, r in readers.items()})
    return out_dir
