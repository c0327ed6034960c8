"""A 2-rank run killed with SIGKILL mid-epoch and resumed with `--resume auto` continues exactly:
every rank trains on the same documents in the same order as an uninterrupted run, and the
final ID tables and adapters are bitwise equal. Pretraining and finetuning, via launch/."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from data_shards.build import build_shards
from data_shards.sources import load_cllm4rec
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.conftest import REPO
from tests.helpers import launcher_env, write_tiny_checkpoint

pytestmark = pytest.mark.slow

SAVED = ["id_tables.safetensors", "adapters/collab/adapter_model.safetensors",
         "adapters/content/adapter_model.safetensors", "documents-rank0.jsonl", "documents-rank1.jsonl"]


def _command(stage, tmp, run_dir, *extra):
    overrides = [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}", f"run.dir={run_dir}",
                 "pretrain.rounds=1", "pretrain.content_batch_size=16", "pretrain.collab_batch_size=4",
                 "finetune.epochs=2", "finetune.content_epochs=true", "finetune.batch_size=4",
                 "finetune.content_batch_size=16", "lora.dropout=0.1", "run.save_every_steps=5",
                 "finetune.lr_schedule=cosine", "finetune.warmup_steps=3",  # the schedule resumes exactly too
                 "data.log_documents=true", "data.num_workers=2", "run.log_every=1000", *extra]
    return ["bash", str(REPO / "launch" / f"{stage}.sh"), "configs/quickstart.yaml", *overrides]


def _run(stage, tmp, run_dir, *extra):
    done = subprocess.run(_command(stage, tmp, run_dir, *extra), cwd=REPO, env=launcher_env(NPROC="2"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _signal_at(stage, tmp, run_dir, steps, signals=(signal.SIGKILL,), command=None):
    """Start the stage (`command`, default _command's) in its own process group on 2 ranks; once
    `steps` steps are logged, send `signals` to the whole group (as a scheduler does), 50 ms apart.
    Returns (exit status, output)."""
    log = run_dir / stage / "train_log.jsonl"
    output = tmp / f"{stage}-{run_dir.name}-signalled.log"
    with open(output, "w") as out:
        proc = subprocess.Popen(command or _command(stage, tmp, run_dir), cwd=REPO, env=launcher_env(NPROC="2"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
            assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.02)
        for sig in signals:
            os.killpg(proc.pid, sig)
            time.sleep(0.05)
        status = proc.wait(timeout=120)
    return status, output.read_text()


def _losses(path):
    return [(r["step"], r["stage"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _mid_epoch_checkpoint(train_log, every=5):
    """A checkpoint step, near 60% of the stage, with the same epoch running 4 steps past it."""
    labels = [r["stage"] for r in map(json.loads, train_log.read_text().splitlines())]
    candidates = [c for c in range(every, len(labels) - 4, every) if len(set(labels[c - 1:c + 4])) == 1]
    return min(candidates, key=lambda c: abs(c - 0.6 * len(labels)))


def write_inputs(tmp):
    """The shards (of unequal sizes) and the tiny base that _command reads from `tmp`."""
    src = write_synthetic_cllm4rec(tmp / "syn", num_users=60, num_items=40, num_clusters=3, seed=2)
    build_shards(load_cllm4rec(src), tmp / "shards", docs_per_shard=17)
    write_tiny_checkpoint(tmp / "tiny")
    return tmp


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = write_inputs(tmp_path_factory.mktemp("resume"))
    whole, broken = tmp / "whole", tmp / "broken"
    resumed_at, logs = {}, {}
    for stage in ("pretrain", "finetune"):
        _run(stage, tmp, whole)
        # Killed 3 steps after a checkpoint taken in the middle of an epoch, then resumed.
        resumed_at[stage] = _mid_epoch_checkpoint(whole / stage / "train_log.jsonl")
        _signal_at(stage, tmp, broken, resumed_at[stage] + 3)
        logs[stage] = _run(stage, tmp, broken, "--resume", "auto")
    return whole, broken, logs, resumed_at, tmp


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_killed_run_resumes_exactly(runs, stage):
    whole, broken, logs, resumed_at, _ = runs
    assert f"resumed from {broken / stage / 'checkpoints' / f'step-{resumed_at[stage]:08d}'}" in logs[stage]
    for name in SAVED:
        a, b = (whole / stage / name).read_bytes(), (broken / stage / name).read_bytes()
        assert a == b, f"{stage}/{name} differs after resume"
    assert _losses(whole / stage / "train_log.jsonl") == _losses(broken / stage / "train_log.jsonl")
    # the resumed stage's wall time also counts the killed process's, up to its checkpoint
    resumed = json.loads((broken / stage / "resources.json").read_text())
    assert resumed["resumed_after_s"] > 0 and resumed["wall_s"] > resumed["resumed_after_s"]
    assert json.loads((whole / stage / "resources.json").read_text())["resumed_after_s"] == 0
    if stage == "finetune":
        assert json.loads((whole / stage / "selection.json").read_text()) == \
            json.loads((broken / stage / "selection.json").read_text())


def test_each_rank_read_its_documents_once_per_epoch(runs):
    whole = runs[0]
    for stage in ("pretrain", "finetune"):
        seen = {}
        for rank in (0, 1):
            for line in (whole / stage / f"documents-rank{rank}.jsonl").read_text().splitlines():
                record = json.loads(line)
                seen.setdefault((record["stage"], rank), []).extend(record["keys"])
        for keys in seen.values():
            assert len(keys) == len(set(keys))
        for label in {s for s, _ in seen}:
            both = seen[(label, 0)] + seen[(label, 1)]
            assert len(both) == len(set(both))  # the ranks never share a document


def test_a_corrupt_shard_stops_the_launch_before_training(runs, tmp_path):
    tmp = runs[-1]
    shards = tmp_path / "shards"
    shutil.copytree(tmp / "shards", shards)
    shard = shards / "collab" / "collab-00001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # truncated
    command = _command("pretrain", tmp, tmp_path / "run") + [f"data.shards={shards}"]
    done = subprocess.run(command, cwd=REPO, env=launcher_env(NPROC="2"), capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"cllm4rec pretrain: stream 'collab': shard {shard} has" in out and "data.bad_shards=skip" in out
    assert not (tmp_path / "run" / "pretrain" / "train_log.jsonl").exists()


def test_preemption_signal_saves_stops_and_resumes_exactly(runs):
    """SIGTERM to the job's process group, then SIGUSR1 while it saves: the ranks finish the
    step, save one complete checkpoint, exit with status 75; --resume auto then ends bitwise
    equal to the uninterrupted run."""
    from trainer.checkpoint import EXIT_PREEMPTED, damage

    whole, tmp = runs[0], runs[-1]
    run_dir = tmp / "preempted"
    status, output = _signal_at("pretrain", tmp, run_dir, 12, (signal.SIGTERM, signal.SIGUSR1))
    assert status == EXIT_PREEMPTED, output[-3000:]
    assert "received SIGTERM" in output and "rerun with --resume auto" in output
    checkpoints = run_dir / "pretrain" / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    saved_at = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 12 <= saved_at <= 14 and saved_at % 5 != 0  # the step in flight, not a periodic save
    assert damage(latest) is None and not list(checkpoints.glob(".incomplete-*"))
    _run("pretrain", tmp, run_dir, "--resume", "auto")
    for name in SAVED:
        assert (whole / "pretrain" / name).read_bytes() == (run_dir / "pretrain" / name).read_bytes(), name


def test_resume_auto_skips_a_damaged_checkpoint(runs):
    whole, tmp = runs[0], runs[-1]
    run_dir = tmp / "damaged"
    shutil.copytree(whole / "pretrain" / "checkpoints", run_dir / "pretrain" / "checkpoints")
    newest = sorted((run_dir / "pretrain" / "checkpoints").glob("step-*"))
    assert len(newest) == 2  # run.keep_checkpoints
    broken = newest[-1] / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    broken.write_bytes(broken.read_bytes()[:100])
    (run_dir / "pretrain" / "checkpoints" / ".incomplete-step-99999999").mkdir()  # a save cut short
    output = _run("pretrain", tmp, run_dir, "--resume", "auto")
    assert f"skipping damaged checkpoint {newest[-1]}" in output and str(broken) in output
    assert f"resumed from {newest[0]}" in output
