"""The `cllm4rec` command.

    cllm4rec build-shards --input DIR [--texts DIR ...] --output DIR
    cllm4rec make-tiny-model --output DIR [--tokenizer llama2|gpt2|train] [--data DIR]
    cllm4rec synthetic-data --output DIR
    cllm4rec baselines --shards DIR
    cllm4rec pretrain|finetune|evaluate --config configs/x.yaml [key.sub=value ...]

The training subcommands are what launch/*.sh start under the `deepspeed` launcher, which
adds `--local_rank`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trainer.config import load_config

SHARED_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers"


def _recipe(name: str, args) -> None:
    try:
        cfg = load_config(args.config, args.overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)  # KeyError's str() adds quotes
        raise SystemExit(f"cllm4rec {name}: {message}") from None
    if name == "pretrain":
        from trainer.pretrain import main
    elif name == "finetune":
        from trainer.finetune import main
    else:
        from trainer.evaluate import main
    main(cfg)


def _build_shards(args) -> None:
    from data_shards.build import main_build

    index = main_build(args.input, args.output, args.texts, args.docs_per_shard, args.overwrite)
    counts = {name: s["num_docs"] for name, s in index["streams"].items()}
    print(f"wrote shards to {args.output}: {index['num_users']} users, {index['num_items']} items, documents {counts}")


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
    write_tiny_llama(args.output, tokenizer, args.seed, **shape)
    print(f"wrote a tiny random LLaMA with the {choice} tokenizer to {args.output}")


def _synthetic(args) -> None:
    from data_shards.synthetic import write_synthetic_cllm4rec

    out = write_synthetic_cllm4rec(args.output, args.users, args.items, seed=args.seed)
    print(f"wrote a synthetic CLLM4Rec-format dataset to {out}")


def _baselines(args) -> None:
    from data_shards.reader import load_split
    from trainer.baselines import run_baselines

    splits = [load_split(args.shards, s) for s in ("train", "val", "test")]
    print(json.dumps(run_baselines(*splits), indent=2))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cllm4rec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-shards", help="CLLM4Rec-format folder -> WebDataset shards + index.json")
    p.add_argument("--input", required=True, help="folder with meta.pkl and {train,val,test}_matrix.npz")
    p.add_argument("--texts", action="append", default=[], help="extra folder with item_texts/ and user_item_texts/")
    p.add_argument("--output", required=True)
    p.add_argument("--docs-per-shard", type=int, default=2000)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_build_shards)

    p = sub.add_parser("make-tiny-model", help="write a tiny random LLaMA checkpoint directory")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", default="auto", choices=["auto", "llama2", "gpt2", "train"],
                   help="auto: llama2 from the shared tokenizer folder when present, else train one on --data")
    p.add_argument("--tokenizers-dir", default="", help="folder with llama2/ and gpt2/ tokenizer files")
    p.add_argument("--data", default="", help="CLLM4Rec-format folder, for --tokenizer train")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("synthetic-data", help="write a small synthetic CLLM4Rec-format dataset")
    p.add_argument("--output", required=True)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synthetic)

    p = sub.add_parser("baselines", help="popularity and EASE on a shard folder's splits")
    p.add_argument("--shards", required=True)
    p.set_defaults(func=_baselines)

    for name in ("pretrain", "finetune", "evaluate"):
        p = sub.add_parser(name, help=f"the {name} recipe (run it through launch/{name}.sh)")
        p.add_argument("--config", required=True, help="YAML experiment config (configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
        p.set_defaults(func=lambda args, name=name: _recipe(name, args))
    return ap


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # bitsandbytes (imported by peft) warns about an optional CPU kernel package it lacks; the
    # 4-bit path is not used unless asked for.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
