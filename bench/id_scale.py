"""Row-sharded ID tables (model/sharded_tables.py) at tens of millions of rows, on CPU.

Trains the four ID tables (collab_user, collab_item, content_user, content_item; --users and
--items rows of --dim numbers each) for a few alternating collab / content steps with ShardAdam,
first on 2 gloo ranks and then in one process (--world), from the same seed and the same global
batch. A step looks rows up across ranks, scores every document's hidden state against all items
with the vocabulary-parallel item head, and adds the mutual regularization against the other
model's rows. Reported per rank: the RSS before any table exists (the fixed overhead), after the
tables are created and at the end, the wall time of each step, and the bytes each rank sent
through the tables' collectives in each step. Two checks, PASS or FAIL:
  (a) memory: every rank's peak RSS <= its overhead + a fixed slack + the four tables' training
      state (weight, gradient, two Adam moments) divided by the number of ranks;
  (b) same result: the final tables on W ranks equal those of one process, row for row (the
      item head sums in another order on another number of ranks, so up to a tolerance).
Then, without training, a memory and traffic model at LLM width (d=4096, 10M users, 1M items,
8 and 64 ranks): ZeRO-3-partitioned dense tables against row-sharded ones.

Usage:
    python bench/id_scale.py                                      # 10M users and items, 16 dims, W=2 then W=1
    python bench/id_scale.py --users 100000 --items 50000        # a quick run
    python bench/id_scale.py --skip-train                         # the memory model only
The W=1 run holds the whole training state of the four tables (16 bytes per element; about
10 GiB at the defaults) in one process; the ranks' final shards are written under --out.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import sharded_tables  # noqa: E402
from model.sharded_tables import ShardedIDTable, row_range  # noqa: E402
from trainer.distributed import run_gloo_ranks  # noqa: E402
from trainer.optim import ShardAdam  # noqa: E402

TABLES = ("collab_user", "collab_item", "content_user", "content_item")
DOCS_PER_STEP = 64  # the global batch; rank r trains the r-th contiguous part of it
HISTORY_ITEMS = 20  # items looked up per document to build its hidden state
TARGET_ITEMS = 5  # items the head scores each document against (multi-hot, as the rec head)
LAMBDA_C = 1.0  # weight of the mutual regularization
LEARNING_RATE = 1e-3
INIT_STD = 0.02
STATE_COPIES = 4  # weight, gradient and Adam's two moments, all fp32
RSS_SLACK_GIB = 1.0  # per rank, on top of the measured overhead: allocator slack, per-step temporaries
TOLERANCE = 1e-5  # largest |difference| allowed between the final tables of two world sizes
COMPARE_ROWS = 1 << 20  # rows compared at a time, so the comparison holds no whole table

GIB = 1 << 30

# ------------------------------------------------------------------ one training run


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def global_batch(seed: int, step: int, users: int, items: int) -> dict:
    """The step's documents, the same on every rank and at every world size."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return {"users": torch.randint(0, users, (DOCS_PER_STEP,), generator=gen),
            "history": torch.randint(0, items, (DOCS_PER_STEP, HISTORY_ITEMS), generator=gen),
            "targets": torch.randint(0, items, (DOCS_PER_STEP, TARGET_ITEMS), generator=gen)}


def local_part(batch: dict, rank: int, world: int) -> dict:
    start, end = row_range(DOCS_PER_STEP, rank, world)
    return {key: value[start:end] for key, value in batch.items()}


def step_loss(tables: dict, model: str, batch: dict) -> torch.Tensor:
    """This rank's loss, summed over its documents (divided by their count by the caller). `model`'s tables train; the other model's are only read."""
    other = "content" if model == "collab" else "collab"
    user_rows = tables[f"{model}_user"](batch["users"])
    history_rows = tables[f"{model}_item"](batch["history"])
    hidden = user_rows + history_rows.mean(dim=1)
    docs, per_doc = batch["targets"].shape
    targets = {"queries": torch.arange(docs).repeat_interleave(per_doc), "items": batch["targets"].reshape(-1),
               "weights": torch.ones(docs * per_doc)}
    nll = tables[f"{model}_item"](hidden=hidden, targets=targets).sum()
    with torch.no_grad():
        their_users = tables[f"{other}_user"](batch["users"])
        their_items = tables[f"{other}_item"](batch["history"])
    regularization = LAMBDA_C / 2 * ((user_rows - their_users).pow(2).sum() + (history_rows - their_items).pow(2).sum())
    return nll + regularization


