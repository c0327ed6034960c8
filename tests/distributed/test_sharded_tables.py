"""Row-sharded ID tables (model/sharded_tables.py) on 2 gloo ranks, against the full table on one."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import sharded_tables
from model.sharded_tables import ShardedIDTable, blocked_top, init_rows, pad_ids, row_range
from trainer.distributed import free_port, run_gloo_ranks


def full_table(name, rows, dim, seed=0):
    return init_rows(name, rows, dim, 0, rows, 0.02, seed).requires_grad_()


def dense_grad(table: ShardedIDTable) -> torch.Tensor:
    grad = table.shard.grad
    return torch.zeros_like(table.shard) if grad is None else (grad.to_dense() if grad.is_sparse else grad)


# ------------------------------------------------------------------ creation


@pytest.mark.parametrize("rows,world", [(10, 1), (10, 2), (7, 3), (2, 3), (100_000, 4)])
def test_rows_split_contiguously_and_values_do_not_depend_on_the_world_size(rows, world):
    ranges = [row_range(rows, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    full = init_rows("collab_item", rows, 48, 0, rows, 0.02, seed=3)
    pieces = torch.cat([init_rows("collab_item", rows, 48, s, e, 0.02, seed=3) for s, e in ranges])
    assert torch.equal(full, pieces)
    assert not torch.equal(full, init_rows("content_item", rows, 48, 0, rows, 0.02, seed=3))
    assert not torch.equal(full, init_rows("collab_item", rows, 48, 0, rows, 0.02, seed=4))


def test_a_table_is_drawn_in_blocks_so_a_range_past_one_block_is_the_same_from_anywhere():
    rows, dim = 3 * (1 << 22) // 64 + 5, 64  # three blocks and a bit
    middle = init_rows("collab_user", rows, dim, 60_000, 140_000, 0.02, seed=0)
    assert torch.equal(middle[5_000:6_000], init_rows("collab_user", rows, dim, 65_000, 66_000, 0.02, seed=0))
    assert abs(float(middle.std()) - 0.02) < 1e-3


# ------------------------------------------------------------------ lookups


def _lookup(rank, world, rows, ids_per_rank):
    torch.manual_seed(0)
    table = ShardedIDTable("collab_user", rows, 8, 0.02, seed=1)
    ids = ids_per_rank[rank]
    out = table(ids)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank))
    (out * weights).sum().backward()
    return {"out": out.detach(), "weights": weights, "range": (table.start, table.end), "grad": dense_grad(table)}


@pytest.mark.parametrize("rows,ids_per_rank", [
    (9, [torch.tensor([0, 8, 8, 3, 4, 4]), torch.tensor([[1, 1], [8, 0]])]),  # duplicates, other rank's rows, 2-D
    (9, [torch.tensor([2, 7, 7]), torch.tensor([], dtype=torch.long)]),  # a rank with no ids
    (1, [torch.tensor([0, 0]), torch.tensor([0])]),  # fewer rows than ranks: rank 1 owns none
])
def test_lookups_and_their_gradients_equal_f_embedding(rows, ids_per_rank):
    results = run_gloo_ranks(2, _lookup, rows, ids_per_rank)
    full = full_table("collab_user", rows, 8, seed=1)
    expected_grad = torch.zeros(rows, 8)
    for rank, result in enumerate(results):
        expected = F.embedding(ids_per_rank[rank], full)
        assert torch.equal(result["out"], expected.detach())
        expected_grad += torch.autograd.grad((expected * result["weights"]).sum(), full)[0]
    got = torch.cat([r["grad"] for r in results])
    assert [r["range"] for r in results] == [row_range(rows, 0, 2), row_range(rows, 1, 2)]
    assert torch.allclose(got, expected_grad, atol=1e-6)


# ------------------------------------------------------------------ the item head


def _nll(rank, world, rows, dim, hidden, targets, blocks):
    sharded_tables.LOGIT_ELEMENTS, sharded_tables.ROW_BLOCK = blocks
    table = ShardedIDTable("collab_item", rows, dim, 0.02, seed=2)
    h = hidden[rank].clone().requires_grad_()
    queries, items, weights = targets[rank]
    losses = table(hidden=h, targets={"queries": queries, "items": items, "weights": weights})
    (losses * torch.arange(1, len(losses) + 1)).sum().backward()
    return {"losses": losses.detach(), "hidden_grad": h.grad, "grad": dense_grad(table)}


def test_vocab_parallel_cross_entropy_equals_the_full_softmax():
    rows, dim = 11, 6
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(5, dim, generator=gen), torch.randn(3, dim, generator=gen)]
    # rank 0: one target per position (the collaborative LM); rank 1: multi-hot targets (the rec head)
    targets = [(torch.arange(5), torch.tensor([0, 10, 5, 5, 6]), torch.ones(5)),
               (torch.tensor([0, 0, 0, 2]), torch.tensor([1, 9, 10, 3]), torch.ones(4))]
    results = run_gloo_ranks(2, _nll, rows, dim, hidden, targets, (4, 2))  # blocks of 2 queries x 2 rows
    full = full_table("collab_item", rows, dim, seed=2)
    expected_grad = torch.zeros(rows, dim)
    for rank, result in enumerate(results):
        h = hidden[rank].clone().requires_grad_()
        logp = F.log_softmax(h @ full.t(), dim=-1)
        queries, items, weights = targets[rank]
        losses = -torch.zeros(len(h)).index_add(0, queries, logp[queries, items] * weights)
        if rank == 0:
            assert torch.allclose(losses, F.cross_entropy(h @ full.t(), items, reduction="none"), atol=1e-6)
        assert torch.allclose(result["losses"], losses.detach(), atol=1e-5)
        hidden_grad, table_grad = torch.autograd.grad((losses * torch.arange(1, len(h) + 1)).sum(), [h, full])
        assert torch.allclose(result["hidden_grad"], hidden_grad, atol=1e-5)
        expected_grad += table_grad
    assert torch.allclose(torch.cat([r["grad"] for r in results]), expected_grad, atol=1e-5)


def test_vocab_parallel_cross_entropy_with_a_rank_that_has_no_positions():
    rows, dim = 5, 4
    hidden = [torch.randn(3, dim), torch.zeros(0, dim)]
    targets = [(torch.arange(3), torch.tensor([4, 0, 2]), torch.ones(3)),
               (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))]
    results = run_gloo_ranks(2, _nll, rows, dim, hidden, targets, (1 << 22, 1 << 16))
    full = full_table("collab_item", rows, dim, seed=2)
    h = hidden[0].clone().requires_grad_()
    losses = F.cross_entropy(h @ full.t(), targets[0][1], reduction="none")
    assert torch.allclose(results[0]["losses"], losses.detach(), atol=1e-5)
    assert results[1]["losses"].shape == (0,)
    table_grad = torch.autograd.grad((losses * torch.arange(1, 4)).sum(), full)[0]
    assert torch.allclose(torch.cat([r["grad"] for r in results]), table_grad, atol=1e-5)


# ------------------------------------------------------------------ top-k


def _top(rank, world, rows, dim, hidden, exclusions, k, block, table_values):
    table = ShardedIDTable("collab_item", rows, dim, 0.02, seed=0)
    with torch.no_grad():
        table.shard.copy_(table_values[table.start:table.end])
    exclude_rows, exclude_cols = exclusions[rank]
    return table(hidden=hidden[rank], top_k={"k": k, "block": block, "exclude_rows": exclude_rows,
                                             "exclude_cols": exclude_cols})


@pytest.mark.parametrize("rows,k,block", [(13, 5, 3), (13, 5, 0), (4, 6, 2)])
def test_distributed_top_k_equals_the_full_ranking_ties_and_exclusions_included(rows, k, block):
    dim = 3
    # Small integers: every score is exact, so equal rows tie exactly on every rank.
    values = torch.randint(-2, 3, (rows, dim)).float()
    values[rows - 1] = values[0]
    values[rows // 2] = values[0]
    hidden = [torch.randint(-2, 3, (4, dim)).float(), torch.randint(-2, 3, (2, dim)).float()]
    exclusions = [(torch.tensor([0, 0, 3]), torch.tensor([0, rows - 1, 2])), (torch.tensor([1]), torch.tensor([1]))]
    results = run_gloo_ranks(2, _top, rows, dim, hidden, exclusions, k, block, values)
    for rank, got in enumerate(results):
        _, expected = blocked_top(hidden[rank], values, k, *exclusions[rank], block=block)
        assert torch.equal(got, pad_ids(expected, k)), (rank, got, expected)
        scores = hidden[rank] @ values.t()
        scores[exclusions[rank]] = float("-inf")
        by_id = [sorted(range(rows), key=lambda j: (-float(scores[q, j]), j))[:k] for q in range(len(scores))]
        assert got[:, :min(k, rows)].tolist() == by_id


# ------------------------------------------------------------------ memory and traffic


class LargestTensor(TorchDispatchMode):
    """The most bytes of any tensor an operator returned while active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self.most = max(self.most, t.numel() * t.element_size())
        return out


