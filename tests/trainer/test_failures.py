"""Failures end the run: every rank and every DataLoader worker exits, with a non-zero status,
within seconds (under Slurm a hung rank would hold its nodes until the wall-time limit)."""
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.helpers import launcher_env, toy_run_inputs

pytestmark = pytest.mark.slow


def _break_a_document(shard):
    """Same size, tar headers intact (only a checksum would see it): one document is no longer JSON."""
    data = bytearray(shard.read_bytes())
    at = data.index(b'"text"', len(data) // 2)
    data[at] = ord("{")
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_document_a_worker_cannot_read_ends_every_process(tmp_path, ranks):
    _, base = toy_run_inputs(tmp_path)
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


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_input_errors_of_a_recipe_are_one_line(tmp_path):
    """A missing index.json, and bad shards in two streams, found before the base is loaded (the
    base folder here does not even exist) and every bad stream named."""
    (tmp_path / "empty").mkdir()
    done = _cli("pretrain", "--config", "configs/quickstart.yaml", f"data.shards={tmp_path / 'empty'}",
                f"model.base_dir={tmp_path / 'no-base'}", f"run.dir={tmp_path / 'run'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"cllm4rec pretrain: {tmp_path / 'empty' / 'index.json'} "
                                                          "not found")
    toy_run_inputs(tmp_path)
    for stream in ("collab", "content"):
        shard = sorted((tmp_path / "shards" / stream).glob("*.tar"))[0]
        shard.write_bytes(shard.read_bytes()[:-1024])
    done = _cli("pretrain", "--config", "configs/quickstart.yaml", f"data.shards={tmp_path / 'shards'}",
                f"model.base_dir={tmp_path / 'no-base'}", f"run.dir={tmp_path / 'run'}")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("cllm4rec pretrain: stream 'collab': shard") and "stream 'content': shard" in last, last


@pytest.mark.parametrize("args, says", [
    (["--users", "1", "--k", "0"], "--k 0: how many items to recommend, at least 1"),
    (["--history", "abc"], "--history 'abc': expected comma-separated integer ids"),
    (["--users", "3,x"], "--users '3,x': expected comma-separated integer ids like 3,17,42 or all"),
    (["--history", ","], "--history is empty")])
def test_recommend_arguments_are_checked(tmp_path, args, says):
    from trainer.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["recommend", "--bundle", str(tmp_path), *args])
    assert says in str(stop.value.code)


