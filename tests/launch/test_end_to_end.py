"""Tiny pretrain -> finetune -> evaluate on the real mini split, 2 DeepSpeed ranks, via launch/.

One run of the three launch scripts (each start costs ~20 s of imports), then every check
on its outputs.
"""
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import REPO
from tests.helpers import independent_metrics, launcher_env

pytestmark = pytest.mark.slow


def _launch(stage: str, overrides: list[str], env: dict) -> str:
    cmd = ["bash", str(REPO / "launch" / f"{stage}.sh"), "configs/quickstart.yaml", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory, mini_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    env = launcher_env(NPROC="2")
    subprocess.run(["cllm4rec", "build-shards", "--input", str(mini_dir), "--output", str(tmp / "shards")],
                   check=True, env=env, capture_output=True)
    subprocess.run(["cllm4rec", "make-tiny-model", "--output", str(tmp / "tiny")], check=True, env=env,
                   capture_output=True)
    overrides = [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}", f"run.dir={tmp / 'run'}",
                 "pretrain.max_steps_per_epoch=3", "pretrain.rounds=1", "finetune.epochs=2",
                 "finetune.max_steps_per_epoch=3", "finetune.content_epochs=true", "evaluate.recommendations=true",
                 "evaluate.ease_fusion=true"]
    logs = {stage: _launch(stage, overrides, env) for stage in ("pretrain", "finetune", "evaluate")}
    return tmp, logs


