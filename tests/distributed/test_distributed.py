"""Multi-rank behaviour that a single process cannot show."""
import subprocess

import pytest

from data_shards.build import main_build
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.conftest import REPO
from tests.helpers import launcher_env, write_tiny_checkpoint
from trainer.distributed import free_port

pytestmark = pytest.mark.slow


def test_ranks_with_different_batches_make_the_same_collectives(tmp_path):
    data = write_synthetic_cllm4rec(tmp_path / "data", num_users=40, num_items=30, seed=1)
    main_build(data, tmp_path / "shards")
    base = write_tiny_checkpoint(tmp_path / "tiny")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "tests/distributed/uneven_batches.py", str(base), str(tmp_path / "shards"), str(tmp_path)]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-f", "tests/distributed/uneven_batches.py"])
        pytest.fail("the 2-rank run hung: the ranks made different collective calls")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "UNEVEN BATCHES OK" in done.stdout
