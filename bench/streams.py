"""Throughput and memory of the three document streams, this project's way against the naive way,
in one run, at GPT-2-small size (a random LLaMA: 12 layers, 768 dims, the GPT-2 tokenizer and its
50,257-token vocabulary) on the full Beauty split.

    packed + chunked:  data.pack=true (each rank's batch packed into few rows) and the chunked
                       vocabulary cross-entropy (loss.vocab_chunk=1024)
    naive:             data.pack=false (one document per row, padded to the longest) and
                       loss.vocab_chunk=0 (full-vocabulary logits of every position, kept for backward)

Each (stream, variant) trains through the project's own step (trainer.loop.train_epoch, DeepSpeed
ZeRO-2 by default, a world of one) in a process of its own, so that its peak RSS is its own; the
process is killed as soon as its RSS passes --memory-gib (6 GiB), so a run that needs more fails.
The two variants of the collab and rec streams take their steps in turn (packed step i, naive
step i, packed step i + 1, ...), so that both meet the same load from anything else on the
machine. The content stream runs with data.max_text_tokens=1000 on the steps around the first
batch holding a review cut at 1,000 tokens. Batches are built before timing; the first step of
each run is a warm-up and not counted.

Then, with the plain model (no DeepSpeed, eval): users/s of the recommendation head (one forward
pass, top-20 over all items) against autoregressive generation of 20 item tokens (greedy, KV
cache, train and already generated items excluded), on the same users and prompts.

Usage:  python bench/streams.py                    (under 3 minutes on 2 idle cores)
        python bench/streams.py --steps 8 --only collab,rec --deepspeed configs/ds_zero3.json
The base is written once to <out>/base (never committed); the shards are built from the shared
data folder beside the repository when --shards has none.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STREAMS = {"collab": ("collab", "collab"), "rec": ("rec", "collab"), "content": ("content", "content")}
VARIANTS = {"packed": ["data.pack=true", "loss.vocab_chunk=1024"], "naive": ["data.pack=false", "loss.vocab_chunk=0"]}
GIB = 1024 ** 3


# ----- the parent: data, base, one process per measurement, the report -------------------------------
def ensure_shards(shards: Path, beauty: Path) -> None:
    if (shards / "index.json").is_file():
        return
    if not (beauty / "full").is_dir():
        raise SystemExit(f"{shards} has no shards and {beauty}/full is not there to build them from (--beauty)")
    subprocess.run(["cllm4rec", "build-shards", "--input", str(beauty / "full"), "--texts", str(beauty / "derived"),
                    "--output", str(shards), "--overwrite"], check=True)


def ensure_base(base: Path, tokenizers: Path) -> None:
    if (base / "config.json").is_file():
        return
    from trainer.backbone import real_tokenizer, write_tiny_llama

    # GPT-2 small's shape: 12 layers, 768 dims, 12 heads; a SwiGLU MLP of 2048 has GPT-2's 4 x 768
    # MLP parameter count.
    write_tiny_llama(str(base), real_tokenizer(tokenizers, "gpt2"), seed=0, hidden_size=768, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                     max_position_embeddings=2048)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Worker:
    """One measurement in a process of its own. With `lockstep`, the process waits for the
    parent's word before each training step and reports each finished step, so that the parent
    can run the steps of several processes in turn: they never compete with each other for the
    cores, and load from elsewhere on the machine falls on all of them alike."""

    def __init__(self, args, *worker_args: str, lockstep: bool = False):
        self.name = "-".join(worker_args)
        self.result_file = Path(args.out) / f"result-{self.name}.json"
        self.result_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", *worker_args, "--result", str(self.result_file),
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in PASSED_ON]]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        self.limit = int(args.memory_gib * GIB)
        self.limit_gib = args.memory_gib
        # A backstop for one allocation so large that it would pass the limit between two checks.
        backstop = self.limit + 2 * GIB
        read, write = os.pipe()  # the worker's step messages (a lockstep worker only)
        if lockstep:
            env["STREAMS_BENCH_FD"] = str(write)
        self.log = Path(args.out) / f"log-{self.name}.txt"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, pass_fds=(write,),
                                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (backstop, backstop)))
        os.close(write)
        self.messages, self.pending = read, b""
        self.killed, self.usage, self.status = False, None, None

    def check(self) -> bool:
        """Enforce the memory limit; True while the process runs."""
        if self.usage is not None:
            return False
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid:
            self.status, self.usage = status, usage
            return False
        try:
            if not self.killed and _rss(self.proc.pid) > self.limit:
                self.proc.kill()
                self.killed = True
        except (FileNotFoundError, ProcessLookupError):
            pass
        return True

    def expect(self, word: str) -> bool:
        """Wait (checking memory every 10 ms) for the next message; False if the process ended."""
        while b"\n" not in self.pending:
            if not self.check():
                return False
            if select.select([self.messages], [], [], 0.01)[0]:
                self.pending += os.read(self.messages, 4096)
        line, self.pending = self.pending.split(b"\n", 1)
        if line.split()[0].decode() != word:
            raise RuntimeError(f"{self.name}: expected {word!r}, got {line!r}")
        return True

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        while self.check():
            time.sleep(0.01)
        os.close(self.messages)
        code = os.waitstatus_to_exitcode(self.status)
        result = json.loads(self.result_file.read_text()) if self.result_file.is_file() else {}
        result.update(peak_rss_gib=self.usage.ru_maxrss * 1024 / GIB, exit=code,
                      wall_s=time.perf_counter() - self.started)
        if self.killed:
            result["error"] = f"killed: RSS passed the {self.limit_gib:g} GiB limit"
        elif code != 0 and "error" not in result:
            result["error"] = f"exit status {code}; see {self.log}"
        return result


def run_in_turn(workers: list[Worker]) -> list[dict]:
    """Step i of every worker in turn, then step i + 1, ...; each worker says `wait` before a step
    and `done` after it."""
    live = list(workers)
    while live:
        for w in list(live):
            if not w.expect("wait"):
                live.remove(w)
                continue
            w.go()
            if not w.expect("done"):
                live.remove(w)
    return [w.finish() for w in workers]


def _step_gate():
    """In a lockstep worker: (before_step, after_step) talking to the parent; no-ops otherwise."""
    fd = os.environ.get("STREAMS_BENCH_FD")
    if not fd:
        return (lambda step: None), (lambda step: None)
    out = os.fdopen(int(fd), "w", buffering=1)

    def before(step):
        out.write(f"wait {step}\n")
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the parent went away")

    return before, (lambda step: out.write(f"done {step}\n"))


PASSED_ON = ("shards", "base", "out", "steps", "content_steps", "batch", "max_text_tokens", "users", "threads",
             "lora_r", "deepspeed", "attention")


def _step_cost(*results: dict) -> tuple[float, float]:
    """Least-squares fit step_s = fixed + per_position * positions over the steps of the runs."""
    import numpy as np

    positions = np.concatenate([r["positions_per_step"] for r in results]).astype(float)
    seconds = np.concatenate([r["step_s_per_step"] for r in results])
    (fixed, per_position), *_ = np.linalg.lstsq(np.vstack([np.ones_like(positions), positions]).T, seconds,
                                                rcond=None)
    return float(fixed), float(per_position)


def report(args, runs: dict, inference: dict) -> None:
    print(f"\nGPT-2-small-sized random LLaMA (12 layers, 768 dims, GPT-2 vocabulary 50,257, untied head, "
          f"{'paper mode: only the ID tables train' if args.lora_r == 0 else f'LoRA r={args.lora_r}'}), "
          f"full Beauty split, {args.batch} documents per step, {Path(args.deepspeed).name} on 1 process, "
          f"{args.threads} threads, attention {args.attention}, "
          f"memory limit {args.memory_gib:g} GiB per run; {args.steps} timed steps per collab / rec run and "
          f"{args.content_steps} per content run, after one warm-up step\n")
    head = f"{'stream':8} {'variant':17} {'docs/s':>8} {'tokens/s':>9} {'padded':>7} {'s/step':>7} {'peak RSS':>9}"
    print(head + "\n" + "-" * len(head))
    for (stream, variant), r in runs.items():
        name = "packed + chunked" if variant == "packed" else "naive"
        if "docs_s" in r:
            print(f"{stream:8} {name:17} {r['docs_s']:8.2f} {r['tokens_s']:9.0f} {r['pad_frac'] * 100:6.1f}% "
                  f"{r['step_s']:7.2f} {r['peak_rss_gib']:7.2f} G")
        else:
            print(f"{stream:8} {name:17} {'failed':>8} {'':9} {'':7} {'':7} {r['peak_rss_gib']:7.2f} G   "
                  f"{r.get('error', '')}")
    for stream in STREAMS:
        fast, slow = runs.get((stream, "packed"), {}), runs.get((stream, "naive"), {})
        if "docs_s" in fast and "docs_s" in slow:
            fixed, per_position = _step_cost(fast, slow)
            print(f"{stream}: {fast['docs_s'] / slow['docs_s']:.2f}x the naive docs/s; "
                  f"{slow['positions'] / fast['positions']:.2f}x fewer positions per step. Fitted over both "
                  f"variants' steps: {fixed:.2f} s per step whatever its size (optimizer, DeepSpeed) + "
                  f"{per_position * 1000:.2f} ms per position")
    content = runs.get(("content", "packed"), {})
    if content.get("longest_doc"):
        print(f"content steps hold a review of {content['longest_doc']} tokens (data.max_text_tokens="
              f"{args.max_text_tokens}); its step: {content['long_step_tokens']} real tokens")
    naive = runs.get(("content", "naive"), {})
    if naive.get("naive_logits_gib"):
        print(f"naive content, the same step: {naive['naive_positions']:,} padded positions; their full-vocabulary "
              f"logits alone are {naive['naive_logits_gib']:.1f} GiB in fp32, and the backward pass keeps the "
              f"log-softmax and makes its gradient, each as large")
    if inference:
        print(f"\ninference on {inference['users']} users, {inference['block']} per forward pass, plain PyTorch, eval:")
        print(f"  recommendation head, top-20 of {inference['items']:,} items in one pass: "
              f"{inference['topk_users_s']:8.2f} users/s")
        print(f"  autoregressive generation of 20 item tokens:        {inference['gen_users_s']:8.2f} users/s "
              f"({inference['topk_users_s'] / inference['gen_users_s']:.1f}x slower)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", default="runs/shards-beauty-full")
    ap.add_argument("--beauty", default=str(REPO.parent / "shared" / "data" / "amazon_beauty_cllm4rec"))
    ap.add_argument("--tokenizers", default=str(REPO.parent / "shared" / "tokenizers"))
    ap.add_argument("--out", default="runs/bench-streams")
    ap.add_argument("--base", default="", help="model directory; default <out>/base, written once")
    ap.add_argument("--steps", type=int, default=30, help="timed collab and rec steps per run (after one warm-up step)")
    ap.add_argument("--content-steps", type=int, default=3, help="timed content steps per run")
    ap.add_argument("--batch", type=int, default=20, help="documents per step")
    ap.add_argument("--max-text-tokens", type=int, default=1000)
    ap.add_argument("--lora-r", type=int, default=0, help="0: paper mode, only the ID tables train (the authors' loop)")
    ap.add_argument("--users", type=int, default=60, help="users for the inference comparison")
    ap.add_argument("--threads", type=int, default=2)
    # ZeRO-2: on one process ZeRO-3 only adds a copy of every weight per forward and per backward
    # pass, a fixed cost per step that hides what the streams do (configs/ds_zero2.json says
    # ZeRO-2 is the faster choice whenever the base fits on one device).
    ap.add_argument("--deepspeed", default="configs/ds_zero2.json", help="DeepSpeed config of the training runs")
    ap.add_argument("--attention", default="auto", help="model.attn_implementation of every run")
    ap.add_argument("--memory-gib", type=float, default=6.0)
    ap.add_argument("--only", default="", help="comma-separated subset: collab,rec,content,inference")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.base = args.base or str(Path(args.out) / "base")
    if args.worker:
        return worker(args)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    ensure_shards(Path(args.shards), Path(args.beauty))
    ensure_base(Path(args.base), Path(args.tokenizers))
    only = set(args.only.split(",")) if args.only else set(STREAMS) | {"inference"}
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    runs = {}
    for stream in STREAMS:
        if stream not in only:
            continue
        if stream == "content":
            # One at a time: together they would pass the machine's memory budget.
            results = [run_in_turn([Worker(args, "train", stream, v, lockstep=True)])[0] for v in VARIANTS]
        else:
            results = run_in_turn([Worker(args, "train", stream, v, lockstep=True) for v in VARIANTS])
        for variant, result in zip(VARIANTS, results):
            runs[(stream, variant)] = result
            print(f"{stream} {variant}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in result.items() if not isinstance(v, list)),
                  flush=True)
    inference = Worker(args, "inference").finish() if "inference" in only else {}
    if inference:
        print("inference: " + ", ".join(f"{k}={v}" for k, v in inference.items()), flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"runs": {f"{s}/{v}": r for (s, v), r in runs.items()}, "inference": inference}, indent=2))
    report(args, runs, inference)
    # Other work on the machine slows every step; the variants' steps alternate, so it falls on both.
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s; machine load average (1 min) "
          f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")


# ----- the workers -------------------------------------------------------------------------------------
def _config(args, variant: str):
    from trainer.config import load_config

    return load_config(str(REPO / "configs" / "beauty_bench.yaml"), [
        f"model.base_dir={args.base}", f"data.shards={args.shards}", f"run.dir={args.out}/{variant}",
        f"data.max_text_tokens={args.max_text_tokens}", f"lora.r={args.lora_r}", "lora.dropout=0",
        f"run.deepspeed={args.deepspeed}", f"model.attn_implementation={args.attention}", "run.log_every=1000000",
        *VARIANTS[variant]])


def _content_start(reader, collator) -> tuple[int, int]:
    """The first content step holding a review cut at max_text_tokens, and the step to start at so
    that it is the second of the run (the first is the warm-up)."""
    from data_shards.documents import content_text

    for step, (_, docs, _) in enumerate(reader.loader(0)):
        reviews = [d["text"] for d in docs if d["kind"] == "review"]
        if reviews and max(len(t) for t in collator.tok.encode_many([content_text(t) for t in reviews],
                                                                    with_bos=False)) >= collator.max_text_tokens:
            return step, max(0, step - 1)
    raise SystemExit("no review reaches data.max_text_tokens; lower --max-text-tokens")


def worker(args) -> None:
    result: dict = {}
    try:
        if args.worker[0] == "train":
            train_worker(args, args.worker[1], args.worker[2], result)
        else:
            inference_worker(args, result)
    except BaseException as e:  # an allocation beyond the limit included: report it, do not hide it
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        Path(args.result).write_text(json.dumps(result))
        raise
    Path(args.result).write_text(json.dumps(result))


def train_worker(args, stream: str, variant: str, result: dict) -> None:
    import torch

    from data_shards.reader import ShardReader, load_index
    from trainer.batching import Collator
    from trainer.distributed import init_distributed
    from trainer.engine import build_engine, build_model, load_ds_config
    from trainer.loop import Epoch, TrainLog, train_epoch
    from trainer.optim import AlternatingAdamW, param_groups

    cfg = _config(args, variant)
    task, owner = STREAMS[stream]
    init_distributed()
    index = load_index(cfg.data.shards)
    ds_config = load_ds_config(str(REPO / cfg.run.deepspeed), args.batch)
    model, tokenizer = build_model(cfg, ds_config, index["num_users"], index["num_items"])
    optimizer = AlternatingAdamW(param_groups(model, 0.0), lr=cfg.pretrain.lr)
    engine = build_engine(model, ds_config, optimizer)
    collator = Collator.from_config(tokenizer, cfg)
    make = getattr(collator, task)
    reader = ShardReader(cfg.data.shards, stream, args.batch, 0, 1, cfg.run.seed, cfg.data.window_shards)
    start = 0
    if stream == "content":
        long_step, start = _content_start(reader, collator)
    steps = (args.content_steps if stream == "content" else args.steps) + 1
    batches = list(reader.loader(0, start, start + steps, make, num_workers=0))
    if stream == "content":
        long_batch = batches[long_step - start][2]
        lengths = torch.bincount(long_batch["doc_index"][long_batch["doc_index"] >= 0])
        result.update(longest_doc=int(lengths.max()), long_step_tokens=int(lengths.sum()))
        if variant == "naive":
            positions = long_batch["input_ids"].numel()
            result.update(naive_positions=positions,
                          naive_logits_gib=positions * model._hf().config.vocab_size * 4 / GIB)
    Path(args.result).write_text(json.dumps(result))  # kept if the run is killed for memory

    before_step, after_step = _step_gate()

    class Fixed:
        steps_per_epoch = steps

        def loader(self, epoch, start_step, stop_step, transform, num_workers):
            for step in range(start_step, stop_step):
                before_step(step)  # waiting here counts as data_s, not as step_s
                yield step, batches[step][1], batches[step][2]

    out = Path(args.out) / f"{stream}-{variant}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    log = TrainLog(out, 0, 1000000)
    class Gate:  # the lockstep's step boundary, where the recipes checkpoint
        def before_epoch(self, epoch, progress):
            pass

        def after_step(self, step, epoch, progress):
            after_step(progress.next_step - 1)

    train_epoch(engine, optimizer, Epoch(Fixed(), make, task, owner, label=f"{stream} {variant}"), log,
                checkpoints=Gate())
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][1:]
    seconds = sum(r["step_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    positions = [batch["input_ids"].numel() for _, _, batch in batches[1:]]
    result.update(docs_s=sum(r["docs"] for r in records) / seconds, tokens_s=tokens / seconds,
                  step_s=seconds / len(records), pad_frac=1 - tokens / sum(positions), positions=sum(positions),
                  positions_per_step=positions, step_s_per_step=[r["step_s"] for r in records],
                  pad_frac_per_step=[r["pad_frac"] for r in records], loss=[r["loss"] for r in records])


def generate_items(model, collator, users: list[int], histories: list[list[int]], count: int):
    """Greedy autoregressive generation of `count` item tokens through the item head, with a KV
    cache, from the evaluation prompt (Collator.score's); a user's train items and the items
    already generated are masked out, as the recommendation head masks train items."""
    import torch

    from data_shards.documents import doc_rng, rec_prompt, shuffled

    tok = collator.tok
    prompts = [shuffled(h, doc_rng(collator.seed, 0, u))[: collator.max_items] for u, h in zip(users, histories)]
    seqs = tok.encode_many([rec_prompt(u, h) for u, h in zip(users, prompts)])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):  # left padding: every row's last position is its last token
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    decoder, items = model._hf().get_decoder(), model.tables["collab_item"]
    model._use("collab")
    out = decoder(inputs_embeds=model.embed(ids, "collab"), attention_mask=mask, position_ids=positions,
                  use_cache=True)
    hidden, cache = out.last_hidden_state[:, -1], out.cache
    banned = torch.zeros((len(seqs), tok.num_items), dtype=torch.bool)
    for row, history in enumerate(histories):
        banned[row, history] = True
    generated = []
    for _ in range(count):
        scores = items(hidden=hidden).float().masked_fill(banned, float("-inf"))
        nxt = scores.argmax(dim=-1)
        generated.append(nxt)
        banned[torch.arange(len(seqs)), nxt] = True
        mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = decoder(inputs_embeds=model.embed((nxt + tok.item_offset).unsqueeze(1), "collab"),
                      attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        hidden, cache = out.last_hidden_state[:, -1], out.cache
    return torch.stack(generated, dim=1)


def inference_worker(args, result: dict) -> None:
    import numpy as np
    import torch

    from data_shards.reader import load_index, load_split
    from trainer.batching import Collator
    from trainer.engine import build_model
    from trainer.ranking import rank_block
    from trainer.metrics import csr_rows

    torch.set_num_threads(args.threads)
    cfg = _config(args, "packed")
    index = load_index(cfg.data.shards)
    model, tokenizer = build_model(cfg, {}, index["num_users"], index["num_items"])
    model.eval()
    collator = Collator.from_config(tokenizer, cfg)
    train = load_split(cfg.data.shards, "train")
    block = args.batch
    users = np.arange(args.users)
    blocks = [users[i:i + block] for i in range(0, len(users), block)]
    with torch.no_grad():
        rank_block(model, collator, train, blocks[0][:2], k=20)  # warm-up
        start = time.perf_counter()
        for b in blocks:
            rank_block(model, collator, train, b, k=20, item_block=cfg.evaluate.item_block)
        topk_s = time.perf_counter() - start
        histories = [h.tolist() for h in csr_rows(train, users)]
        generate_items(model, collator, [0, 1], histories[:2], 2)  # warm-up
        start = time.perf_counter()
        for b in blocks:
            generate_items(model, collator, b.tolist(), [histories[u] for u in b], 20)
        gen_s = time.perf_counter() - start
    result.update(users=len(users), block=block, items=index["num_items"], topk_users_s=len(users) / topk_s,
                  gen_users_s=len(users) / gen_s)


if __name__ == "__main__":
    main()
