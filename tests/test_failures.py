"""Failures end the run: every rank and every DataLoader worker exits, with a non-zero status,
within seconds (under Slurm a hung rank would hold its nodes until the wall-time limit)."""
import subprocess
import sys
import time

import pytest

from data_shards.build import main_build
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.conftest import REPO
from tests.helpers import launcher_env, write_tiny_checkpoint

pytestmark = pytest.mark.slow


def _break_a_document(shard):
    """Same size, tar headers intact (only a checksum would see it): one document is no longer JSON."""
    data = bytearray(shard.read_bytes())
    at = data.index(b'"text"', len(data) // 2)
    data[at] = ord("{")
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_document_a_worker_cannot_read_ends_every_process(tmp_path, ranks):
    data = write_synthetic_cllm4rec(tmp_path / "data", num_users=40, num_items=30, seed=1)
    main_build(data, tmp_path / "shards", docs_per_shard=40)
    base = write_tiny_checkpoint(tmp_path / "tiny")
    _break_a_document(sorted((tmp_path / "shards" / "content").glob("*.tar"))[0])
    overrides = [f"model.base_dir={base}", f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}",
                 "data.checksums=false", "data.num_workers=1", "pretrain.rounds=0"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "trainer.cli", "pretrain", "--config", "configs/quickstart.yaml", *overrides]
    else:
        cmd = ["bash", "launch/pretrain.sh", "configs/quickstart.yaml", *overrides]
    started = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=launcher_env(NPROC=str(ranks)), capture_output=True, text=True,
                          timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "is not JSON" in out, out[-3000:]
    assert time.time() - started < 150
    time.sleep(6)  # a worker notices within a few seconds that its rank is gone
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "shards")], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes still running: {left}"
