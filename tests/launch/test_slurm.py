"""The Slurm batch scripts (launch/slurm/) against a real Slurm on this machine.

Debian's slurmctld, slurmd and munge are installed when missing (root and apt needed, or the
tests skip and say why), and started with a private config unless a cluster already answers;
only the daemons started here are stopped. Pretraining runs as a one-task job (the deepspeed
launcher starts 2 ranks) and is preempted by SIGUSR1 to its steps, so the job saves and
requeues itself; finetune and evaluate are chained after it by launch/slurm/submit.sh as
2-task jobs (srun starts the ranks), and finetuning is requeued from outside (`scontrol
requeue`: SIGTERM). Both stages must end bitwise equal to an uninterrupted local run.
"""
import json
import os
import re
import shutil
import signal
import socket
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

pytestmark = pytest.mark.slow

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge", "unmunge"]
SAVED = ["id_tables.safetensors", "adapters/collab/adapter_model.safetensors",
         "adapters/content/adapter_model.safetensors", "documents-rank0.jsonl", "documents-rank1.jsonl"]
OVERRIDES = ["pretrain.rounds=1", "pretrain.max_steps_per_epoch=12", "pretrain.content_batch_size=8",
             "pretrain.collab_batch_size=4", "finetune.epochs=2", "finetune.max_steps_per_epoch=8",
             "finetune.content_epochs=true", "finetune.batch_size=4", "finetune.content_batch_size=8",
             "lora.dropout=0.1", "run.save_every_steps=5", "data.log_documents=true", "run.log_every=1000"]


def _run(cmd, env=None, timeout=60, **kw):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged, slurmctld and slurmd on this machine, each started only when none answers."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.jobs: list[str] = []  # submitted by the tests: cancelled before the daemons stop
        self._logs = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        if os.environ.get("SLURM_CONF"):
            self.env["SLURM_CONF"] = os.environ["SLURM_CONF"]

    def _start(self, name, cmd, **kw):
        log = open(self.root / f"{name}.log", "w")
        self._logs.append(log)
        self.started.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)))

    def _wait(self, what, ready, timeout=60):
        deadline = time.time() + timeout
        while not ready():
            for name, proc in self.started:
                if proc.poll() is not None:
                    log = (self.root / f"{name}.log").read_text()[-2000:]
                    raise RuntimeError(f"{name} exited with status {proc.returncode} while waiting for {what}:\n{log}")
            if time.time() > deadline:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.5)

    def _munge_works(self) -> bool:
        cred = _run(["munge", "-n"], timeout=10)
        return cred.returncode == 0 and _run(["unmunge"], input=cred.stdout, timeout=10).returncode == 0

    def _cluster_answers(self) -> bool:
        done = _run(["sinfo", "-h", "-o", "%T %c"], env=self.env, timeout=20)
        nodes = [line.split() for line in done.stdout.splitlines() if len(line.split()) == 2]
        return done.returncode == 0 and any(state in ("idle", "mixed") and int(re.match(r"\d+", cpus).group()) >= 2
                                            for state, cpus in nodes)

    def start(self) -> None:
        if not self._munge_works():
            if os.geteuid() != 0:
                pytest.skip("munged is not running, and starting it (as user munge) needs root")
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "--create"], check=True, user="munge", timeout=30)
            self._start("munged", ["munged", "--foreground", "--force"], user="munge", group="munge")
            self._wait("munged", self._munge_works)
        if self._cluster_answers():
            return
        if os.geteuid() != 0:
            pytest.skip("no Slurm cluster answers sinfo, and starting slurmctld/slurmd needs root")
        node = _run(["slurmd", "-C"]).stdout.splitlines()[0]
        host, cpus = re.search(r"NodeName=(\S+)", node).group(1), int(re.search(r"CPUs=(\d+)", node).group(1))
        if cpus < 2:
            pytest.skip(f"this machine has {cpus} CPU; the test job needs 2")
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        # Free ports and private folders: another Slurm on this machine is left undisturbed.
        conf = self.root / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=cllm4rec-test", f"SlurmctldHost={host}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "SlurmUser=root", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
            "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"{node} State=UNKNOWN", "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env["SLURM_CONF"] = str(conf)
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)], env=self.env)
        self._start("slurmd", ["slurmd", "-D", "-f", str(conf)], env=self.env)
        self._wait("the node to be idle in sinfo", self._cluster_answers)

    def stop(self, jobs) -> None:
        for job in jobs:
            _run(["scancel", str(job)], env=self.env)
        deadline = time.time() + 60
        while jobs and time.time() < deadline:
            states = {job_state(self, j).get("JobState") for j in jobs}
            if not states & {"RUNNING", "COMPLETING", "PENDING", "CONFIGURING"}:
                break
            time.sleep(1)
        for _, proc in reversed(self.started):  # slurmd, slurmctld, munged
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def job_state(slurm: LocalSlurm, job) -> dict:
    done = _run(["scontrol", "show", "job", "-o", str(job)], env=slurm.env, timeout=20)
    return dict(t.split("=", 1) for t in done.stdout.split() if "=" in t)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    apt_install(PACKAGES, PROGRAMS)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(cluster.jobs)


