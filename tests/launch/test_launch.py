"""The launch scripts' multi-node options: clear errors before anything starts."""
import subprocess

import pytest

from tests.conftest import REPO
from tests.helpers import launcher_env


def _launch(*args, cwd=REPO, **env):
    return subprocess.run(["bash", str(REPO / "launch" / "pretrain.sh"), *args], cwd=cwd, capture_output=True,
                          text=True, env=launcher_env(**env), timeout=60)


@pytest.mark.parametrize("args,env,message", [
    (["--num_nodes", "2", "configs/quickstart.yaml"], {}, "NNODES=2 needs HOSTFILE"),
    (["--hostfile", "no-such-hostfile", "configs/quickstart.yaml"], {}, "HOSTFILE=no-such-hostfile: file not found"),
    (["--hostfile", "{hosts}", "configs/quickstart.yaml"], {}, "needs MASTER_ADDR"),
    (["--hostfile", "{hosts}", "--no_ssh", "--master_addr", "10.0.0.1", "configs/quickstart.yaml"], {},
     "LAUNCHER=no_ssh needs NODE_RANK"),
    (["--hostfile", "{hosts}", "--no_ssh", "--node_rank", "1", "--master_addr", "10.0.0.1", "configs/quickstart.yaml"],
     {}, "needs MASTER_PORT, the same on every node"),
    (["--hostfile", "{hosts}", "--num_nodes", "3", "--master_addr", "10.0.0.1", "configs/quickstart.yaml"], {},
     "lists 2 host(s)"),
    (["--hostfile", "{hosts}", "--launcher", "carrier-pigeon", "--master_addr", "h", "configs/quickstart.yaml"], {},
     "use pdsh, no_ssh or openmpi"),
    (["--hosts", "x", "configs/quickstart.yaml"], {}, "unknown option --hosts"),
    (["missing.yaml"], {}, "config file 'missing.yaml' not found"),
])
def test_bad_launch_options_fail_with_a_clear_message(tmp_path, args, env, message):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    done = _launch(*[a.replace("{hosts}", str(hosts)) for a in args], **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr


def test_deepspeed_env_keeps_other_lines_and_lists_what_ranks_need(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=1\n")
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=1\nMASTER_ADDR=old\n")
    # openmpi on a machine without mpirun: the file is written, then the runner reports the missing backend.
    _launch("--hostfile", str(hosts), "--launcher", "openmpi", "--master_addr", "10.0.0.9",
            str(REPO / "configs" / "quickstart.yaml"), cwd=tmp_path, CLLM4REC_EXPORT="MY_TOKEN", MY_TOKEN="abc",
            MALLOC_MMAP_THRESHOLD_="131072")
    lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
    assert "MY_SETTING=1" in lines and "MASTER_ADDR=10.0.0.9" in lines and "MASTER_ADDR=old" not in lines
    assert "MY_TOKEN=abc" in lines
    assert "MALLOC_MMAP_THRESHOLD_=131072" in lines and any(line.startswith("PATH=") for line in lines)


def test_command_line_flushes_its_output_and_returns_its_status(tmp_path):
    """`python -m trainer.cli` ends with os._exit (trainer/cli.py run): what was printed still
    arrives through a pipe, and the status is the subcommand's."""
    import sys

    done = subprocess.run([sys.executable, "-m", "trainer.cli", "synthetic-data", "--output", str(tmp_path / "data")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "wrote a synthetic CLLM4Rec-format dataset" in done.stdout, done.stderr
    failed = subprocess.run([sys.executable, "-m", "trainer.cli", "pretrain", "--config", str(tmp_path / "no.yaml")],
                            cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 1 and "no.yaml not found" in failed.stderr
