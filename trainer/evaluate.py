"""Evaluation recipe: one forward pass per user, full ranking over all items.

    setup:  process group, shards, model with the saved ID tables + adapters, DeepSpeed engine
    rank:   prompt = all train items (order fixed by the seed) + `, user_i will interact with`;
            the rec head scores every item; train items are excluded; top-100 per user.
            Users are scored in fixed blocks, spread over the ranks, and items in blocks of
            evaluate.item_block, keeping a running top-100 (model.cllm4rec.blocked_topk), so
            memory stays bounded however many users and items; the top lists are gathered on
            every rank.
    save:   <run.dir>/metrics.json (Recall@20, Recall@40, NDCG@100 and the user count for
            val and test, and popularity's and EASE's from the same splits) and, on request,
            <run.dir>/recommendations.jsonl. With evaluate.ease_fusion (beyond the paper) also
            the model's ranking fused with EASE's, the weight chosen on val, in metrics.json
            under "ease_fusion" and, on request, <run.dir>/recommendations_ease_fusion.jsonl.
            With evaluate.ensemble (beyond the paper) the listed checkpoints are ranked too and
            the rankings fused: "ensemble" and recommendations_ensemble.jsonl
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from data_shards.names import SPLITS
from data_shards.reader import load_index, load_split
from trainer.batching import Collator
from trainer.config import Config
from trainer.distributed import init_distributed, seed_everything
from trainer.engine import build_engine, build_model, load_ds_config
from trainer.resources import ResourceReport
from trainer.baselines import RRF_K, format_table, fuse_ensemble, fuse_with_ease, model_rows, run_baselines
from trainer.metrics import evaluate_topk
from trainer.model_state import load_model_state
from trainer.ranking import TOP_K, rank_users, write_recommendations

log = logging.getLogger("cllm4rec")

def check_ensemble(checkpoint: Path, members: list) -> None:
    """Before any ranking: every member is a saved model state, and none is counted twice."""
    folders = [checkpoint.resolve(), *(Path(m).resolve() for m in members)]
    if len(set(folders)) < len(folders):
        raise ValueError(f"evaluate.ensemble {members} repeats a checkpoint (this run's is {checkpoint}); "
                         "list each other model once")
    missing = [m for m in members if not (Path(m) / "model_state.json").is_file()]
    if missing:
        raise FileNotFoundError(f"evaluate.ensemble: {missing} hold no saved model state (model_state.json); "
                                "list finetune output folders of finished runs")


def main(cfg: Config) -> dict:
    # ----- setup -----
    resources = ResourceReport("evaluate")
    rank, world = init_distributed(cfg.run.collective_timeout_s)
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    checkpoint = Path(cfg.evaluate.checkpoint or run_dir / "finetune")
    check_ensemble(checkpoint, cfg.evaluate.ensemble)
    index = load_index(cfg.data.shards)
    ds_config = load_ds_config(cfg.run.deepspeed, cfg.evaluate.batch_size)
    model, tokenizer = build_model(cfg, ds_config, index["num_users"], index["num_items"])
    load_model_state(model, checkpoint)
    engine = build_engine(model, ds_config)
    resources.setup_done()
    collator = Collator.from_config(tokenizer, cfg)
    splits = {name: load_split(cfg.data.shards, name) for name in SPLITS}
    train = splits["train"]
    log.info("evaluating %s on %d users x %d items, %d rank(s)", checkpoint, train.shape[0], train.shape[1], world)

    # ----- rank -----
    # the fusion takes a deeper list from each ranking; the model's own top-100 is its head
    depth = cfg.evaluate.fusion_depth if cfg.evaluate.ease_fusion else TOP_K
    ranked = rank_users(engine, collator, train, cfg.evaluate.batch_size, k=depth, item_block=cfg.evaluate.item_block)
    topk = ranked[:, :TOP_K]
    metrics = {name: evaluate_topk(topk, splits[name]) for name in cfg.evaluate.splits}
    members = [ranked]
    for member in cfg.evaluate.ensemble:  # the same base and engine, the member's tables and adapters
        log.info("ranking with ensemble member %s", member)
        load_model_state(model, Path(member))
        members.append(rank_users(engine, collator, train, cfg.evaluate.batch_size, k=depth,
                                  item_block=cfg.evaluate.item_block))

    # ----- save -----
    resources.write(run_dir / "evaluate")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.evaluate.recommendations:
            write_recommendations(topk, run_dir / "recommendations.jsonl")
        baselines, fusion, ensemble = {}, {}, {}
        if cfg.evaluate.ensemble:
            ranked = fuse_ensemble(members, train, depth)  # the EASE fusion below takes the ensemble's ranking
            ensemble = {"members": [str(checkpoint), *cfg.evaluate.ensemble], "rrf_k": RRF_K, "depth": depth,
                        **{name: evaluate_topk(ranked[:, :TOP_K], splits[name]) for name in cfg.evaluate.splits}}
            if cfg.evaluate.recommendations:
                write_recommendations(ranked[:, :TOP_K], run_dir / "recommendations_ensemble.jsonl")
        if cfg.evaluate.baselines:
            base = run_baselines(train, splits["val"], splits["test"], log=log.info,
                                 ease_depth=depth if cfg.evaluate.ease_fusion else 0)
            baselines = {"popularity": base["popularity"], f"EASE (lambda={base['ease']['lambda']})": base["ease"]}
        if cfg.evaluate.ease_fusion:
            fusion = fuse_with_ease(ranked, base["ease"].pop("topk"), train, splits["val"], splits["test"],
                                    cfg.evaluate.fusion_weights, log=log.info)
            fused = fusion.pop("topk")
            if cfg.evaluate.recommendations:
                write_recommendations(fused, run_dir / "recommendations_ease_fusion.jsonl")
        result = {"checkpoint": str(checkpoint), **metrics, "baselines": baselines,
                  **({"ensemble": ensemble} if ensemble else {}), **({"ease_fusion": fusion} if fusion else {})}
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        rows = {**baselines, **model_rows(result)}
        for split in cfg.evaluate.splits:
            print(f"{split}:\n" + format_table({name: result[split] for name, result in rows.items()}))
        log.info("wrote %s", run_dir / "metrics.json")
    return metrics