def test_resuming_another_configuration_is_refused_and_a_new_learning_rate_is_logged(tmp_path):
    _, base = toy_run_inputs(tmp_path)
    common = ["pretrain", "--config", "configs/quickstart.yaml", f"model.base_dir={base}",
              f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}", "pretrain.max_steps_per_epoch=2",
              "pretrain.rounds=1", "run.save_every_steps=1", "run.keep_checkpoints=10"]
    assert _cli(*common).returncode == 0
    checkpoints = tmp_path / "run" / "pretrain" / "checkpoints"
    (checkpoints / "latest").unlink()
    for late in sorted(checkpoints.glob("step-*"))[3:]:
        import shutil

        shutil.rmtree(late)  # as if stopped after step 3
    done = _cli(*common, "lora.r=4", "--resume", "auto")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("cllm4rec pretrain: cannot resume from"), done.stderr[-2000:]
    assert "reshaped (e.g. ['backbone.base_model.model.model.layers.0" in last and "lora_A" in last
    done = _cli(*common, "pretrain.lr=0.002", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain.lr is 0.002 in this run and was 0.001 when the checkpoint was saved" in done.stderr


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_one_rank_dead_or_hung_ends_the_whole_job(tmp_path, signal_name):
    """kill -9 of one rank: the launcher ends the others at once. A rank that stops answering
    (SIGSTOP): the others fail after run.collective_timeout_s, and the launcher ends the job."""
    import os
    import signal

    _, base = toy_run_inputs(tmp_path)
    run = tmp_path / "run"
    job = subprocess.Popen(["bash", "launch/pretrain.sh", "configs/quickstart.yaml", f"model.base_dir={base}",
                            f"data.shards={tmp_path / 'shards'}", f"run.dir={run}", "pretrain.rounds=100",
                            "run.collective_timeout_s=20"], cwd=REPO, env=launcher_env(NPROC="2"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "pretrain" / "train_log.jsonl"
    for _ in range(240):
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.5)
    rank1 = subprocess.run(["pgrep", "-f", f"local_rank=1 pretrain .*{run}"], capture_output=True, text=True)
    pid = int(rank1.stdout.split()[0])
    os.kill(pid, getattr(signal, signal_name))
    hit = time.time()
    try:
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            subprocess.run(["pkill", "-9", "-f", str(run)])
    assert job.returncode != 0
    assert time.time() - hit < (20 if signal_name == "SIGKILL" else 60)
    assert "'--local_rank=1'" in out and "exits with return code" in out, out[-3000:]


def test_a_full_disk_during_a_save_publishes_nothing_and_resume_works_after(tmp_path):
    """The checkpoint folder on a small tmpfs: a save that runs out of space fails with one clear
    error, leaves no partial folder, `latest` still names the previous checkpoint, which loads."""
    import os
    import shutil

    from tests.helpers import toy_engine
    from trainer.checkpoint import Checkpointer, CheckpointSaveError, damage
    from trainer.distributed import init_distributed

    init_distributed()
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        _, base = toy_run_inputs(tmp_path)
        engine, _, _ = toy_engine(base, tmp_path / "shards")
        config = {"data": {"shards": str(tmp_path / "shards")}, "pretrain": {"lr": 0.01}}
        checkpoints = Checkpointer(engine, disk / "pretrain", 0, 5, config)
        first = checkpoints.save(1, {"plan_index": 0}, None)
        size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - size // 3))  # room for a third of the next one
        with pytest.raises(CheckpointSaveError) as error:
            checkpoints.save(2, {"plan_index": 0}, None)
        message = str(error.value)
        assert "could not save checkpoint step-00000002" in message and "MB free (full)" in message
        assert "step-00000001 is still the newest complete checkpoint" in message
        assert sorted(p.name for p in (disk / "pretrain" / "checkpoints").iterdir()) == ["latest", "step-00000001"]
        assert (disk / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step-00000001"
        assert damage(first) is None
        os.remove(disk / "filler")
        assert checkpoints.load(checkpoints.find("auto"))["step"] == 1
        assert checkpoints.save(2, {"plan_index": 0}, None).name == "step-00000002"
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_recommend_speaks_the_data_own_ids(tmp_path, monkeypatch, capsys):
    """--original-ids: users and items in and out by the ids of the raw data (the bundle's id maps);
    unknown ones and a bundle without maps are clear errors. (The model is a stand-in here; the
    served lists themselves are compared with evaluate's in test_end_to_end.)"""
    import json

    from trainer import serve
    from trainer.cli import main

    class Scores:  # contiguous ids in, contiguous ids out, as the real Recommender
        def __init__(self, bundle, base=None, members=(), ensemble_depth=100):
            self.train = type("T", (), {"shape": (3, 4)})()

        def for_users(self, users, k):
            return {u: [(u + 1) % 4, (u + 2) % 4][:k] for u in users}

        def for_history(self, user, items, k):
            return [i for i in range(4) if i not in items][:k]

    monkeypatch.setattr(serve, "Recommender", Scores)
    (tmp_path / "id_maps").mkdir()
    (tmp_path / "id_maps" / "users.json").write_text(json.dumps(["A1X", "B2Y", "C3Z"]))
    (tmp_path / "id_maps" / "items.json").write_text(json.dumps(["B00a", "B00b", "B00c", "B00d"]))
    assert main(["recommend", "--bundle", str(tmp_path), "--original-ids", "--users", "C3Z,A1X", "--k", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [json.dumps({"user": "A1X", "items": ["B00b", "B00c"]}),
                                                    json.dumps({"user": "C3Z", "items": ["B00d", "B00a"]})]
    main(["recommend", "--bundle", str(tmp_path), "--original-ids", "--history", "B00a,B00c", "--user", "B2Y"])
    assert capsys.readouterr().out.splitlines() == [json.dumps({"user": "B2Y", "items": ["B00b", "B00d"]})]
    with pytest.raises(SystemExit, match=r"unknown original item id\(s\) \['nope'\]"):
        main(["recommend", "--bundle", str(tmp_path), "--original-ids", "--history", "B00a,nope"])
    (tmp_path / "id_maps" / "users.json").unlink()
    with pytest.raises(SystemExit, match="has no id maps"):
        main(["recommend", "--bundle", str(tmp_path), "--original-ids", "--users", "A1X"])
