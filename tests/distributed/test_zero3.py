"""ZeRO-3 across ranks and nodes, through the launch scripts.

For the same seed and global batch, 1 rank, 2 ranks and 2 "nodes" (two no_ssh launcher
invocations with one rank each) train the same model: pretraining (both models, mutual
regularization) and finetuning. The saved adapters load into a plain PEFT model.
"""
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from data_shards.build import build_shards
from data_shards.sources import load_cllm4rec
from data_shards.synthetic import write_synthetic_cllm4rec
from tests.conftest import REPO
from tests.helpers import launcher_env, write_tiny_checkpoint
from trainer.distributed import free_port

pytestmark = pytest.mark.slow

GLOBAL = {"pretrain.collab_batch_size": 8, "pretrain.content_batch_size": 16, "finetune.batch_size": 8,
          "finetune.content_batch_size": 16}
SAVED = ["id_tables.safetensors", "adapters/collab/adapter_model.safetensors",
         "adapters/content/adapter_model.safetensors"]


def _overrides(tmp, run_dir, world):
    per_rank = [f"{key}={size // world}" for key, size in GLOBAL.items()]
    return [f"model.base_dir={tmp / 'tiny'}", f"data.shards={tmp / 'shards'}", f"run.dir={run_dir}",
            f"run.deepspeed={REPO / 'configs' / 'ds_zero3.json'}",
            # Capped below the epoch's end, where an odd remainder would make one document sit out
            # on 2 ranks only (see data_shards/reader.py).
            "pretrain.max_steps_per_epoch=12", "finetune.max_steps_per_epoch=12",

            "pretrain.content_warmup_epochs=1", "pretrain.rounds=1", "finetune.epochs=2",
            "finetune.content_epochs=true", "lora.dropout=0.0", "data.max_text_tokens=24", "run.log_every=1000",
            # Adam's first step on an element is lr * g / (|g| + eps): with the default eps = 1e-8 an
            # element whose gradient happens to be ~1e-8 (there is one in content_user and one in a
            # content LoRA A here) turns the ranks' ~1e-9 float32 rounding into ~5e-5 of weight, with the
            # chunked or the naive vocabulary loss alike. eps = 1e-5 bounds that gain to lr / (4 eps) = 25.
            "pretrain.adam_eps=1e-5", "finetune.adam_eps=1e-5",
            *per_rank]