def _job_env(slurm, **extra):
    """What sbatch passes on to the jobs: this environment, with its venv first on PATH."""
    env = launcher_env(**extra) | {"SLURM_CONF": slurm.env.get("SLURM_CONF", "")}
    env = {k: v for k, v in env.items() if v and (not k.startswith("SLURM_") or k == "SLURM_CONF")}
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _submit(slurm, cmd, env):
    done = _run(cmd, env=env, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def _wait_for(what, ready, slurm, watch: dict, timeout=300):
    """Poll `ready` until true; fail at once, with the job's log, if a watched job (job id ->
    log path) failed or can never start."""
    deadline = time.time() + timeout
    while not ready():
        for job, log in watch.items():
            state = job_state(slurm, job)
            broken = state.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
                or state.get("Reason") == "DependencyNeverSatisfied"
            assert not broken and time.time() < deadline, \
                f"{'timed out ' if not broken else ''}waiting for {what}: job {job} is {state.get('JobState')} " \
                f"({state.get('Reason')}):\n{log.read_text()[-4000:] if log.exists() else '(no log)'}"
        time.sleep(0.3)


def _steps(train_log: Path) -> int:
    return len(train_log.read_text().splitlines()) if train_log.exists() else 0


def _release_after_requeue(slurm, job, restarts, watch):
    """Slurm holds a requeued job for about two minutes (BeginTime) before it may start again.
    The test lets it start at once, but only after the node has finished cleaning up the last
    start, and a second later: a start within the second of that cleanup is refused by slurmd
    (job credential revoked) and the job fails."""
    def requeued_and_cleaned_up():
        state = job_state(slurm, job)
        nodes = _run(["sinfo", "-h", "-N", "-o", "%T"], env=slurm.env, timeout=20).stdout.split()
        return (state.get("JobState") == "PENDING" and int(state.get("Restarts", 0)) == restarts
                and not any("completing" in n for n in nodes))
    _wait_for(f"job {job} to be requeued", requeued_and_cleaned_up, slurm, watch, timeout=150)
    time.sleep(2)
    _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env)  # needs operator rights; else wait


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-runs")
    src = write_synthetic_cllm4rec(tmp / "syn", num_users=60, num_items=40, num_clusters=3, seed=2)
    build_shards(load_cllm4rec(src), tmp / "shards", docs_per_shard=17)
    write_tiny_checkpoint(tmp / "tiny")
    data = [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}", *OVERRIDES]

    whole = tmp / "whole"
    for stage in ("pretrain", "finetune"):
        done = _run(["bash", f"launch/{stage}.sh", "configs/quickstart.yaml", *data, f"run.dir={whole}"],
                    env=launcher_env(NPROC="2"), cwd=REPO, timeout=600)
        assert done.returncode == 0, f"uninterrupted {stage} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"

    run_dir, logs = tmp / "slurm", tmp / "logs"
    logs.mkdir()
    args = ["configs/quickstart.yaml", *data, f"run.dir={run_dir}"]
    output = f"--output={logs}/%x-%j.out"
    # One task with 2 CPUs: the deepspeed launcher starts both ranks.
    pre = _submit(slurm, ["sbatch", "--parsable", "-N1", "-n1", "-c2", output, "launch/slurm/pretrain.sbatch", *args],
                  _job_env(slurm, NPROC="2")).strip().split(";")[0]
    slurm.jobs.append(pre)
    # Two tasks: srun starts the ranks.
    chained = _submit(slurm, ["bash", "launch/slurm/submit.sh", "--stages", "finetune,evaluate", "-n2", output,
                              f"--dependency=afterok:{pre}", "--", *args], _job_env(slurm))
    jobs = dict(line.split() for line in chained.splitlines())
    slurm.jobs += [jobs["finetune"], jobs["evaluate"]]
    jobs["pretrain"] = pre
    log = {stage: logs / f"cllm4rec-{stage}-{job}.out" for stage, job in jobs.items()}
    watch = {job: log[stage] for stage, job in jobs.items()}

    # Pretraining: SIGUSR1 to the job's steps mid-epoch (what --signal=USR1@s sends before the time limit).
    train_log = run_dir / "pretrain" / "train_log.jsonl"
    _wait_for("pretrain step 13", lambda: _steps(train_log) >= 13, slurm, watch)
    _run(["scancel", "--signal=USR1", pre], env=slurm.env)
    _release_after_requeue(slurm, pre, 1, watch)

    # Finetuning: requeued from outside (SIGTERM to every process of the job, then a restart).
    fin = jobs["finetune"]
    train_log = run_dir / "finetune" / "train_log.jsonl"
    _wait_for("finetune step 18", lambda: _steps(train_log) >= 18, slurm, watch)
    _run(["scontrol", "requeue", fin], env=slurm.env)
    _release_after_requeue(slurm, fin, 1, watch)

    ev = jobs["evaluate"]
    _wait_for("evaluate to complete", lambda: job_state(slurm, ev).get("JobState") == "COMPLETED",
              slurm, watch, timeout=400)
    states = {stage: job_state(slurm, job) for stage, job in jobs.items()}
    return whole, run_dir, jobs, states, {stage: path.read_text() for stage, path in log.items()}, logs


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_run(runs, stage):
    whole, run_dir, jobs, states, logs, _ = runs
    for name in SAVED:
        assert (whole / stage / name).read_bytes() == (run_dir / stage / name).read_bytes(), \
            f"{stage}/{name} differs from the uninterrupted run's"
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (d / stage / "train_log.jsonl").read_text().splitlines())]
              for d in (whole, run_dir)]
    assert losses[0] == losses[1]
    # Preempted once, started twice, finished without requeueing itself again.
    assert states[stage]["JobState"] == "COMPLETED" and states[stage]["Restarts"] == "1", states[stage]
    log = logs[stage]
    saved = re.search(r"stopped on a preemption signal after saving (\S+);", log)
    assert saved, f"the {stage} job log shows no preemption save:\n{log[-3000:]}"
    assert f"INFO checkpoint {saved.group(1)} saved" in log
    assert f"resumed from {saved.group(1)} " in log
    assert "resuming with --resume auto" in log and log.count("resuming with --resume auto") == 1
    assert log.rstrip().endswith(f"launch/slurm [job {jobs[stage]} {stage}]: finished")
    if stage == "pretrain":
        assert "mode launcher" in log and "received SIGUSR1" in log
        assert f"requeued job {jobs[stage]}: its next start resumes with --resume auto" in log
    else:
        assert "mode srun" in log and "received SIGTERM" in log
        assert "Slurm is ending this job" in log  # requeued by Slurm, not a second time by the job


