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
import time
from pathlib import Path

from data_shards.reader import load_index, load_split
from trainer.batching import Collator
from trainer.checkpoint import Checkpointer, resume_position
from trainer.config import Config
from trainer.engine import (build_engine, build_model, init_distributed, load_ds_config, report_resources,
                            seed_everything, stream_readers, throughput_meter)
from trainer.evaluate import rank_users
from trainer.metrics import evaluate_topk
from trainer.loop import TrainLog, train_epoch
from trainer.model_state import load_model_state, save_model_state
from trainer.optim import AlternatingAdamW, param_groups

log = logging.getLogger("cllm4rec")


def main(cfg: Config) -> Path:
    # ----- setup -----
    started = time.time()
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
    optimizer = AlternatingAdamW(param_groups(model, f.weight_decay), lr=f.lr, eps=f.adam_eps)
    engine = build_engine(model, ds_config, optimizer)
    collator = Collator.from_config(tokenizer, cfg, holdout_fraction=f.holdout_fraction, rec_target=f.target)
    train, val_items = load_split(cfg.data.shards, "train"), load_split(cfg.data.shards, "val")
    if rank == 0:
        cfg.dump(out_dir / "config.json")
    log.info("finetune on %d rank(s): %d users, %d epochs, target=%s", world, readers["rec"].num_docs, f.epochs,
             f.target)

    phases = [(epoch, phase) for epoch in range(f.epochs) for phase in ("rec", "content")
              if phase == "rec" or (f.content_epochs and cfg.model.content)]
    batchers = {"rec": collator.rec, "content": collator.content}
    checkpoints = Checkpointer(engine, out_dir, cfg.run.save_every_steps, cfg.run.keep_checkpoints, cfg.to_dict())
    resume_from = checkpoints.find(cfg.run.resume)
    state = checkpoints.load(resume_from) if resume_from else None
    progress = state["progress"] if state else {"plan_index": 0, "next_step": 0, "loss_sum": 0.0,
                                                "best": None, "history": []}

    if state and progress["plan_index"] < len(phases):
        epoch, phase = phases[progress["plan_index"]]
        log.info("resuming at finetune %d %s step %d", epoch + 1, phase, progress["next_step"])

    # ----- train, selecting on validation -----
    train_log = TrainLog(out_dir, rank, cfg.run.log_every, cfg.data.log_documents, state["step"] if state else 0,
                         throughput_meter(cfg, engine.module, ds_config))
    best, history = progress["best"], progress["history"]
    for number in range(progress["plan_index"], len(phases)):
        epoch, phase = phases[number]
        reader = readers[phase]
        start_step, loss_sum = resume_position(state, number, reader, epoch)

        def after_step(next_step: int, loss_sum: float, epoch_steps: int, number=number, epoch=epoch, reader=reader):
            checkpoints.after_step(train_log.step, next_step, epoch_steps,
                                   lambda: {"plan_index": number, "next_step": next_step, "loss_sum": loss_sum,
                                            "best": best, "history": history},
                                   lambda: reader.state(epoch, next_step, cfg.data.num_workers))

        train_epoch(engine, optimizer, reader, batchers[phase], phase, "collab" if phase == "rec" else "content",
                    epoch, f"finetune {epoch + 1} {phase}", train_log, f.max_steps_per_epoch, start_step, loss_sum,
                    cfg.data.num_workers, after_step)
        if number + 1 == len(phases) or phases[number + 1][0] != epoch:  # the epoch's last phase: validate
            val = evaluate_topk(rank_users(engine, collator, train, cfg.evaluate.batch_size,
                                                item_block=cfg.evaluate.item_block), val_items)
            history.append({"epoch": epoch, **val})
            improved = best is None or val[f.select_metric] > best[f.select_metric]
            log.info("finetune epoch %d: val %s%s", epoch, " ".join(f"{k}={v:.4f}" for k, v in val.items()
                                                                    if k != "users"),
                     "  (best so far)" if improved else "")
            if improved:
                best = {"epoch": epoch, **val}
                # ----- save (the best epoch so far) -----
                save_model_state(engine.module, out_dir, rank)
        checkpoints.epoch_end(train_log.step, {"plan_index": number + 1, "next_step": 0, "loss_sum": 0.0,
                                               "best": best, "history": history})
    train_log.close()
    if rank == 0:
        (out_dir / "selection.json").write_text(json.dumps({"metric": f.select_metric, "best": best,
                                                             "history": history}, indent=2))
    log.info("best epoch %d (val %s %.4f) saved to %s", best["epoch"], f.select_metric, best[f.select_metric],
             out_dir)
    report_resources(out_dir, "finetune", started, {s: r.skipped for s, r in readers.items()})
    return out_dir