def _launch(stage, tmp, run_dir, ranks, *options, world=None, cwd=REPO, **env):
    """`ranks` on this node, of a job of `world` ranks (default: this node's)."""
    cmd = ["bash", str(REPO / "launch" / f"{stage}.sh"), *options, str(REPO / "configs" / "quickstart.yaml"),
           *_overrides(tmp, run_dir, world or ranks)]
    return subprocess.Popen(cmd, cwd=cwd, env=launcher_env(NPROC=str(ranks), **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, what):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{what} failed:\n{out[-4000:]}"
    return out


def _losses(run_dir, stage):
    return [r["loss"] for r in map(json.loads, (run_dir / stage / "train_log.jsonl").read_text().splitlines())]


def _weights(run_dir, stage):
    return {f"{name}:{key}": t for name in SAVED for key, t in load_file(run_dir / stage / name).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    src = write_synthetic_cllm4rec(tmp / "syn", num_users=60, num_items=40, num_clusters=3, seed=3)
    build_shards(load_cllm4rec(src), tmp / "shards", docs_per_shard=23)
    write_tiny_checkpoint(tmp / "tiny")
    outputs = {}
    for name, ranks in (("one_rank", 1), ("two_ranks", 2)):
        for stage in ("pretrain", "finetune"):
            outputs[name, stage] = _finish(_launch(stage, tmp, tmp / name, ranks), f"{name} {stage}")
    # Two nodes of one rank each, started separately as on a cluster without ssh: a hostfile
    # naming both, the same master address and port, and each its own node rank and folder.
    # One core each, like the 2-rank job's ranks: other thread counts round matmuls differently.
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        cwd = tmp / f"node{node_rank}"
        cwd.mkdir()
        nodes.append(_launch("pretrain", tmp, tmp / "two_nodes", 1, "--hostfile", str(hostfile), "--no_ssh",
                             "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port,
                             world=2, cwd=cwd, OMP_NUM_THREADS="1"))
    for node_rank, proc in enumerate(nodes):
        outputs["two_nodes", f"node{node_rank}"] = _finish(proc, f"node {node_rank}")
    return tmp, outputs


def _assert_close(a, b, rel, what):
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} steps"
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= rel * max(abs(x), abs(y)), f"{what}: step {step}: {x} vs {y}"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_one_rank_and_two_ranks_train_the_same_model(runs, stage):
    tmp, _ = runs
    one, two = _losses(tmp / "one_rank", stage), _losses(tmp / "two_ranks", stage)
    assert len(one) >= 20
    _assert_close(one, two, 1e-5, f"{stage} losses")
    w1, w2 = _weights(tmp / "one_rank", stage), _weights(tmp / "two_ranks", stage)
    assert w1.keys() == w2.keys() and len(w1) > 4
    for key in w1:
        assert w1[key].numel() > 0, f"{key} was saved empty"
        diff = (w1[key] - w2[key]).abs().max().item()
        # Losses agree to about 1e-7 relative, weights to about 1e-6 (adam_eps above).
        assert diff <= 1e-5, f"{stage} {key} differs by {diff:.2e}"
    if stage == "finetune":
        picked = [json.loads((tmp / run / "finetune" / "selection.json").read_text()) for run in ("one_rank", "two_ranks")]
        assert picked[0]["best"]["epoch"] == picked[1]["best"]["epoch"]


def test_two_no_ssh_nodes_are_one_two_rank_job(runs):
    tmp, outputs = runs
    assert "pretrain on 2 rank(s)" in outputs["two_nodes", "node0"]
    _assert_close(_losses(tmp / "two_ranks", "pretrain"), _losses(tmp / "two_nodes", "pretrain"), 1e-6,
                  "2 nodes vs 2 ranks")
    ranks, nodes = _weights(tmp / "two_ranks", "pretrain"), _weights(tmp / "two_nodes", "pretrain")
    assert all(torch.allclose(ranks[k], nodes[k], rtol=0, atol=1e-6) for k in ranks)
    env_file = (tmp / "node1" / ".deepspeed_env").read_text()
    assert "MASTER_ADDR=127.0.0.1" in env_file and "PATH=" in env_file


def test_saved_adapters_load_into_plain_peft_without_deepspeed(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _ = runs
    stage_dir = tmp / "two_ranks" / "finetune"
    base = AutoModelForCausalLM.from_pretrained(tmp / "tiny")
    model = PeftModel.from_pretrained(base, stage_dir / "adapters" / "collab", adapter_name="collab")
    model.load_adapter(stage_dir / "adapters" / "content", adapter_name="content")
    saved = load_file(stage_dir / "adapters" / "collab" / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if ".collab." in n}
    assert saved and all(t.numel() > 0 for t in saved.values())
    assert len(loaded) == len(saved)
    for name, tensor in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".collab", "").endswith(name.removeprefix("base_model."))]
        assert len(match) == 1 and torch.equal(match[0].detach(), tensor), name


def test_partitioned_loading_and_qlora_on_two_ranks(tmp_path):
    """Each rank reads only its slices of a sharded checkpoint, and they gather back to the
    weights on disk; a 4-bit nf4 base with LoRA + ID tables trains under ZeRO-3; a ZeRO-2
    checkpoint with one model not yet stepped saves on both ranks."""
    src = write_synthetic_cllm4rec(tmp_path / "syn", num_users=40, num_items=30, seed=1)
    build_shards(load_cllm4rec(src), tmp_path / "shards")
    base = write_tiny_checkpoint(tmp_path / "tiny")
    assert (base / "model.safetensors.index.json").is_file()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "tests/distributed/partitioned_load.py", str(base), str(tmp_path / "shards"), str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PARTITIONED LOAD OK" in done.stdout and "QLORA ZERO-3 OK" in done.stdout
    assert "ZERO-2 CHECKPOINT OK" in done.stdout
