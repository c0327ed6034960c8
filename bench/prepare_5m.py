"""Benchmark `cllm4rec prepare` on a synthetic 5M-interaction table: wall time and peak RSS.

    python bench/prepare_5m.py [--interactions 5000000] [--review-fraction 0.2] [--keep]

Writes, into a fresh temporary folder (removed afterwards unless --keep):

- ``interactions.csv``: user, item, rating, timestamp. Users and items are drawn with
  power-law popularity (p(rank r) ~ (r + 1)^-alpha), ratings 1-5 skewed to 4/5 like Amazon's;
  string ids (``U0000123``, ``I0000045``), so interning is exercised;
- ``reviews.csv``: user, item, review for a random fraction of the rows (short texts from a
  small vocabulary).

Then runs ``cllm4rec prepare --source table`` on them in a subprocess (so the memory of the
generation does not count) and prints its wall time, its peak RSS (``ru_maxrss`` of the
child), the peak RSS of a child that only imports the modules (Python + numpy + torch via
webdataset: the floor), and the counts from index.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_WORDS = ("great", "sound", "cheap", "works", "string", "tuner", "cable", "quality", "broke", "love", "easy",
          "loud", "quiet", "price", "would", "buy", "again", "guitar", "fits", "solid")


def _power_law(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    p = (np.arange(n) + 1.0) ** -alpha
    return rng.choice(n, size=size, p=p / p.sum())


def generate(folder: Path, interactions: int, users: int, items: int, review_fraction: float, seed: int,
             chunk: int = 500_000) -> tuple[Path, Path | None]:
    """Write the two CSV tables chunk by chunk; return their paths."""
    rng = np.random.default_rng(seed)
    user_perm, item_perm = rng.permutation(users), rng.permutation(items)  # popularity unrelated to id order
    inter_path = folder / "interactions.csv"
    review_path = folder / "reviews.csv" if review_fraction > 0 else None
    with ExitStack() as files:
        fi = files.enter_context(open(inter_path, "w", encoding="utf-8"))
        fi.write("user,item,rating,timestamp\n")
        if review_path:
            fr = files.enter_context(open(review_path, "w", encoding="utf-8"))
            fr.write("user,item,review\n")
        for start in range(0, interactions, chunk):
            n = min(chunk, interactions - start)
            u = user_perm[_power_law(rng, users, 0.7, n)]
            i = item_perm[_power_law(rng, items, 0.9, n)]
            r = rng.choice(5, size=n, p=[0.06, 0.07, 0.12, 0.28, 0.47]) + 1
            t = rng.integers(1_100_000_000, 1_700_000_000, size=n)
            fi.write("".join(f"U{a:07d},I{b:07d},{c},{d}\n"
                             for a, b, c, d in zip(u.tolist(), i.tolist(), r.tolist(), t.tolist())))
            if review_path:
                pick = np.flatnonzero(rng.random(n) < review_fraction)
                lengths = rng.integers(4, 16, size=pick.size)
                words = rng.integers(len(_WORDS), size=int(lengths.sum()))
                texts, k = [], 0
                for m in lengths.tolist():
                    texts.append(" ".join(_WORDS[w] for w in words[k:k + m].tolist()))
                    k += m
                fr.write("".join(f"U{a:07d},I{b:07d},{text}\n"
                                 for a, b, text in zip(u[pick].tolist(), i[pick].tolist(), texts)))
    return inter_path, review_path


def _child_peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` as a child; return (wall seconds, its peak RSS in MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: max over waited children
    if peak <= before:
        print("note: this child's peak RSS did not exceed an earlier child's; the number below is that maximum")
    return wall, peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interactions", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=400_000)
    ap.add_argument("--items", type=int, default=80_000)
    ap.add_argument("--review-fraction", type=float, default=0.2, help="share of rows with a review (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="cllm4rec-prepare-bench-"))
    try:
        t0 = time.perf_counter()
        inter, reviews = generate(folder, args.interactions, args.users, args.items, args.review_fraction, args.seed)
        print(f"generated {args.interactions:,} interactions in {time.perf_counter() - t0:.1f} s: "
              f"{inter.stat().st_size / 1e6:.0f} MB" + (f", reviews {reviews.stat().st_size / 1e6:.0f} MB"
                                                        if reviews else ""), flush=True)
        # The floor first (imports only), so the prepare child's ru_maxrss is its own if it is higher.
        _, floor_mb = _child_peak_rss_mb([sys.executable, "-c", "import data_shards.prepare, webdataset"])
        out = folder / "shards"
        argv = [sys.executable, "-m", "trainer.cli", "prepare", "--source", "table", "--input", str(inter),
                "--output", str(out)]
        if reviews:
            argv += ["--reviews", str(reviews)]
        wall, peak_mb = _child_peak_rss_mb(argv)
        index = json.loads((out / "index.json").read_text())
        counts = index["preprocessing"]["counts"]
        print(f"prepare: {wall:.1f} s wall, peak RSS {peak_mb:.0f} MB (imports alone: {floor_mb:.0f} MB)")
        print(f"  rows {counts['rows_read']:,} -> rating filter {counts['after_rating_filter']:,} -> dedupe "
              f"{counts['after_dedupe']['interactions']:,} -> 5-core {counts['after_kcore']['interactions']:,} "
              f"({len(counts['kcore_passes'])} passes)")
        print(f"  {index['num_users']:,} users, {index['num_items']:,} items, splits {index['splits']}, "
              f"documents { {k: s['num_docs'] for k, s in index['streams'].items()} }")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
