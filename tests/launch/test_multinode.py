"""The multi-node launchers for real: pdsh (over ssh) and OpenMPI (mpirun), with two "nodes"
on the loopback addresses 127.0.0.1 and 127.0.0.2, one rank each, served by an sshd that the
test starts. Each must train exactly like one node with 2 ranks, pass .deepspeed_env to the
ranks it starts over ssh, and report a preemption to the launch script whichever node the
signal hits.

Needs root (sshd; mpirun as root) and Debian's openssh-server, pdsh and openmpi-bin, which the
test installs with apt-get when missing; skipped with the reason where that is impossible.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_shards.build import build_shards
from data_shards.sources import load_cllm4rec
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.conftest import REPO
from tests.helpers import apt_install, launcher_env, write_tiny_checkpoint
from trainer.checkpoint import EXIT_PREEMPTED
from trainer.distributed import free_port

pytestmark = pytest.mark.slow

NODES = ("127.0.0.1", "127.0.0.2")
MARK = "reached-over-ssh"  # a variable only .deepspeed_env can carry to the ranks

# Every rank reports its environment when it starts (PYTHONPATH reaches the ranks of every node).
REPORTER = """import json, os
rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
if rank is not None and os.environ.get("CLLM4REC_TEST_REPORTS"):
    keep = ("CLLM4REC_TEST_MARK", "SSH_CONNECTION", "OMP_NUM_THREADS", "DS_ACCELERATOR", "MASTER_ADDR")
    path = os.path.join(os.environ["CLLM4REC_TEST_REPORTS"], f"rank{rank}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({k: os.environ.get(k) for k in keep}, f)
"""


PACKAGES = ["openssh-server", "openssh-client", "pdsh", "openmpi-bin"]
PROGRAMS = ["sshd", "ssh", "ssh-keygen", "pdsh", "mpirun"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """An sshd on both loopback addresses with a key of its own, and an `ssh` first on PATH that
    uses it (pdsh, mpirun and the deepspeed runner all call `ssh`)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run sshd and mpirun here")
    apt_install(PACKAGES, PROGRAMS)
    tmp = tmp_path_factory.mktemp("multinode")
    ssh = tmp / "ssh"
    ssh.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True)
    (ssh / "authorized_keys").write_text((ssh / "user_key.pub").read_text())
    port = free_port()
    (ssh / "sshd_config").write_text(
        f"Port {port}\n" + "".join(f"ListenAddress {node}\n" for node in NODES)
        + f"HostKey {ssh / 'host_key'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {ssh / 'sshd.pid'}\nLogLevel VERBOSE\n")
    (ssh / "ssh_config").write_text(f"Host *\n  Port {port}\n  IdentityFile {ssh / 'user_key'}\n"
                                    "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    wrapper = ssh / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {ssh / 'ssh_config'} \"$@\"\n")
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    daemon = subprocess.Popen([shutil.which("sshd"), "-D", "-f", str(ssh / "sshd_config"), "-E", str(ssh / "sshd.log")])
    env = {"PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    for node in NODES:
        for _ in range(50):
            if subprocess.run(["ssh", node, "true"], env=launcher_env(**env), capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            daemon.kill()
            pytest.fail(f"sshd on {node}:{port} did not accept the test's key; see {ssh / 'sshd.log'}")

    src = write_synthetic_cllm4rec(tmp / "syn", num_users=60, num_items=40, num_clusters=3, seed=3)
    build_shards(load_cllm4rec(src), tmp / "shards", docs_per_shard=23)
    write_tiny_checkpoint(tmp / "tiny")
    (tmp / "hostfile").write_text("".join(f"{node} slots=1\n" for node in NODES))
    (tmp / "reporter").mkdir()
    (tmp / "reporter" / "sitecustomize.py").write_text(REPORTER)
    yield tmp, env
    daemon.terminate()
    daemon.wait(timeout=30)


def _start(cluster, name, launcher, *extra):
    """launch/pretrain.sh of run `name` in its own folder and session: 2 ranks on this node
    (launcher None) or one on each loopback node."""
    tmp, env = cluster
    cwd = tmp / name
    (cwd / "reports").mkdir(parents=True, exist_ok=True)
    env = launcher_env(**env, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp / "reporter"),
                       CLLM4REC_TEST_REPORTS=str(cwd / "reports"), CLLM4REC_TEST_MARK=MARK,
                       CLLM4REC_EXPORT="CLLM4REC_TEST_MARK CLLM4REC_TEST_REPORTS",
                       OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if launcher is None:
        env["NPROC"] = "2"
    else:
        env |= {"NPROC": "1", "HOSTFILE": str(tmp / "hostfile"), "LAUNCHER": launcher, "MASTER_ADDR": NODES[0]}
    overrides = [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}", f"run.dir={cwd / 'run'}",
                 f"run.deepspeed={REPO / 'configs' / 'ds_zero3.json'}",
                 "pretrain.rounds=1", "pretrain.collab_batch_size=4", "pretrain.content_batch_size=8",
                 "lora.dropout=0.0", "data.max_text_tokens=24", "run.log_every=1000",
                 "pretrain.adam_eps=1e-5",  # see tests/distributed/test_zero3.py: float32 rounding of the ranks
                 *extra]
    log = open(cwd / "launch.log", "a")
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "pretrain.sh"), str(REPO / "configs" / "quickstart.yaml"),
                             *overrides], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, cwd


