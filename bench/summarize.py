"""Print a run's metrics and each stage's wall time and peak RSS per rank."""
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
metrics = json.loads((run / "metrics.json").read_text())
for split in ("val", "test"):
    if split in metrics:
        m = metrics[split]
        print(f"CLLM4Rec {split}: Recall@20 {m['recall@20']:.4f}  Recall@40 {m['recall@40']:.4f}  "
              f"NDCG@100 {m['ndcg@100']:.4f}  ({m['users']} users)")
for stage in ("pretrain", "finetune", "evaluate"):
    path = run / stage / "resources.json"
    if path.is_file():
        r = json.loads(path.read_text())
        print(f"{stage:>9}: {r['wall_s']:8.1f} s wall   peak RSS per rank (MB): {r['peak_rss_mb_per_rank']}")
