"""Checkpoint cost and recovery time, measured through the launch scripts on 2 ranks.

1. A pretrain run that checkpoints every --every steps: size and save time of each checkpoint.
2. The same run killed with SIGKILL after --kill-at steps, then restarted with --resume auto:
   the load time, and the wall time from the kill to the first step the resumed run finishes
   (process start, model build, checkpoint load and one step).

Usage:
    python bench/checkpoint.py --base runs/bench-beauty/base --shards runs/shards-beauty-full
    python bench/checkpoint.py --make-base runs/llama-1b --tokenizer-from runs/bench-beauty/base \
        --hidden 2048 --layers 16 --shards runs/shards-beauty-full
        (writes a random LLaMA of about 1.1B parameters as sharded safetensors first)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(args, run_dir: Path, *extra: str) -> subprocess.Popen:
    overrides = [f"model.base_dir={args.base}", f"data.shards={args.shards}", f"run.dir={run_dir}",
                 f"run.save_every_steps={args.every}", "run.keep_checkpoints=100", "pretrain.content_warmup_epochs=1",
                 "pretrain.rounds=0", f"pretrain.max_steps_per_epoch={args.steps}", "run.log_every=1000",
                 f"pretrain.content_batch_size={args.batch}", f"data.max_text_tokens={args.max_text_tokens}", *extra]
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen(["bash", "launch/pretrain.sh", "configs/beauty_bench.yaml", *overrides], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, NPROC="2"))


def steps_logged(run_dir: Path) -> int:
    log = run_dir / "pretrain" / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", help="local model directory")
    ap.add_argument("--make-base", help="write a random LLaMA here first (--hidden, --layers) and use it")
    ap.add_argument("--tokenizer-from", help="with --make-base: a model directory whose tokenizer to use")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--steps", type=int, default=12, help="content steps of the run")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--kill-at", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-text-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/bench-checkpoint")
    args = ap.parse_args()
    if args.make_base:
        from trainer.backbone import load_tokenizer, write_tiny_llama

        if not args.tokenizer_from:
            raise SystemExit("--make-base needs --tokenizer-from (a model directory whose tokenizer to use)")
        tokenizer = load_tokenizer(args.tokenizer_from)
        intermediate = int(args.hidden * 8 / 3) // 64 * 64
        write_tiny_llama(args.make_base, tokenizer, 0, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=intermediate, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128)
        args.base = args.make_base
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    whole = out / "whole"
    assert launch(args, whole).wait() == 0, f"see {out}/whole.log"
    saves = re.findall(r"checkpoint \S+ saved in ([\d.]+) s \(([\d.]+) MB\)", (out / "whole.log").read_text())

    broken = out / "broken"
    proc = launch(args, broken)
    while steps_logged(broken) < args.kill_at:
        assert proc.poll() is None, f"see {out}/broken.log"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.perf_counter()
    proc.wait()
    saved_at = (steps_logged(broken) // args.every) * args.every
    # The resumed run drops the log lines after its checkpoint; dropping them here first lets
    # the wait below see the first step it finishes.
    log = broken / "pretrain" / "train_log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:saved_at]))
    resumed = launch(args, broken, "run.resume=auto")
    while steps_logged(broken) <= saved_at:
        assert resumed.poll() is None, f"see {out}/broken.log"
        time.sleep(0.02)
    to_first_step = time.perf_counter() - killed
    assert resumed.wait() == 0, f"see {out}/broken.log"
    load = re.findall(r"loaded in ([\d.]+) s", (out / "broken.log").read_text())

    from trainer.backbone import load_backbone

    params = sum(p.numel() for p in load_backbone(args.base)[0].parameters())
    print(f"\nbase {args.base}: {params / 1e6:.1f}M parameters; 2 ranks, ZeRO-3")
    print(f"checkpoint size: {float(saves[0][1]):.1f} MB; save time: "
          + ", ".join(f"{float(s):.2f}" for s, _ in saves) + " s")
    print(f"load on resume: {float(load[-1]):.2f} s; kill -9 to the first resumed step: {to_first_step:.1f} s "
          f"(launcher start, model build, load, one step)")


if __name__ == "__main__":
    main()
