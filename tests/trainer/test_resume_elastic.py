"""Resumes on another number of ranks (2 -> 1 -> 2), with dense and with row-sharded ID tables
(model.id_tables=sharded, whose saved shards are resharded on load), and a sharded run killed
with SIGKILL resumed bitwise on the same number of ranks; pretraining through the launch scripts.
The global batch is the same at every number of ranks and dropout is off (its random streams are
per rank)."""
import json
import subprocess

import pytest
from safetensors import safe_open

from tests.conftest import REPO
from tests.helpers import launcher_env
from tests.trainer.test_resume import _command, _losses, _mid_epoch_checkpoint, _signal_at, write_inputs

pytestmark = pytest.mark.slow

# Capped epochs: every step a full global batch (a last partial one splits differently).
COMMON = ["lora.dropout=0.0", "run.keep_checkpoints=100", "pretrain.max_steps_per_epoch=12"]
SHARDED = ["model.id_tables=sharded", *COMMON]


def _step_losses(path, after):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["step"] > after}


def _pretrain(tmp, run_dir, ranks, *extra, tables="sharded"):
    per_rank = [f"pretrain.content_batch_size={16 // ranks}", f"pretrain.collab_batch_size={8 // ranks}"]
    done = subprocess.run(_command("pretrain", tmp, run_dir, f"model.id_tables={tables}", *COMMON, *per_rank, *extra),
                          cwd=REPO, env=launcher_env(NPROC=str(ranks)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("elastic"))


@pytest.fixture(scope="module")
def sharded_reference(inputs):
    """An uninterrupted 2-rank run with sharded tables."""
    _pretrain(inputs, inputs / "reference-sharded", 2)
    return inputs / "reference-sharded"


def test_killed_sharded_run_resumes_bitwise(inputs, sharded_reference):
    tmp, reference = inputs, sharded_reference
    train_log = reference / "pretrain" / "train_log.jsonl"
    at = _mid_epoch_checkpoint(train_log)
    broken = tmp / "broken"
    per_rank = ["pretrain.content_batch_size=8", "pretrain.collab_batch_size=4"]
    command = _command("pretrain", tmp, broken, *SHARDED, *per_rank)
    _signal_at("pretrain", tmp, broken, at + 3, command=command)
    output = _pretrain(tmp, broken, 2, "--resume", "auto")
    assert f"resumed from {broken / 'pretrain' / 'checkpoints' / f'step-{at:08d}'}" in output
    checkpoint = broken / "pretrain" / "checkpoints" / f"step-{at:08d}"
    assert sorted(p.name for p in (checkpoint / "id-shards").iterdir()) == ["rank00000.safetensors",
                                                                           "rank00001.safetensors"]
    for name in ("id_tables.safetensors", "documents-rank0.jsonl", "documents-rank1.jsonl"):
        assert (reference / "pretrain" / name).read_bytes() == (broken / "pretrain" / name).read_bytes(), name
    assert _losses(train_log) == _losses(broken / "pretrain" / "train_log.jsonl")


@pytest.mark.parametrize("tables", ["dense", "sharded"])
def test_resume_from_two_ranks_to_one_and_back(inputs, request, tables):
    """2 -> 1 at one checkpoint, then 1 -> 2 at a later one: the losses of every step and the final
    tables match the uninterrupted 2-rank run within 1e-5 (weights and Adam state are exact; the
    ranks sum in another order)."""
    import torch

    tmp = inputs
    if tables == "sharded":
        reference = request.getfixturevalue("sharded_reference")
    else:
        reference = tmp / "reference-dense"
        _pretrain(tmp, reference, 2, tables=tables)
    train_log = reference / "pretrain" / "train_log.jsonl"
    steps = len(train_log.read_text().splitlines())
    first = _mid_epoch_checkpoint(train_log)
    one = tmp / f"one-rank-{tables}"
    output = _pretrain(tmp, one, 1, f"run.resume={reference / 'pretrain' / 'checkpoints' / f'step-{first:08d}'}",
                       tables=tables)
    assert "resuming a 2-rank checkpoint on 1 rank(s)" in output
    second = next(s for s in range(first + 5, steps, 5) if (one / "pretrain" / "checkpoints" / f"step-{s:08d}").is_dir())
    back = tmp / f"two-again-{tables}"
    output = _pretrain(tmp, back, 2, f"run.resume={one / 'pretrain' / 'checkpoints' / f'step-{second:08d}'}",
                       tables=tables)
    assert "resuming a 1-rank checkpoint on 2 rank(s)" in output
    want = _step_losses(train_log, first)
    got = {**_step_losses(one / "pretrain" / "train_log.jsonl", first),
           **_step_losses(back / "pretrain" / "train_log.jsonl", second)}
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    with safe_open(str(reference / "pretrain" / "id_tables.safetensors"), "pt") as a, \
            safe_open(str(back / "pretrain" / "id_tables.safetensors"), "pt") as b:
        for name in a.keys():
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), rtol=1e-5, atol=1e-6)
    saved = json.loads((back / "pretrain" / "model_state.json").read_text())
    assert (saved["num_users"], saved["num_items"]) == (60, 40)