def bytes_sent(tables: dict) -> int:
    return sum(table.comm.bytes_sent for table in tables.values())


def train_rank(rank: int, world: int, args, out: Path) -> dict:
    log = print if rank == 0 else (lambda *a, **k: None)
    overhead_kib = peak_rss_kib()
    started = time.perf_counter()
    tables = {name: ShardedIDTable(name, args.users if name.endswith("_user") else args.items, args.dim, INIT_STD,
                                   args.seed) for name in TABLES}
    created_kib = peak_rss_kib()
    log(f"  W={world}: tables created in {time.perf_counter() - started:.1f} s", flush=True)
    optimizer = ShardAdam(tables, lr=LEARNING_RATE)
    steps = []
    for step in range(args.steps):
        model = "collab" if step % 2 == 0 else "content"
        batch = local_part(global_batch(args.seed, step, args.users, args.items), rank, world)
        dist.barrier()  # every rank starts the step together, so its time is the step's, not a wait
        sent_before, started = bytes_sent(tables), time.perf_counter()
        # Per document of this rank, as the trainer's losses are: ShardAdam averages over the ranks,
        # so the update is the same on any number of ranks.
        loss = step_loss(tables, model, batch) / (DOCS_PER_STEP // world)
        loss.backward()
        optimizer.active_model = model
        optimizer.step()
        seconds = time.perf_counter() - started
        sent = bytes_sent(tables) - sent_before
        global_loss = loss.detach().clone() / world
        dist.all_reduce(global_loss)  # outside the tables' counters
        steps.append({"model": model, "seconds": seconds, "bytes": sent, "loss": float(global_loss)})
        log(f"  W={world}: step {step} ({model}) loss {float(global_loss):.6f}, {seconds:.2f} s on rank 0",
            flush=True)
    peak_kib = peak_rss_kib()  # before saving: the run's own peak
    for name, table in tables.items():
        torch.save({"start": table.start, "end": table.end, "shard": table.shard.detach()},
                   shard_path(out, world, name, rank))
    return {"rank": rank, "overhead_kib": overhead_kib, "created_kib": created_kib, "peak_kib": peak_kib,
            "steps": steps}


def shard_path(out: Path, world: int, name: str, rank: int) -> Path:
    return out / f"world{world}" / f"{name}.rank{rank}.pt"


def run_world(world: int, args, out: Path) -> list[dict]:
    """train_rank on `world` forked gloo ranks; each rank's report, by rank."""
    (out / f"world{world}").mkdir(parents=True, exist_ok=True)
    try:
        return run_gloo_ranks(world, train_rank, args, out)
    except RuntimeError as error:
        raise SystemExit(f"W={world}: {error}")


# ------------------------------------------------------------------ reports and checks


def training_state_bytes(args) -> int:
    return STATE_COPIES * 4 * args.dim * 2 * (args.users + args.items)  # two user and two item tables, fp32


def print_run(world: int, reports: list[dict]) -> None:
    print(f"\n### W={world}\n")
    print("| rank | RSS before tables (overhead) | peak RSS after table creation | peak RSS at end |")
    print("|---:|---:|---:|---:|")
    for report in reports:
        print(f"| {report['rank']} | {report['overhead_kib'] / 2**20:.2f} GiB "
              f"| {report['created_kib'] / 2**20:.2f} GiB | {report['peak_kib'] / 2**20:.2f} GiB |")
    print()
    ranks = range(world)
    print("| step | model | loss per document | " + " | ".join(f"rank {r} s" for r in ranks) + " | "
          + " | ".join(f"rank {r} bytes sent" for r in ranks) + " |")
    print("|---:|---|---:|" + "---:|" * (2 * world))
    for step, record in enumerate(reports[0]["steps"]):
        times = " | ".join(f"{r['steps'][step]['seconds']:.2f}" for r in reports)
        sent = " | ".join(f"{r['steps'][step]['bytes']:,}" for r in reports)
        print(f"| {step} | {record['model']} | {record['loss']:.6f} | {times} | {sent} |")
    print("\nThe first collab and the first content step include Adam's first touch of its two moments per "
          "shard. Bytes sent: what the rank handed to the tables' collectives (all-to-all: rows leaving the rank; "
          "all-gather, all-reduce: the rank's buffer once, which is the wire traffic at W=2).")


def check_memory(world: int, reports: list[dict], args) -> bool:
    state = training_state_bytes(args)
    share = state / world
    print(f"\n(a) memory, W={world}: the four tables' training state {state / GIB:.2f} GiB "
          f"({STATE_COPIES} x rows x dim x 4 bytes per table), / {world} rank(s) = {share / GIB:.2f} GiB per rank; "
          f"allowed per rank: its overhead (RSS before any table) + {RSS_SLACK_GIB:.1f} GiB + {share / GIB:.2f} GiB")
    passed = True
    for report in reports:
        limit = report["overhead_kib"] * 1024 + RSS_SLACK_GIB * GIB + share
        ok = report["peak_kib"] * 1024 <= limit
        passed &= ok
        print(f"    rank {report['rank']}: overhead {report['overhead_kib'] / 2**20:.2f} GiB + {RSS_SLACK_GIB:.1f} GiB "
              f"+ {share / GIB:.2f} GiB = {limit / GIB:.2f} GiB allowed; peak {report['peak_kib'] / 2**20:.2f} GiB "
              f"-> {'PASS' if ok else 'FAIL'}")
    return passed


def pieces(out: Path, world: int, name: str) -> list[dict]:
    """A table's shards as saved by the ranks, memory-mapped (not read into memory)."""
    return [torch.load(shard_path(out, world, name, r), mmap=True, weights_only=True) for r in range(world)]


def compare_table(out: Path, world: int, reference_world: int, name: str, num_rows: int) -> tuple[float, bool]:
    """(max |difference|, bit-equal) between a table's rows on `world` ranks and on `reference_world`."""
    mine, theirs = pieces(out, world, name), pieces(out, reference_world, name)
    for saved in (mine, theirs):
        assert sum(p["end"] - p["start"] for p in saved) == num_rows, f"{name}: the shards do not cover the table"
    largest, equal = 0.0, True
    for piece in mine:
        for ref in theirs:
            lo, hi = max(piece["start"], ref["start"]), min(piece["end"], ref["end"])
            for first in range(lo, hi, COMPARE_ROWS):
                last = min(first + COMPARE_ROWS, hi)
                a = piece["shard"][first - piece["start"]:last - piece["start"]]
                b = ref["shard"][first - ref["start"]:last - ref["start"]]
                if not torch.equal(a, b):
                    equal = False
                    largest = max(largest, float((a - b).abs().max()))
    return largest, equal


def check_same_tables(out: Path, world: int, reference_world: int, args) -> bool:
    print(f"\n(b) same seed, same tables: W={world} against W={reference_world}, after {args.steps} steps "
          f"(tolerance {TOLERANCE:g})")
    passed = True
    for name in TABLES:  # one table at a time: the parent never holds more than a few row blocks
        num_rows = args.users if name.endswith("_user") else args.items
        largest, equal = compare_table(out, world, reference_world, name, num_rows)
        ok = largest <= TOLERANCE
        passed &= ok
        print(f"    {name}: {'bit-equal' if equal else 'not bit-equal'}, max |difference| {largest:.3g} "
              f"-> {'PASS' if ok else 'FAIL'}")
    return passed


# ------------------------------------------------------------------ the memory model (arithmetic only)

MODEL_DIM = 4096
MODEL_USERS = 10_000_000
MODEL_ITEMS = 1_000_000
MODEL_WORLDS = (8, 64)
DOCS_PER_RANK = 32  # per rank and step, at every world size (the global batch grows with the ranks)
ITEMS_PER_DOC = 100  # item tokens per document: each is looked up and scored by the item head
COMPUTE_BYTES = 2  # bf16: what ZeRO-3 gathers and reduces in
FP32 = 4
# Table calls of one collab step (model/cllm4rec.py): the input lookups of collab_user and
# collab_item, the mutual regularization's lookups of all four tables (the content ones without
# gradient) and the item head on collab_item. Under ZeRO-3 each call gathers its table in forward
# and, where it has a gradient, again in backward: collab_user 2 + 2, collab_item 3 + 3,
# content_user 1, content_item 1 = 12 gathers.
USER_TABLE_GATHERS, ITEM_TABLE_GATHERS = 5, 7
# The same calls on sharded tables move rows instead: per kind (user, item) two lookups with
# gradient (rows out, gradients back) and one without = 5 transfers of the step's ids' rows.
ROW_TRANSFERS = 5
# The sharded head's four matrix products per position and item row: scores, the scores again in
# backward (not kept), the hidden states' gradient and the shard's gradient. ZeRO-3's dense head
# keeps its scores: forward, then the two gradients.
SHARDED_HEAD_PRODUCTS, DENSE_HEAD_PRODUCTS = 4, 3


def memory_model() -> None:
    d, users, items = MODEL_DIM, MODEL_USERS, MODEL_ITEMS
    positions = DOCS_PER_RANK * ITEMS_PER_DOC  # P: per rank, scored by the item head
    ids = DOCS_PER_RANK + positions  # distinct ids per rank and step, at most (all assumed distinct)
    state = 16 * 2 * (users + items) * d  # four tables, weight + gradient + 2 Adam moments in fp32
    score_block = sharded_tables.LOGIT_ELEMENTS * FP32

    def remote(world: int) -> float:  # the share of a collective's buffer that leaves (or reaches) a rank
        return (world - 1) / world

    # (label, formula, ZeRO-3 per rank as a function of W, sharded per rank); None: no such cost
    memory = [
        ("persistent state (weights, grads, Adam)", "16 B x 2(U + I) x d / W",
         lambda w: state / w, lambda w: state / w),
        ("whole table gathered (the user table)", "U x d x 2 B", lambda w: users * d * COMPUTE_BYTES, None),
        ("its full-size dense gradient", "U x d x 2 B", lambda w: users * d * COMPUTE_BYTES, None),
        ("item-head scores + log-probs, fp32",
         f"dense: 2 x P x I x 4 B; sharded: 2 x {sharded_tables.LOGIT_ELEMENTS:,} x 4 B",
         lambda w: 2 * positions * items * FP32, lambda w: 2 * score_block),
        ("head: all ranks' hidden states + their grads", "2 x W x P x d x 4 B", None,
         lambda w: 2 * w * positions * d * FP32),
    ]
    traffic = [
        ("table all-gathers (12 per collab step)", "(5U + 7I) x d x 2 B x (W-1)/W",
         lambda w: (USER_TABLE_GATHERS * users + ITEM_TABLE_GATHERS * items) * d * COMPUTE_BYTES * remote(w), None),
        ("gradient reduce-scatter (collab_user, collab_item)", "(U + I) x d x 2 B x (W-1)/W",
         lambda w: (users + items) * d * COMPUTE_BYTES * remote(w), None),
        ("lookups: all-to-all of ids and rows / row grads", "5 x ids x (d x 4 + 8) B x (W-1)/W", None,
         lambda w: ROW_TRANSFERS * ids * (d * FP32 + 8) * remote(w)),
        ("head: all-gather of hidden states", "(W-1) x P x d x 4 B", None, lambda w: (w - 1) * positions * d * FP32),
        ("head: all-reduce of max, sum, target logit", "3 x W x P x 4 B x 2(W-1)/W", None,
         lambda w: 3 * w * positions * FP32 * 2 * remote(w)),
        ("head: reduce-scatter of hidden-state grads (all-to-all)", "(W-1) x P x d x 4 B", None,
         lambda w: (w - 1) * positions * d * FP32),
    ]
    compute = [
        ("positions scored per rank", "dense: P; sharded: W x P", lambda w: positions, lambda w: w * positions),
        ("GFLOP per position scored", "dense: 3 x 2 x I x d; sharded: 4 x 2 x (I/W) x d",
         lambda w: DENSE_HEAD_PRODUCTS * 2 * items * d / 1e9,
         lambda w: SHARDED_HEAD_PRODUCTS * 2 * items / w * d / 1e9),
        ("TFLOP per rank per step", "dense: 6 x P x I x d; sharded: 8 x P x I x d",
         lambda w: positions * DENSE_HEAD_PRODUCTS * 2 * items * d / 1e12,
         lambda w: w * positions * SHARDED_HEAD_PRODUCTS * 2 * items / w * d / 1e12),
    ]

    def number(value: float) -> str:
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"

    def line(label: str, formula: str, cells: list[str]) -> None:
        print(f"| {label} | {formula} | " + " | ".join(cells) + " |")

    def section(title: str, rows: list, scale: float, total: bool) -> None:
        line(f"**{title}**", "", [""] * (2 * len(MODEL_WORLDS)))
        for label, formula, zero, sharded in rows:
            line(label, formula, [cell for w in MODEL_WORLDS for cell in
                                  ("—" if zero is None else number(zero(w) / scale),
                                   "—" if sharded is None else number(sharded(w) / scale))])
        if total:
            line(f"**{title}: total**", "", [f"**{number(sum(fn(w) for fn in column if fn) / scale)}**"
                                              for w in MODEL_WORLDS
                                              for column in ([r[2] for r in rows], [r[3] for r in rows])])

    print(f"\n## Memory model: d={d}, {users:,} users (U) + {items:,} items (I), four tables (collab/content x "
          f"user/item), fp32 weights with Adam (16 B per element)\n")
    print(f"Batch per rank and step: {DOCS_PER_RANK} docs x {ITEMS_PER_DOC} item tokens = P = {positions:,} "
          f"positions scored by the item head and {ids:,} ids looked up (1 user + {ITEMS_PER_DOC} items per doc, "
          f"all assumed distinct); the global batch is W times that. A collab step: lookups of collab_user and "
          f"collab_item, the mutual regularization's lookups of all four tables, the item head on collab_item. ZeRO-3 gathers "
          f"and reduces in bf16 (2 B); the sharded tables move fp32. Traffic: bytes per rank per step, each "
          f"direction. GB = 1e9 bytes.\n")
    line("quantity", "formula", [f"{design} W={w}" for w in MODEL_WORLDS for design in ("ZeRO-3", "sharded")])
    print("|---|---|" + "---:|" * (2 * len(MODEL_WORLDS)))
    section("memory per rank (GB)", memory, 1e9, total=True)
    section("traffic per rank per step (GB)", traffic, 1e9, total=True)
    section("item head, per rank per step", compute, 1, total=False)


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000_000, help="rows of collab_user and content_user")
    ap.add_argument("--items", type=int, default=10_000_000, help="rows of collab_item and content_item")
    ap.add_argument("--dim", type=int, default=16, help="numbers per row")
    ap.add_argument("--steps", type=int, default=3, help="training steps, collab and content in turn")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tables' values and of the batches")
    ap.add_argument("--world", default="2,1",
                    help="comma-separated numbers of ranks, run one after the other in this order; the final "
                         "tables of each are compared with those of the smallest")
    ap.add_argument("--skip-train", action="store_true", help="print only the memory model")
    ap.add_argument("--out", help="folder for the ranks' final shards, kept afterwards "
                                  "(default: a temporary folder, removed at the end)")
    args = ap.parse_args()

    passed = True
    if not args.skip_train:
        worlds = [int(w) for w in args.world.split(",")]
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="id_scale_"))
        print(f"## Training: {args.users:,} users and {args.items:,} items x {args.dim} dims, 4 tables, "
              f"{args.steps} steps of {DOCS_PER_STEP} documents ({HISTORY_ITEMS} history items, {TARGET_ITEMS} "
              f"target items each), seed {args.seed}; one thread per rank, gloo")
        try:
            reports = {}
            for world in worlds:  # one after the other: never two runs' tables in memory at once
                print(f"\nW={world}: training ...", flush=True)
                reports[world] = run_world(world, args, out)
            for world in worlds:
                print_run(world, reports[world])
            for world in worlds:
                passed &= check_memory(world, reports[world], args)
            reference = min(worlds)
            for world in worlds:
                if world != reference:
                    passed &= check_same_tables(out, world, reference, args)
            print(f"\nall checks: {'PASS' if passed else 'FAIL'}")
        finally:
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
    memory_model()
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
