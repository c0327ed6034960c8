"""Print a run's metrics and each stage's wall time and peak RSS per rank, and draw its curves.

    python bench/summarize.py RUN_DIR

Writes RUN_DIR/plots/ (needs matplotlib: pip install -e ".[bench]"):
    loss.png        the loss of every step, one panel per stage, one line per task
    val_recall.png  validation Recall@20 after each finetuning epoch
    metrics.png     the test metrics of CLLM4Rec beside popularity and EASE from the same run
"""
import json
import sys
from pathlib import Path

from trainer.baselines import model_rows

METRICS = ("recall@20", "recall@40", "ndcg@100")


def member_runs(metrics: dict) -> list[Path]:
    """The run folders of the ensemble's other members (each member is a finetune folder)."""
    return [Path(m).parent for m in metrics.get("ensemble", {}).get("members", [])[1:]]


def print_summary(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    rows = model_rows(metrics)
    for name, row in rows.items():
        for split in ("val", "test"):
            if split in row:
                m = row[split]
                print(f"{name} {split}: Recall@20 {m['recall@20']:.4f}  Recall@40 {m['recall@40']:.4f}  "
                      f"NDCG@100 {m['ndcg@100']:.4f}  ({m['users']} users)")
    members = member_runs(metrics)
    stages = [(run, stage) for stage in ("pretrain", "finetune")] + \
        [(member, stage) for member in members for stage in ("pretrain", "finetune")] + [(run, "evaluate")]
    for folder, stage in stages:
        path = folder / stage / "resources.json"
        if path.is_file():
            r = json.loads(path.read_text())
            name = stage if folder == run else f"{folder.name} {stage}"
            print(f"{name:>16}: {r['wall_s']:8.1f} s wall   peak RSS per rank (MB): {r['peak_rss_mb_per_rank']}")
    return metrics


def plot(run: Path, metrics: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []
    stages = [s for s in ("pretrain", "finetune") if (run / s / "train_log.jsonl").is_file()]
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            records = [json.loads(line) for line in (run / stage / "train_log.jsonl").read_text().splitlines()]
            for task in sorted({r["task"] for r in records}):
                steps = [(r["step"], r["loss"]) for r in records if r["task"] == task]
                ax.plot(*zip(*steps), ".", markersize=2, label=task)
            ax.set(title=f"{stage}: loss per step", xlabel="step", ylabel="loss", yscale="log")
            ax.legend()
        fig.tight_layout()
        written.append(out / "loss.png")
        fig.savefig(written[-1], dpi=120)
    members = member_runs(metrics)
    selections = {"seed-0" if members else "model": run / "finetune" / "selection.json",
                  **{member.name: member / "finetune" / "selection.json" for member in members}}
    if all(path.is_file() for path in selections.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, path in selections.items():
            history = json.loads(path.read_text())["history"]
            ax.plot([h["epoch"] + 1 for h in history], [h["recall@20"] for h in history], "o-", label=name)
        ax.set(title="validation Recall@20 per finetuning epoch", xlabel="epoch", ylabel="Recall@20")
        ax.legend()
        fig.tight_layout()
        written.append(out / "val_recall.png")
        fig.savefig(written[-1], dpi=120)
    rows = {**metrics.get("baselines", {}), **model_rows(metrics)}
    if all("test" in row for row in rows.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(rows)
        for k, (name, row) in enumerate(rows.items()):
            ax.bar([m + k * width for m in range(len(METRICS))], [row["test"][m] for m in METRICS], width,
                   label=name)
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(METRICS))], METRICS)
        ax.set(title="test split", ylabel="value")
        ax.legend()
        fig.tight_layout()
        written.append(out / "metrics.png")
        fig.savefig(written[-1], dpi=120)
    return written


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    summary = print_summary(run_dir)
    try:
        files = plot(run_dir, summary)
    except ImportError:
        print("plots: skipped, matplotlib is not installed (pip install -e \".[bench]\")")
    else:
        print("plots:", ", ".join(str(f) for f in files))