def test_stages_log_progress_and_per_step_losses(run):
    tmp, logs = run
    lines = [json.loads(x) for x in (tmp / "run" / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 3  # content warm-up, collab, content; 3 steps each
    assert [x["task"] for x in lines[::3]] == ["content", "collab", "content"]
    assert all(math.isfinite(x["loss"]) for x in lines)
    assert "pretrain on 2 rank(s)" in logs["pretrain"]
    selection = json.loads((tmp / "run" / "finetune" / "selection.json").read_text())
    assert len(selection["history"]) == 2


def test_metrics_file_and_recommendations_agree_with_an_independent_computation(run, mini_dir):
    tmp, logs = run
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    recs = {}
    for line in (tmp / "run" / "recommendations.jsonl").read_text().splitlines():
        row = json.loads(line)
        recs[row["user"]] = row["items"]
    train = sp.load_npz(mini_dir / "train_matrix.npz").tocsr()
    assert sorted(recs) == list(range(train.shape[0]))
    for user, items in recs.items():
        assert len(items) == 100 == len(set(items))
        assert not set(items) & set(train.indices[train.indptr[user]:train.indptr[user + 1]].tolist())
    for split in ("val", "test"):
        expected = independent_metrics(recs, sp.load_npz(mini_dir / f"{split}_matrix.npz").tocsr())
        assert metrics[split]["users"] == expected["users"]
        for key in ("recall@20", "recall@40", "ndcg@100"):
            assert abs(metrics[split][key] - expected[key]) < 1e-6
    assert "EASE" in logs["evaluate"] and "popularity" in logs["evaluate"]


def test_fusion_with_ease_is_chosen_on_validation_and_its_recommendations_give_its_metrics(run, mini_dir):
    tmp, logs = run
    fusion = json.loads((tmp / "run" / "metrics.json").read_text())["ease_fusion"]
    sweep = {float(w): m for w, m in fusion["val_sweep"].items()}
    assert fusion["ease_weight"] == max(sweep, key=lambda w: sweep[w]["recall@20"])
    assert fusion["val"] == sweep[fusion["ease_weight"]] and fusion["selected_by"] == "val recall@20"
    recs = {}
    for line in (tmp / "run" / "recommendations_ease_fusion.jsonl").read_text().splitlines():
        row = json.loads(line)
        recs[row["user"]] = row["items"]
    for split in ("val", "test"):
        expected = independent_metrics(recs, sp.load_npz(mini_dir / f"{split}_matrix.npz").tocsr())
        for key in ("recall@20", "recall@40", "ndcg@100"):
            assert abs(fusion[split][key] - expected[key]) < 1e-6
    assert f"CLLM4Rec + EASE (weight {fusion['ease_weight']})" in logs["evaluate"]


def test_saved_adapters_and_tables_are_non_empty_and_load_without_deepspeed(run):
    tmp, _ = run
    for stage in ("pretrain", "finetune"):
        out = tmp / "run" / stage
        tables = load_file(str(out / "id_tables.safetensors"))
        hidden = json.loads((tmp / "tiny" / "config.json").read_text())["hidden_size"]
        assert tables["collab_user"].shape == tables["content_user"].shape == (88, hidden)
        assert tables["collab_item"].shape == tables["content_item"].shape == (500, hidden)
        assert not torch.equal(tables["collab_item"], tables["content_item"])
        for adapter in ("collab", "content"):
            weights = load_file(str(out / "adapters" / adapter / "adapter_model.safetensors"))
            assert weights and all(t.numel() > 0 for t in weights.values())
            base = AutoModelForCausalLM.from_pretrained(tmp / "tiny")
            peft = PeftModel.from_pretrained(base, out / "adapters" / adapter)
            loaded = {n: p for n, p in peft.named_parameters() if "lora_" in n}
            assert len(loaded) == len(weights)
            b_weights = [t for n, t in weights.items() if "lora_B" in n]
            assert any(t.abs().sum() > 0 for t in b_weights), "lora_B never trained (still zero)"


def test_two_adapters_differ_after_training(run):
    tmp, _ = run
    out = tmp / "run" / "finetune" / "adapters"
    a = load_file(str(out / "collab" / "adapter_model.safetensors"))
    b = load_file(str(out / "content" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite([t.sum().item() for t in a.values()]).all()


def test_export_then_recommend_without_deepspeed_equals_evaluate(run):
    """The bundle serves, in a process where DeepSpeed cannot even be imported, exactly the
    top-100 lists that the 2-rank evaluate stage wrote."""
    tmp, _ = run
    env = launcher_env()
    bundle = tmp / "bundle"
    subprocess.run(["cllm4rec", "export", "--from", str(tmp / "run" / "finetune"), "--output", str(bundle)],
                   check=True, env=env, capture_output=True, cwd=REPO)
    for name in ("id_tables.safetensors", "adapters/collab/adapter_config.json", "tokenizer/id_tokens.json",
                 "config.json", "train.npz"):
        assert (bundle / name).is_file(), name
    no_deepspeed = ("import sys; sys.modules['deepspeed'] = None; from trainer.cli import main; "
                    "main(sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", no_deepspeed, "recommend", "--bundle", str(bundle), "--users",
                           "all"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = done.stdout.splitlines()
    assert served == (tmp / "run" / "recommendations.jsonl").read_text().splitlines()
    some = subprocess.run([sys.executable, "-c", no_deepspeed, "recommend", "--bundle", str(bundle), "--users",
                           "40,3", "--k", "5"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert some.stdout.splitlines() == [json.dumps({"user": u, "items": json.loads(served[u])["items"][:5]})
                                        for u in (3, 40)]


def _recommendations(path) -> np.ndarray:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = np.full((len(rows), 100), -1, dtype=np.int64)
    for row in rows:
        out[row["user"], :len(row["items"])] = row["items"]
    return out


@pytest.fixture(scope="module")
def ensemble(run):
    """One evaluate of the pretrained state with the finetuned one as a second member."""
    tmp, _ = run
    return _launch("evaluate", [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}",
                                f"run.dir={tmp / 'ens'}", "evaluate.recommendations=true", "evaluate.baselines=false",
                                f"evaluate.checkpoint={tmp / 'run' / 'pretrain'}",
                                f"evaluate.ensemble=[{tmp / 'run' / 'finetune'}]"], launcher_env(NPROC="2"))


def test_ensemble_fuses_the_members_rankings_and_keeps_the_model_row(run, ensemble, mini_dir):
    """The ensemble's own list is the pretrained model's alone, and its ensemble list equals the
    equal-weight fusion of that list with the finetuned model's (written by the run's own evaluate)."""
    from trainer.baselines import fuse_ensemble

    tmp, _ = run
    log = ensemble
    train = sp.load_npz(mini_dir / "train_matrix.npz").tocsr()
    members = [_recommendations(tmp / "ens" / "recommendations.jsonl"), _recommendations(tmp / "run" / "recommendations.jsonl")]
    fused = _recommendations(tmp / "ens" / "recommendations_ensemble.jsonl")
    np.testing.assert_array_equal(fused, fuse_ensemble(members, train, 100))
    assert not np.array_equal(fused, members[0]) and not np.array_equal(fused, members[1])
    metrics = json.loads((tmp / "ens" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(tmp / "run" / "pretrain")
    recs = {user: [int(i) for i in row if i >= 0] for user, row in enumerate(fused)}
    for split in ("val", "test"):
        expected = independent_metrics(recs, sp.load_npz(mini_dir / f"{split}_matrix.npz").tocsr())
        for key in ("recall@20", "recall@40", "ndcg@100"):
            assert abs(metrics["ensemble"][split][key] - expected[key]) < 1e-6
    assert "CLLM4Rec ensemble of 2" in log


def test_recommend_serves_the_ensemble_of_bundles_as_evaluate_fused_it(run, ensemble):
    """`recommend` with the pretrained and the finetuned model's bundles prints the ensemble's
    lists of the 2-rank evaluate; a bundle trained on other data is refused, naming it."""
    tmp, _ = run
    env = launcher_env()
    bundles = [tmp / "bundle-pretrain", tmp / "bundle-finetune"]
    for stage, bundle in zip(("pretrain", "finetune"), bundles):
        subprocess.run(["cllm4rec", "export", "--from", str(tmp / "run" / stage), "--output", str(bundle),
                        "--overwrite"], check=True, env=env, capture_output=True, cwd=REPO)
    served = subprocess.run(["cllm4rec", "recommend", "--bundle", str(bundles[0]), "--bundle", str(bundles[1]),
                             "--users", "all"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.splitlines() == (tmp / "ens" / "recommendations_ensemble.jsonl").read_text().splitlines()

    other = tmp / "bundle-other-data"
    shutil.copytree(bundles[1], other, dirs_exist_ok=True)
    train = sp.load_npz(other / "train.npz").tolil()
    train[0, train.rows[0][0]] = 0
    sp.save_npz(other / "train.npz", train.tocsr())
    from trainer.serve import Recommender

    with pytest.raises(ValueError, match=re.escape(f"{other} was trained on other train data")):
        Recommender(bundles[0], members=[other])
