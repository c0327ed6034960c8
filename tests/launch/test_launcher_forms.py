"""The design card's command: `deepspeed --no_python [runner options] launch/pretrain.sh CONFIG ...`
runs each rank through the launch script and trains exactly as `bash launch/pretrain.sh CONFIG
...`; without --no_python DeepSpeed hands the script to Python, which says what to type."""
import json
import subprocess

import pytest

from tests.conftest import REPO
from tests.helpers import launcher_env, toy_run_inputs
from trainer.distributed import free_port

pytestmark = pytest.mark.slow


def test_deepspeed_no_python_form_equals_the_usual_form(tmp_path):
    _, base = toy_run_inputs(tmp_path)

    def overrides(run):
        return [f"model.base_dir={base}", f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / run}",
                "pretrain.max_steps_per_epoch=3", "pretrain.rounds=1", "run.log_every=1000"]

    env = launcher_env(NPROC="2")
    usual = subprocess.run(["bash", "launch/pretrain.sh", "configs/quickstart.yaml", *overrides("usual")], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert usual.returncode == 0, usual.stderr[-3000:]
    runner = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    card = subprocess.run([*runner, "--no_python", "launch/pretrain.sh", "configs/quickstart.yaml",
                           *overrides("card")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert card.returncode == 0, card.stderr[-3000:]

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "pretrain" / "train_log.jsonl").read_text()
                                       .splitlines())]

    assert len(losses("card")) == 9 and losses("card") == losses("usual")
    wrong = subprocess.run([*runner, "launch/pretrain.sh", "configs/quickstart.yaml", *overrides("wrong")], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "SyntaxError" not in wrong.stderr
    assert "under the deepspeed launcher add --no_python" in wrong.stderr, wrong.stderr[-2000:]
