"""The ablation bench's arithmetic and the switches it turns: mean ± std against a hand-computed
case, the no-content plan, and a random base with a real base's architecture and tokenizer."""
import importlib.util
import json

import pytest
import torch

from tests.conftest import REPO
from tests.helpers import tiny_tokenizer
from trainer.backbone import load_tokenizer, write_random_like, write_tiny_llama
from trainer.pretrain import epoch_plan


def _bench():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(r20, wall):
    metrics = {"recall@20": r20, "recall@40": 2 * r20, "ndcg@100": r20 / 2, "users": 10}
    return {"val": metrics, "test": metrics, "wall_s": wall}


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path, monkeypatch):
    bench = _bench()
    rows = bench.summarize({"default": [_run(0.1, 100), _run(0.2, 110), _run(0.3, 120)], "paper-mode": [_run(0.4, 50)]})
    default = rows[0]
    assert default["seeds"] == 3
    assert default["test recall@20"] == pytest.approx((0.2, 0.1))  # stdev of 0.1, 0.2, 0.3 (n - 1)
    assert default["val recall@40"] == pytest.approx((0.4, 0.2))
    assert default["wall_s"] == pytest.approx((110, 10))
    assert rows[1]["test ndcg@100"] == pytest.approx((0.2, 0.0))
    monkeypatch.setattr(bench, "_plot", lambda *a: None)
    baseline = {"popularity": {"val": _run(0.05, 0)["val"], "test": _run(0.05, 0)["test"]}}
    bench.write_report(tmp_path, "mini", rows, baseline)
    table = (tmp_path / "ablation.md").read_text()
    assert "| default |" in table and "0.2000 ± 0.1000" in table and "| popularity |" in table
    lines = (tmp_path / "ablation.csv").read_text().splitlines()
    assert lines[1].startswith("default,3,") and len(lines) == 4


def test_no_content_model_trains_the_collaborative_model_alone():
    assert epoch_plan(1, 2) == ["content", "collab", "content", "collab", "content"]
    assert epoch_plan(1, 2, content=False) == ["collab", "collab"]


def test_random_like_base_keeps_architecture_and_tokenizer(tmp_path):
    source = write_tiny_llama(str(tmp_path / "src"), tiny_tokenizer(), tie_word_embeddings=True)
    out = write_random_like(str(source), str(tmp_path / "random"), seed=3)
    a, b = (json.loads((p / "config.json").read_text()) for p in (source, out))
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert a[key] == b[key], key
    assert load_tokenizer(str(out))("great shampoo").input_ids == load_tokenizer(str(source))("great shampoo").input_ids
    from safetensors.torch import load_file

    w_src, w_out = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert w_src.keys() == w_out.keys()
    assert not torch.equal(w_src["model.embed_tokens.weight"], w_out["model.embed_tokens.weight"])


def test_evaluation_only_variant_evaluates_the_trained_model_and_reports_the_fusion(tmp_path, monkeypatch):
    bench = _bench()
    trained, run_dir = tmp_path / "default" / "seed-0", tmp_path / "ease-fusion" / "seed-0"
    with pytest.raises(SystemExit, match="not finished; run that variant first"):
        bench.run_one("configs/smollm2_mini.yaml", run_dir, [], trained_in=trained)
    for stage, wall in (("pretrain", 100.0), ("finetune", 50.0)):
        (trained / stage).mkdir(parents=True)
        (trained / stage / "resources.json").write_text(json.dumps({"wall_s": wall}))
    launched = []

    def fake_stage(cmd, **kwargs):
        launched.append(cmd)
        (run_dir / "evaluate").mkdir(parents=True)
        (run_dir / "evaluate" / "resources.json").write_text(json.dumps({"wall_s": 7.0}))
        fusion = {"val": _run(0.3, 0)["val"], "test": _run(0.4, 0)["test"]}
        (run_dir / "metrics.json").write_text(json.dumps({**_run(0.1, 0), "ease_fusion": fusion}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(bench.subprocess, "run", fake_stage)
    result = bench.run_one("configs/smollm2_mini.yaml", run_dir, ["evaluate.ease_fusion=true"], trained_in=trained,
                           reported="ease_fusion")
    assert [cmd[1] for cmd in launched] == ["launch/evaluate.sh"]
    assert f"evaluate.checkpoint={trained / 'finetune'}" in launched[0]
    assert result["test"]["recall@20"] == 0.4 and result["val"]["recall@20"] == 0.3 and result["wall_s"] == 157.0


def test_ensemble_variant_names_its_members_and_counts_their_training_time(tmp_path, monkeypatch):
    bench = _bench()
    trained, member, run_dir = (tmp_path / "default" / "seed-0", tmp_path / "default" / "seed-1",
                                tmp_path / "ensemble" / "seed-0")
    for run in (trained, member):
        for stage, wall in (("pretrain", 100.0), ("finetune", 50.0)):
            (run / stage).mkdir(parents=True)
            (run / stage / "resources.json").write_text(json.dumps({"wall_s": wall}))
    with pytest.raises(SystemExit, match="seed-2, which is not finished"):
        bench.run_one("configs/smollm2_mini.yaml", run_dir, [], trained_in=trained,
                      members=(tmp_path / "default" / "seed-2",))
    launched = []

    def fake_stage(cmd, **kwargs):
        launched.append(cmd)
        (run_dir / "evaluate").mkdir(parents=True)
        (run_dir / "evaluate" / "resources.json").write_text(json.dumps({"wall_s": 7.0}))
        (run_dir / "metrics.json").write_text(json.dumps({**_run(0.1, 0), "ensemble": _run(0.2, 0)}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(bench.subprocess, "run", fake_stage)
    result = bench.run_one("configs/smollm2_mini.yaml", run_dir, [], trained_in=trained, reported="ensemble",
                           members=(member,))
    assert f"evaluate.ensemble=[{member / 'finetune'}]" in launched[0]
    assert result["test"]["recall@20"] == 0.2 and result["wall_s"] == 307.0
