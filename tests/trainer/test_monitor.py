"""DeepSpeed's own monitor (here its CSV writer, which needs no extra package; TensorBoard and
W&B take the same events) receives each step's loss per task and finetuning's validation
metrics, and bench/summarize.py draws a run's curves."""
import csv
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

from tests.conftest import REPO
from tests.helpers import launcher_env, toy_run_inputs


def test_monitor_events_and_plots(tmp_path):
    shards, base = toy_run_inputs(tmp_path)
    ds = json.loads((REPO / "configs" / "ds_zero3.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "run"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    overrides = [f"model.base_dir={base}", f"data.shards={shards}", f"run.dir={tmp_path / 'run'}",
                 f"run.deepspeed={tmp_path / 'ds.json'}", "pretrain.content_warmup_epochs=0", "pretrain.rounds=1",
                 "pretrain.max_steps_per_epoch=3", "finetune.epochs=2", "finetune.max_steps_per_epoch=3",
                 "finetune.content_epochs=true", "evaluate.baselines=false", "data.num_workers=0"]
    for stage in ("pretrain", "finetune", "evaluate"):  # a process each, as the launcher runs them
        subprocess.run([sys.executable, "-m", "trainer.cli", stage, "--config", str(REPO / "configs" / "quickstart.yaml"),
                        *overrides], cwd=REPO, env=launcher_env(), check=True, capture_output=True)
    events = tmp_path / "monitor" / "run"

    def rows(name):
        with open(events / f"{name}.csv") as f:
            return [row for row in csv.reader(f) if row[0] != "step"]  # a header per process

    assert len(rows("Train_collab_loss")) == 3 and len(rows("Train_content_loss")) == 3 + 2 * 3
    assert len(rows("Train_rec_loss")) == 2 * 3
    history = json.loads((tmp_path / "run" / "finetune" / "selection.json").read_text())["history"]
    assert [float(v) for _, v in rows("Val_recall@20")] == pytest.approx([h["recall@20"] for h in history])
    pytest.importorskip("matplotlib")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "summarize.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, check=True)
    assert "CLLM4Rec test: Recall@20" in done.stdout
    for png in ("loss.png", "val_recall.png"):
        assert (tmp_path / "run" / "plots" / png).read_bytes()[:4] == b"\x89PNG", png
