"""What each part of CLLM4Rec is worth: a grid of variants, each one switch away from the
default, every one trained on the same schedule over several seeds, beside popularity and EASE.

    python bench/ablation.py --split mini                         # the whole grid, seeds 0,1,2
    python bench/ablation.py --split mini --variants tiny-random,paper-mode --seeds 0
    python bench/ablation.py --split mini --report                # tables from the finished runs only
    python bench/ablation.py --split subset651                    # the second, larger real split
    NPROC=1 python bench/ablation.py --split full                 # on a GPU, bf16 (docs/benchmarks.md)

Every (variant, seed) runs pretrain -> finetune -> evaluate through launch/*.sh on 2 ranks in
<out>/<variant>/seed-<s>. The grid is resumable: a finished run (result.json) is kept, a
finished stage is not run again, and a stage that was interrupted continues from its newest
checkpoint (`--resume auto`). So the grid can be completed over several sittings.

Writes <out>/ablation.md, <out>/ablation.csv and <out>/ablation.png (test metrics, mean ± std
over the seeds as error bars). Validation selects the finetuning epoch inside every run; the
test split is read once per run, by its evaluate stage, and is never used to choose anything.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEAUTY = REPO.parent / "shared" / "data" / "amazon_beauty_cllm4rec"
METRICS = ("recall@20", "recall@40", "ndcg@100")

# split -> (the config every variant of it shares, the schedule's overrides of that config,
# CLLM4Rec-format data folder, build-shards text options)
SPLITS = {
    "mini": ("configs/smollm2_mini.yaml", [], BEAUTY / "mini", []),
    # 651 users, 1,000 items: item texts for every item, reviews for 88 of the users, keyed to the
    # full split's ids and re-keyed through the subset's id_map.json. Its finetuning epochs are 41
    # steps, not mini's 6, so 2 of them keep a SmolLM2 run near a quarter of an hour.
    "subset651": ("configs/smollm2_mini.yaml", ["finetune.epochs=2"],
                  BEAUTY / "derived" / "subset_651u_1000i_aligned",
                  ["--texts-original-ids", str(BEAUTY / "derived")]),
    # The paper's full split, for a GPU (bf16, one GPU per run; docs/benchmarks.md has the estimate).
    "full": ("configs/smollm2_beauty_gpu.yaml", [], BEAUTY / "full", ["--texts", str(BEAUTY / "derived")]),
}

# variant -> (what it changes, base, config overrides); "default" is the reference row.
VARIANTS = {
    "default": ("SmolLM2-135M pretrained, LoRA r=8, content model, mutual regularization, held-out target",
                "smollm2", []),
    "random-smollm2": ("the same architecture and tokenizer with random weights", "smollm2-random", []),
    "tiny-random": ("the quick start's tiny random LLaMA (2 layers, 64 dims, Llama-2 tokenizer)", "tiny", []),
    "no-content": ("no content model: collaborative and rec stages only", "smollm2", ["model.content=false"]),
    "no-mutual-reg": ("mutual regularization off (lambda_c = 0)", "smollm2", ["loss.lambda_c=0"]),
    "paper-mode": ("LoRA off, only the ID tables train (lora.r = 0)", "smollm2", ["lora.r=0"]),
    "all-train-target": ("finetune target: all train items (the reference code)", "smollm2",
                         ["finetune.target=all_train"]),
    "ease-fusion": ("beyond the paper: the default's ranking fused with EASE's, weight chosen on val",
                    "smollm2", ["evaluate.ease_fusion=true"]),
    "ensemble": ("beyond the paper: the default's ranking fused with that of the default run of the next seed",
                 "smollm2", []),
}
# variant -> (the variant whose trained model it evaluates, the metrics.json entry it reports, how
# many more of that variant's runs (the next seeds, cyclically) join as evaluate.ensemble members):
# only its evaluate stage runs, and its wall time adds that of all the trained models' stages
EVALUATION_ONLY = {"ease-fusion": ("default", "ease_fusion", 0), "ensemble": ("default", "ensemble", 1)}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, check=True)


def prepare_bases(out: Path, needed: set[str]) -> dict[str, Path]:
    """The bases the chosen variants need, made once under <out>/bases."""
    from trainer.get_base import default_cache, get_base

    bases = {}
    smollm2, _ = get_base("smollm2-135m", default_cache() / "bases" / "smollm2-135m")
    bases["smollm2"] = smollm2
    if "smollm2-random" in needed:
        bases["smollm2-random"] = out / "bases" / "smollm2-random"
        if not (bases["smollm2-random"] / "config.json").is_file():
            cli("randomize-base", "--from", str(smollm2), "--output", str(bases["smollm2-random"]), "--seed", "0")
    if "tiny" in needed:
        bases["tiny"] = out / "bases" / "tiny"
        if not (bases["tiny"] / "config.json").is_file():
            cli("make-tiny-model", "--output", str(bases["tiny"]), "--tokenizer", "llama2",
                "--tokenizers-dir", str(REPO.parent / "shared" / "tokenizers"))
    return bases


def prepare_shards(split: str) -> Path:
    _, _, data, texts = SPLITS[split]
    if not data.is_dir():
        raise SystemExit(f"bench/ablation.py: {data} not found (the shared data folder beside the repository)")
    shards = REPO / "runs" / f"shards-{split}"
    if not (shards / "index.json").is_file():
        cli("build-shards", "--input", str(data), *texts, "--output", str(shards), "--overwrite")
    return shards


def run_one(config: str, run_dir: Path, overrides: list[str], trained_in: Path | None = None,
            reported: str = "", members: tuple[Path, ...] = ()) -> dict:
    """pretrain -> finetune -> evaluate of one (variant, seed); finished stages are skipped and an
    interrupted one continues from its checkpoint. With `trained_in`, only evaluate runs, on the
    model trained there, with the models trained in `members` as its ensemble. `reported`: the
    metrics.json entry to report (default: the model's)."""
    trained = trained_in or run_dir
    done_marker = {"pretrain": trained / "pretrain" / "resources.json",
                   "finetune": trained / "finetune" / "resources.json",
                   "evaluate": run_dir / "evaluate" / "resources.json"}
    trained_stages = [run / stage / "resources.json" for run in members for stage in ("pretrain", "finetune")]
    if trained_in is not None:
        for run in (trained_in, *members):
            if not (run / "finetune" / "resources.json").is_file():
                raise SystemExit(f"bench/ablation.py: {run_dir} evaluates the model trained in {run}, "
                                 "which is not finished; run that variant first")
        overrides = [*overrides, f"evaluate.checkpoint={trained_in / 'finetune'}"]
        if members:
            overrides.append(f"evaluate.ensemble=[{','.join(str(run / 'finetune') for run in members)}]")
    env = dict(os.environ, NPROC=os.environ.get("NPROC", "2"))
    for stage, marker in done_marker.items():
        if marker.is_file():
            continue
        resume = ["--resume", "auto"] if stage != "evaluate" else []
        log_file = run_dir / f"{stage}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            done = subprocess.run(["bash", f"launch/{stage}.sh", config, *overrides, *resume], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"bench/ablation.py: {stage} of {run_dir} failed (exit {done.returncode}); see {log_file}. "
                             "Run the same command again to continue where it stopped.")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if reported:
        metrics = metrics[reported]
    wall = sum(json.loads(marker.read_text())["wall_s"] for marker in [*done_marker.values(), *trained_stages])
    return {"val": metrics["val"], "test": metrics["test"], "wall_s": round(wall, 1)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: mean and std over its seeds of every metric, and of the wall time."""
    rows = []
    for variant, runs in results.items():
        row = {"variant": variant, "seeds": len(runs)}
        for split in ("val", "test"):
            for metric in METRICS:
                row[f"{split} {metric}"] = mean_std([r[split][metric] for r in runs])
        row["wall_s"] = mean_std([r["wall_s"] for r in runs])
        rows.append(row)
    return rows


def write_report(out: Path, split: str, rows: list[dict], baselines: dict) -> None:
    columns = [f"{s} {m}" for s in ("val", "test") for m in METRICS]
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seeds", *[f"{c} {part}" for c in columns for part in ("mean", "std")],
                         "wall_s mean", "wall_s std"])
        for row in rows:
            writer.writerow([row["variant"], row["seeds"], *[f"{v:.4f}" for c in columns for v in row[c]],
                             *[f"{v:.1f}" for v in row["wall_s"]]])
        for name, result in baselines.items():
            writer.writerow([name, 0, *[f"{v:.4f}" for c in columns
                                        for v in (result[c.split()[0]][c.split()[1]], 0.0)], "", ""])
    config, schedule, _, _ = SPLITS[split]
    lines = [f"Ablation on `{split}` ({' '.join([config, *schedule])}), mean ± std over seeds; wall time per run.", "",
             "| variant | what changes | seeds | " + " | ".join(columns) + " | wall time |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for row in rows:
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in (row[c] for c in columns))
        lines.append(f"| {row['variant']} | {VARIANTS[row['variant']][0]} | {row['seeds']} | {cells} | "
                     f"{row['wall_s'][0]:.0f} ± {row['wall_s'][1]:.0f} s |")
    for name, result in baselines.items():
        cells = " | ".join(f"{result[c.split()[0]][c.split()[1]]:.4f}" for c in columns)
        lines.append(f"| {name} | (baseline, deterministic) | - | {cells} | |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out / "ablation.png", split, rows, baselines)


def _plot(path: Path, split: str, rows: list[dict], baselines: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * (len(rows) + len(baselines))), 4.5))
    names = [r["variant"] for r in rows] + list(baselines)
    width = 0.8 / len(METRICS)
    for k, metric in enumerate(METRICS):
        means = [r[f"test {metric}"][0] for r in rows] + [b["test"][metric] for b in baselines.values()]
        stds = [r[f"test {metric}"][1] for r in rows] + [0.0] * len(baselines)
        ax.bar([i + (k - 1) * width for i in range(len(names))], means, width, yerr=stds, capsize=3, label=metric)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("test metric (mean ± std over seeds)")
    ax.set_title(f"CLLM4Rec ablation on {split}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--split", default="mini", choices=sorted(SPLITS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="", help="default runs/ablation-<split>")
    ap.add_argument("--report", action="store_true", help="only write the tables from the finished runs")
    ap.add_argument("overrides", nargs="*", help="key.sub=value applied to every run (e.g. a shorter schedule)")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench/ablation.py: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        import matplotlib  # noqa: F401  (checked before hours of training, not after)
    except ImportError:
        raise SystemExit("bench/ablation.py draws its chart with matplotlib: pip install -e '.[bench]'") from None
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out or REPO / "runs" / f"ablation-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    config, schedule, _, _ = SPLITS[args.split]
    shards = prepare_shards(args.split)

    results: dict[str, list[dict]] = {}
    if not args.report:
        bases = prepare_bases(out, {VARIANTS[v][1] for v in variants})
    for variant in variants:
        _, base, switches = VARIANTS[variant]
        for seed in seeds:
            run_dir = out / variant / f"seed-{seed}"
            result_file = run_dir / "result.json"
            if not result_file.is_file():
                if args.report:
                    continue
                started = time.time()
                print(f"[ablation] {variant} seed {seed}: running in {run_dir}", flush=True)
                overrides = [f"model.base_dir={bases[base]}", f"data.shards={shards}", f"run.dir={run_dir}",
                             f"run.seed={seed}", *schedule, *switches, *args.overrides]
                trained_variant, reported, extra = EVALUATION_ONLY.get(variant, (None, "", 0))
                trained_in = out / trained_variant / f"seed-{seed}" if trained_variant else None
                at = seeds.index(seed)
                members = tuple(out / trained_variant / f"seed-{seeds[(at + j) % len(seeds)]}" for j in range(1, extra + 1))
                if len(set(members) | {trained_in}) < extra + 1:
                    raise SystemExit(f"bench/ablation.py: {variant} needs {extra + 1} seeds in --seeds")
                result = {"variant": variant, "seed": seed, "overrides": overrides,
                          **run_one(config, run_dir, overrides, trained_in, reported, members)}
                result_file.write_text(json.dumps(result, indent=2))
                print(f"[ablation] {variant} seed {seed}: test recall@20 {result['test']['recall@20']:.4f} "
                      f"({time.time() - started:.0f} s)", flush=True)
            results.setdefault(variant, []).append(json.loads(result_file.read_text()))
    if not results:
        raise SystemExit(f"bench/ablation.py: no finished runs under {out}")
    from data_shards.reader import load_split
    from trainer.baselines import run_baselines

    baselines = run_baselines(*(load_split(shards, s) for s in ("train", "val", "test")))
    write_report(out, args.split, summarize(results),
                 {"popularity": baselines["popularity"], f"EASE (lambda={baselines['ease']['lambda']})":
                  baselines["ease"]})


if __name__ == "__main__":
    main()