def _finish(proc, cwd, expect=0):
    status = proc.wait(timeout=600)
    output = (cwd / "launch.log").read_text()
    assert status == expect, f"{cwd.name}: exit status {status}, expected {expect}:\n{output[-4000:]}"
    return output


def _losses(cwd):
    log = cwd / "run" / "pretrain" / "train_log.jsonl"
    return [r["loss"] for r in map(json.loads, log.read_text().splitlines())]


def _reports(cwd):
    return [json.loads(p.read_text()) for p in sorted((cwd / "reports").glob("rank*.json"))]


@pytest.fixture(scope="module")
def runs(cluster):
    """The reference (one node, 2 ranks) and an uninterrupted run through each launcher."""
    out = {}
    for name, launcher in (("one_node", None), ("pdsh", "pdsh"), ("openmpi", "openmpi")):
        proc, cwd = _start(cluster, name, launcher)
        out[name] = (cwd, _finish(proc, cwd))
    return out


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi"])
def test_two_loopback_nodes_train_like_one_node_with_two_ranks(runs, cluster, launcher):
    reference, (cwd, output) = _losses(runs["one_node"][0]), runs[launcher]
    losses = _losses(cwd)
    assert len(losses) == len(reference) >= 30
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    assert worst <= 1e-6, f"{launcher}: losses differ from one node's by up to {worst:.2e}"
    assert "pretrain on 2 rank(s)" in output
    # Both ranks were started over ssh, one per address, with what .deepspeed_env lists.
    reports = _reports(cwd)
    assert len(reports) == 2 and all(r["CLLM4REC_TEST_MARK"] == MARK and r["DS_ACCELERATOR"] == "cpu"
                                     and r["OMP_NUM_THREADS"] == "1" for r in reports), reports
    sshd_log = (cluster[0] / "ssh" / "sshd.log").read_text()
    assert f"on {NODES[1]} port" in sshd_log
    if launcher == "pdsh":
        assert sorted(r["SSH_CONNECTION"].split()[2] for r in reports) == list(NODES)
    env_file = (cwd / ".deepspeed_env").read_text()
    assert f"CLLM4REC_TEST_MARK={MARK}" in env_file and "MASTER_ADDR=127.0.0.1" in env_file


def _signal_when(proc, cwd, steps, target):
    """Once `steps` steps are logged, SIGTERM the launch script's process group ("group") or
    only the rank of the second node ("rank1")."""
    log = cwd / "run" / "pretrain" / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.time() < deadline, (cwd / "launch.log").read_text()[-3000:]
        time.sleep(0.05)
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
        return
    reports = list(cwd.joinpath("reports").glob("rank1-*.json"))
    assert len(reports) == 1, reports
    os.kill(int(reports[0].stem.split("-")[1]), signal.SIGTERM)


@pytest.mark.parametrize("launcher,target", [("pdsh", "rank1"), ("pdsh", "group"), ("openmpi", "rank1")])
def test_preemption_reaches_the_launch_script_from_any_node(runs, cluster, launcher, target):
    # Another job's DeepSpeed launcher on the same machine, as DeepSpeed's own pdsh kill pattern
    # ("<python> -u -m deepspeed.launcher.launch") would match it: it must live on.
    bystander = subprocess.Popen(["bash", "-c", f'exec -a "{sys.executable} -u -m deepspeed.launcher.launch '
                                  '--world_info=other" sleep 600'], start_new_session=True)
    proc, cwd = _start(cluster, f"{launcher}-{target}", launcher)
    _signal_when(proc, cwd, 10, target)
    started = time.time()
    output = _finish(proc, cwd, expect=EXIT_PREEMPTED)
    assert bystander.poll() is None, "another DeepSpeed job on the node was killed with this one"
    bystander.kill()
    assert time.time() - started < 60
    assert "preempted; a checkpoint was saved: rerun with --resume auto" in output
    checkpoints = cwd / "run" / "pretrain" / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert json.loads((latest / "trainer_state.json").read_text())["step"] >= 10
    if target == "group":  # the job then continues where it stopped, to the uninterrupted run's end
        proc, cwd = _start(cluster, f"{launcher}-{target}", launcher, "--resume", "auto")
        assert "resuming at" in _finish(proc, cwd)
        whole = runs[launcher][0] / "run" / "pretrain"
        for name in ("id_tables.safetensors", "adapters/collab/adapter_model.safetensors"):
            assert (cwd / "run" / "pretrain" / name).read_bytes() == (whole / name).read_bytes(), name