def _step(rank, world, rows, dim, folder):
    from trainer.optim import ShardAdam
    from trainer.table_shards import export_tables, load_shards, save_shards

    table = ShardedIDTable("collab_item", rows, dim, 0.02, seed=0)
    optimizer = ShardAdam({"collab_item": table}, lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    # the same ids, duplicates and owners at both sizes: the first and the last rows
    ids = torch.cat([torch.arange(20 + rank), rows - 1 - torch.arange(40), torch.tensor([3, 3])])
    hidden = torch.randn(16, dim, generator=gen, requires_grad=True)
    targets = {"queries": torch.arange(16), "items": torch.cat([torch.arange(8), rows - 1 - torch.arange(8)]),
               "weights": torch.ones(16)}
    before = table.comm.bytes_sent
    with LargestTensor() as largest:
        loss = table(ids).pow(2).sum() + table(hidden=hidden, targets=targets).sum()
        loss.backward()
        optimizer.step()
        sent = table.comm.bytes_sent - before
        save_shards({"collab_item": table}, optimizer, folder, rank)
        export_tables({"collab_item": table}, folder / "id_tables.safetensors", rank)
        load_shards({"collab_item": table}, optimizer, folder)
    return {"bytes": sent, "largest": largest.most, "shard": table.shard.numel() * 4}


def test_no_tensor_is_table_sized_and_the_traffic_does_not_grow_with_the_rows(tmp_path):
    """Forward, backward, the optimizer step, a checkpoint save and load, and the export."""
    small, large = (run_gloo_ranks(2, _step, rows, 4, tmp_path / str(rows)) for rows in (1_000, 4_000_000))
    for rank in range(2):
        assert small[rank]["bytes"] == large[rank]["bytes"] > 0
        # the shard (its gradient, its Adam moments) or one block of item scores is the largest thing
        assert large[rank]["largest"] <= max(large[rank]["shard"], sharded_tables.LOGIT_ELEMENTS * 4) + 4096
        assert large[rank]["largest"] < 4_000_000 * 4 * 4  # the whole table


# ------------------------------------------------------------------ end to end, against dense tables under ZeRO-3


@pytest.fixture(scope="module")
def sharded_steps(tmp_path_factory):
    """tests/distributed/sharded_steps.py on 1 and on 2 ranks: {(mode, tables, world): saved}."""
    import subprocess

    from data_shards.build import main_build
    from data_shards.synthetic import write_synthetic_cllm4rec
    from tests.conftest import REPO
    from tests.helpers import launcher_env, write_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("sharded")
    main_build(write_synthetic_cllm4rec(tmp / "data", num_users=40, num_items=30, seed=1), tmp / "shards")
    base = write_tiny_checkpoint(tmp / "tiny")
    for world in (1, 2):
        cmd = ["deepspeed", "--num_gpus", str(world), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "tests/distributed/sharded_steps.py", str(base), str(tmp / "shards"), str(tmp)]
        done = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "SHARDED STEPS OK" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    return {(mode, tables, world): torch.load(tmp / f"{mode}-{tables}-w{world}.pt")
            for mode in ("lora", "paper") for tables in ("dense", "sharded") for world in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "paper"])
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_tables_train_as_dense_tables_under_zero3(sharded_steps, mode, world):
    """Alternating content, collab and rec steps (the inactive model and the frozen base are checked
    bitwise after every step inside the script): losses and final tables within 1e-5."""
    dense, sharded = sharded_steps[(mode, "dense", world)], sharded_steps[(mode, "sharded", world)]
    assert len(dense["losses"]) == len(sharded["losses"]) == 6
    for a, b in zip(dense["losses"], sharded["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (dense["losses"], sharded["losses"])
    for name, table in dense["tables"].items():
        assert torch.allclose(sharded["tables"][name], table, atol=1e-5, rtol=0), name


@pytest.mark.slow
def test_sharded_tables_give_the_same_model_on_one_and_two_ranks(sharded_steps):
    one, two = sharded_steps[("lora", "sharded", 1)], sharded_steps[("lora", "sharded", 2)]
    for name, table in one["tables"].items():
        assert torch.allclose(two["tables"][name], table, atol=1e-5, rtol=0), name


def _export(rank, world, rows, folder):
    from trainer.table_shards import export_tables, load_table_rows

    tables = {name: ShardedIDTable(name, rows, 3, 0.02, seed=5) for name in ("collab_user", "collab_item")}
    export_tables(tables, folder / "id_tables.safetensors", rank)
    for table in tables.values():
        with torch.no_grad():
            table.shard.zero_()
    dist.barrier()
    load_table_rows(tables, folder / "id_tables.safetensors")
    return {name: table.shard.detach() for name, table in tables.items()}


@pytest.mark.parametrize("rows", [7, 1])
def test_the_streamed_export_is_a_plain_safetensors_file_of_the_whole_tables(tmp_path, rows):
    from safetensors.torch import load_file

    results = run_gloo_ranks(2, _export, rows, tmp_path)
    saved = load_file(tmp_path / "id_tables.safetensors")
    for name in ("collab_user", "collab_item"):
        assert torch.equal(saved[name], init_rows(name, rows, 3, 0, rows, 0.02, seed=5))
        assert torch.equal(torch.cat([r[name] for r in results]), saved[name])  # each rank read its own rows back
