"""Bases whose vocabulary head is their input embedding (tied: LLaMA-3.2, Qwen2.5, Gemma, SmolLM
store no `lm_head.weight`) load on every path, and the real pretrained SmolLM2-135M runs every
stage."""
import json
import subprocess

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.conftest import REPO
from tests.helpers import launcher_env, tiny_tokenizer, write_tiny_checkpoint
from trainer.backbone import load_backbone, write_tiny_llama
from trainer.distributed import free_port, init_distributed
from trainer.engine import load_ds_config


def _tiny_qwen2(out):
    """A tied Qwen2 (biases on q/k/v), another family than LLaMA."""
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(out, max_shard_size="100KB")
    tok.save_pretrained(out)
    return out


def _launch_tied_load(*base_dirs, timeout=600):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "tests/distributed/tied_load.py", *map(str, base_dirs)]
    done = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_tied_bases_load_partitioned_on_two_ranks_as_transformers_loads_them(tmp_path):
    llama = write_tiny_llama(str(tmp_path / "llama"), tiny_tokenizer(), max_shard_size="100KB",
                             tie_word_embeddings=True)
    assert "lm_head.weight" not in json.loads((llama / "model.safetensors.index.json").read_text())["weight_map"]
    qwen = _tiny_qwen2(tmp_path / "qwen2")
    out = _launch_tied_load(llama, qwen)
    assert out.count("TIED LOAD OK") == 2 and "tied=True" in out


def _untie(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))


def test_an_untied_base_without_its_head_is_an_error_on_every_path(tmp_path):
    tied = write_tiny_llama(str(tmp_path / "tied"), tiny_tokenizer(), tie_word_embeddings=True)
    _untie(tied)
    with pytest.raises(KeyError, match=r"lacks 1 weight.*lm_head.*tie_word_embeddings: false"):
        load_backbone(str(tied), "sdpa")  # without DeepSpeed (export, recommend) and ZeRO-2
    init_distributed()
    ds_config = load_ds_config(str(REPO / "configs" / "ds_zero3.json"), 1)
    with pytest.raises(KeyError, match=r"lacks 1 weight.*lm_head.*tie_word_embeddings: false"):
        load_backbone(str(tied), "sdpa", zero3_config=ds_config)


def test_tied_base_without_deepspeed_uses_the_input_embedding_as_head(tmp_path):
    tied = write_tiny_llama(str(tmp_path / "tied"), tiny_tokenizer(), tie_word_embeddings=True)
    model, _ = load_backbone(str(tied), "sdpa")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    untied = write_tiny_checkpoint(tmp_path / "untied")
    model, _ = load_backbone(str(untied), "sdpa")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


@pytest.mark.slow
def test_smollm2_loads_partitioned_and_its_loss_equals_transformers(smollm2_dir):
    out = _launch_tied_load(smollm2_dir)
    assert "TIED LOAD OK" in out and "tied=True" in out


@pytest.mark.slow
def test_every_stage_runs_under_every_cpu_deepspeed_config(tmp_path):
    """ds_zero3 runs every stage in tests/launch/test_end_to_end.py; here ZeRO-2 (evaluation included,
    which has no optimizer), the low-memory ZeRO-3 and ZeRO-3 in bf16, on a tied base; then
    export and recommend from each run."""
    from data_shards.build import main_build
    from data_shards.synthetic import write_synthetic_cllm4rec
    from trainer.serve import Recommender, export

    data = write_synthetic_cllm4rec(tmp_path / "data", num_users=40, num_items=30, seed=1)
    main_build(data, tmp_path / "shards")
    base = write_tiny_llama(str(tmp_path / "tied"), tiny_tokenizer(), max_shard_size="100KB", tie_word_embeddings=True)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "tests/distributed/every_config.py", str(base), str(tmp_path / "shards"), str(tmp_path / "runs")]
    done = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("ds_zero2", "ds_zero3_lowmem", "ds_zero3_bf16"):
        assert f"CONFIG OK {name}" in done.stdout, done.stdout[-3000:]
        run = tmp_path / "runs" / name
        assert json.loads((run / "metrics.json").read_text())["test"]["users"] > 0
        bundle = export(run / "finetune", tmp_path / "bundles" / name)
        served = Recommender(bundle).for_users(list(range(40)), k=100)
        written = [json.loads(line)["items"] for line in (run / "recommendations.jsonl").read_text().splitlines()]
        assert all(served[u] and set(served[u]) <= set(range(30)) for u in range(40))
        if name != "ds_zero3_bf16":  # evaluate ranked in bf16 there; the bundle serves in fp32
            assert [served[u] for u in range(40)] == written, name


@pytest.mark.slow
def test_smollm2_every_stage_on_two_ranks_then_export_and_recommend(smollm2_dir, mini_dir, tmp_path):
    """The real pretrained base through launch/ with its quick-start config (ZeRO-3), steps capped;
    the bundle then serves, without DeepSpeed, exactly the evaluate stage's recommendations."""
    import sys

    import scipy.sparse as sp

    from tests.helpers import independent_metrics

    env = launcher_env(NPROC="2")
    subprocess.run(["cllm4rec", "build-shards", "--input", str(mini_dir), "--output", str(tmp_path / "shards")],
                   check=True, env=env, capture_output=True)
    overrides = [f"model.base_dir={smollm2_dir}", f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}",
                 "pretrain.max_steps_per_epoch=1", "finetune.epochs=1", "finetune.max_steps_per_epoch=1",
                 "data.max_text_tokens=32", "evaluate.baselines=false"]
    for stage in ("pretrain", "finetune", "evaluate"):
        done = subprocess.run(["bash", f"launch/{stage}.sh", "configs/smollm2_mini.yaml", *overrides], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "vocabulary head: the input embedding (tied embeddings)" in done.stdout + done.stderr
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < loss < 1e4 for loss in losses)
    metrics = json.loads((run / "metrics.json").read_text())
    recs = {row["user"]: row["items"] for row in map(json.loads, (run / "recommendations.jsonl").read_text().splitlines())}
    expected = independent_metrics(recs, sp.load_npz(mini_dir / "test_matrix.npz").tocsr())
    assert abs(metrics["test"]["recall@20"] - expected["recall@20"]) < 1e-6
    subprocess.run(["cllm4rec", "export", "--from", str(run / "finetune"), "--output", str(tmp_path / "bundle")],
                   check=True, env=env, capture_output=True, cwd=REPO)
    served = subprocess.run([sys.executable, "-m", "trainer.cli", "recommend", "--bundle", str(tmp_path / "bundle"),
                             "--users", "all"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.splitlines() == (run / "recommendations.jsonl").read_text().splitlines()