def test_the_chain_waits_through_requeues_and_evaluates(runs):
    _, run_dir, jobs, states, logs, _ = runs
    assert states["evaluate"]["JobState"] == "COMPLETED" and states["evaluate"]["Restarts"] == "0"
    for stage in ("finetune", "evaluate"):
        previous = {"finetune": "pretrain", "evaluate": "finetune"}[stage]
        # Each job started only after the previous one's last start had finished.
        assert states[stage]["StartTime"] >= states[previous]["EndTime"], (states[previous], states[stage])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics, "evaluate wrote an empty metrics.json"


def test_every_rank_has_its_own_log(runs):
    _, _, jobs, _, logs, log_dir = runs
    for stage in ("pretrain", "finetune"):
        job = jobs[stage]
        assert f"rank logs: {log_dir}/cllm4rec-{stage}-{job}-rank<r>.log" in logs[stage]
        for rank in (0, 1):
            rank_log = (log_dir / f"cllm4rec-{stage}-{job}-rank{rank}.log").read_text()
            # Both starts append to it; each rank reports the signal it received.
            assert "received SIG" in rank_log, f"{stage} rank {rank}:\n{rank_log[-2000:]}"
        assert "resumed from" in (log_dir / f"cllm4rec-{stage}-{job}-rank0.log").read_text()


def test_a_failing_job_is_retried_a_bounded_number_of_times(slurm, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    # An unknown config key: every rank stops at once with status 1, a failure that no retry fixes.
    job = _submit(slurm, ["sbatch", "--parsable", "-n2", f"--output={logs}/%x-%j.out", "launch/slurm/pretrain.sbatch",
                          "configs/quickstart.yaml", "run.no_such_key=1"],
                  _job_env(slurm, CLLM4REC_SLURM_RETRIES="1")).strip().split(";")[0]
    slurm.jobs.append(job)
    log = logs / f"cllm4rec-pretrain-{job}.out"
    _release_after_requeue(slurm, job, 1, {job: log})
    deadline = time.time() + 120
    while job_state(slurm, job).get("JobState") != "FAILED":
        assert time.time() < deadline, f"{job_state(slurm, job)}\n{log.read_text()[-3000:] if log.exists() else ''}"
        time.sleep(0.5)
    state = job_state(slurm, job)
    assert state["Restarts"] == "1" and state["ExitCode"] == "1:0", state
    text = log.read_text()
    assert "unknown config key 'run.no_such_key'" in text
    assert f"requeued job {job}: retry 1 of 1 after a failure" in text
    assert "giving up: the stage failed 2 time(s), and CLLM4REC_SLURM_RETRIES=1 allows 1 retry(ies)" in text


def test_scripts_refuse_to_run_outside_their_place():
    env = {k: v for k, v in launcher_env().items() if not k.startswith("SLURM_")}
    done = _run(["bash", "launch/slurm/job.sh", "pretrain", "configs/quickstart.yaml"], env=env, cwd=REPO)
    assert done.returncode == 2 and "SLURM_JOB_ID is not set" in done.stderr
    done = _run(["bash", "launch/slurm/submit.sh", "--stages", "pretrain,train", "--", "configs/quickstart.yaml"],
                env=env, cwd=REPO)
    assert done.returncode == 2 and "'train' is not one of pretrain, finetune, evaluate" in done.stderr
    done = _run(["bash", "launch/slurm/submit.sh", "-n2", "--", "configs/missing.yaml"], env=env, cwd=REPO)
    assert done.returncode == 2 and "config file 'configs/missing.yaml' not found" in done.stderr
