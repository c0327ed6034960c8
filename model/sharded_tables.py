"""Row-sharded ID tables: every rank owns a contiguous range of each table's rows.

Why not ZeRO-3: ZeRO-3 gathers a module's whole parameter before its forward and again for its
backward, and reduce-scatters its full gradient, so a table costs table-sized traffic and
temporaries on every rank at every call, however many ranks there are. Here the rows stay where
they live: a lookup sends the step's distinct ids to their owners and the rows back
(all-to-all), the tied item head scores every rank's positions against each rank's own rows
(vocabulary-parallel, as Megatron's cross-entropy) and the top-k is merged from per-shard
top-k lists. Why not TorchRec's row-wise EmbeddingCollection: its CPU kernels have no fused
Adam with dense semantics, it has no tied item head, and its model wrapper expects to own the
parameters and gradients that DeepSpeed owns here. So the shard is a plain tensor of the table
module (not an nn.Parameter, which ZeRO would partition and gather), its optimizer is
trainer.optim.ShardAdam, and the collectives are plain torch.distributed calls on a group of
their own, so their order never interleaves with ZeRO's.

Traffic per step depends on the step's ids and positions only, never on the number of rows.
No rank builds a whole table: rows are created in fixed seeded blocks (init_rows), which also
makes the values the same on any number of ranks.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

INIT_BLOCK_ELEMENTS = 1 << 22  # rows are drawn in blocks of about this many numbers (16 MB in fp32)


def row_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, end) that `rank` owns: the first num_rows % world ranks own one more."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def row_ends(num_rows: int, world: int) -> torch.Tensor:
    return torch.tensor([row_range(num_rows, r, world)[1] for r in range(world)], dtype=torch.long)


def init_block_rows(dim: int) -> int:
    return max(1, INIT_BLOCK_ELEMENTS // dim)


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_rows(name: str, num_rows: int, dim: int, start: int, end: int, std: float, seed: int) -> torch.Tensor:
    """Rows [start, end) of table `name`, N(0, std^2) in fp32. Block b (rows b*B ... (b+1)*B) is
    drawn from its own generator seeded by (seed, name, b), so a row's value depends on neither
    the range asked for nor the number of ranks; at most one block exists beside the result."""
    block = init_block_rows(dim)
    out = torch.empty(end - start, dim)
    for b in range(start // block, -(-end // block)):
        first, last = b * block, min((b + 1) * block, num_rows)
        rows = torch.randn(last - first, dim, generator=torch.Generator().manual_seed(block_seed(seed, name, b)))
        lo, hi = max(first, start), min(last, end)
        out[lo - start:hi - start] = rows[lo - first:hi - first] * std
    return out


class _Comm:
    """The collectives of one table group, with the bytes each rank sent (for the traffic report)."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.bytes_sent = 0

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        if self.world == 1:
            return tensor.clone()
        out = tensor.new_empty((sum(recv_counts),) + tuple(tensor.shape[1:]))
        dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=self.group)
        row = (tensor.numel() // max(1, tensor.shape[0]) if tensor.shape[0] else 1) * tensor.element_size()
        self.bytes_sent += (sum(send_counts) - send_counts[self.rank]) * row
        return out

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
            self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def all_gather_padded(self, tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's `tensor` (rows: counts[r]) stacked as (world, max(counts), ...)."""
        most = max(counts) if counts else 0
        padded = tensor.new_zeros((most,) + tuple(tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        if self.world == 1:
            return padded.unsqueeze(0)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        self.bytes_sent += padded.numel() * padded.element_size()
        return torch.stack(out)

    def counts(self, n: int) -> list[int]:
        """Every rank's `n`."""
        mine = torch.zeros(self.world, dtype=torch.long)
        mine[self.rank] = n
        return self.all_reduce(mine).tolist()


def _fetch(shard: torch.Tensor, ids: torch.Tensor, table: "ShardedIDTable"):
    """Rows of `ids` (any shape): the distinct ids go to their owners, the rows come back."""
    comm = table.comm
    unique, inverse = torch.unique(ids, return_inverse=True)
    if unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) >= table.num_rows):
        raise IndexError(f"{table.name}: ids must be in 0..{table.num_rows - 1}, got {int(unique[0])}..{int(unique[-1])}")
    owners = torch.bucketize(unique, table.ends, right=True)
    send = torch.bincount(owners, minlength=comm.world).tolist()
    recv = comm.all_to_all(torch.tensor(send, dtype=torch.long), [1] * comm.world, [1] * comm.world).tolist()
    asked = comm.all_to_all(unique, send, recv) - table.start
    rows = comm.all_to_all(shard.detach()[asked], recv, send)
    return rows[inverse], inverse, asked, send, recv


class _Lookup(torch.autograd.Function):
    """_fetch; in backward, each distinct id's summed row gradient goes back to its owner, as a
    sparse gradient of the owner's shard."""

    @staticmethod
    def forward(ctx, shard, ids, table):
        rows, inverse, asked, send, recv = _fetch(shard, ids, table)
        ctx.table, ctx.send, ctx.recv = table, send, recv
        ctx.save_for_backward(inverse, asked)
        return rows

    @staticmethod
    def backward(ctx, grad):
        inverse, asked = ctx.saved_tensors
        table, dim = ctx.table, grad.shape[-1]
        per_id = grad.new_zeros(sum(ctx.send), dim).index_add_(0, inverse.reshape(-1), grad.reshape(-1, dim))
        mine = table.comm.all_to_all(per_id.float(), ctx.send, ctx.recv)
        return torch.sparse_coo_tensor(asked.unsqueeze(0), mine, table.shard.shape, check_invariants=False), None, None


LOGIT_ELEMENTS = 1 << 22  # at most this many item scores exist at once in the item head (16 MB in fp32)
ROW_BLOCK = 1 << 16  # item rows scored at a time


def _score_blocks(queries: int, rows: int):
    """(query slice, row slice) blocks covering queries x rows, each at most LOGIT_ELEMENTS."""
    row_block = max(1, min(rows, ROW_BLOCK))
    query_block = max(1, LOGIT_ELEMENTS // row_block)
    for q in range(0, queries, query_block):
        for r in range(0, rows, row_block):
            yield slice(q, min(q + query_block, queries)), slice(r, min(r + row_block, rows))


class _VocabParallelNLL(torch.autograd.Function):
    """Per query q: sum_t w_t * (logsumexp_j(h_q . z_j) - h_q . z_item(t)) over q's targets t,
    over ALL items j, while each rank holds only its items' rows z_j.

    The ranks' queries are gathered; every rank scores every query against its own rows, a block
    at a time (a running max and sum of exponentials), and the max, the sum of exponentials and
    the target logits are all-reduced per query. In backward the scores are recomputed block by
    block: the shard's gradient is computed where the shard is, and each query's gradient is
    summed over the ranks and returned to its rank.
    """

    @staticmethod
    def forward(ctx, hidden, shard, queries, items, weights, table):
        comm = table.comm
        counts = comm.counts(hidden.shape[0])
        offsets = [sum(counts[:r]) for r in range(comm.world)]
        all_hidden = _unpad(comm.all_gather_padded(hidden.detach().float(), counts), counts)
        target_counts = comm.counts(len(items))
        pairs = torch.stack([(queries + offsets[comm.rank]).double(), items.double(), weights.double()], dim=1)
        all_pairs = _unpad(comm.all_gather_padded(pairs, target_counts), target_counts)
        t_query, t_item, t_weight = all_pairs[:, 0].long(), all_pairs[:, 1].long(), all_pairs[:, 2].float()
        z = shard.detach()
        total = all_hidden.shape[0]
        local_top, local_sums = torch.full((total,), float("-inf")), torch.zeros(total)
        for q, r in _score_blocks(total, z.shape[0]):
            logits = all_hidden[q] @ z[r].t()
            top = torch.maximum(local_top[q], logits.amax(dim=1))
            local_sums[q] = local_sums[q] * (local_top[q] - top).exp() + (logits - top[:, None]).exp_().sum(dim=1)
            local_top[q] = top
        top = comm.all_reduce(local_top.clone(), dist.ReduceOp.MAX)
        sums = comm.all_reduce(torch.where(local_sums > 0, local_sums * (local_top - top).exp(), local_sums))
        lse = top + sums.log()
        local = (t_item >= table.start) & (t_item < table.end)
        target_logit = torch.zeros(total).index_add_(
            0, t_query[local], (all_hidden[t_query[local]] * z[t_item[local] - table.start]).sum(-1) * t_weight[local])
        target_logit = comm.all_reduce(target_logit)
        weight_sum = torch.zeros(total).index_add_(0, t_query, t_weight)
        losses = weight_sum * lse - target_logit
        ctx.table, ctx.counts, ctx.offsets, ctx.hidden_dtype = table, counts, offsets, hidden.dtype
        ctx.save_for_backward(all_hidden, lse, weight_sum, t_query[local], t_item[local] - table.start, t_weight[local])
        return losses[offsets[comm.rank]:offsets[comm.rank] + counts[comm.rank]]

    @staticmethod
    def backward(ctx, grad_losses):
        all_hidden, lse, weight_sum, q_local, i_local, w_local = ctx.saved_tensors
        table, comm = ctx.table, ctx.table.comm
        z = table.shard.detach()
        g = _unpad(comm.all_gather_padded(grad_losses.float().contiguous(), ctx.counts), ctx.counts)
        scale = weight_sum * g
        grad_hidden = torch.zeros_like(all_hidden)
        grad_shard = torch.zeros_like(z)
        for q, r in _score_blocks(all_hidden.shape[0], z.shape[0]):
            probs = (all_hidden[q] @ z[r].t() - lse[q, None]).exp_().mul_(scale[q, None])  # d loss / d score
            inside = (q_local >= q.start) & (q_local < q.stop) & (i_local >= r.start) & (i_local < r.stop)
            probs.index_put_((q_local[inside] - q.start, i_local[inside] - r.start),
                             -(w_local[inside] * g[q_local[inside]]), accumulate=True)
            grad_hidden[q] += probs @ z[r]
            grad_shard[r] += probs.t() @ all_hidden[q]
        # Each rank's queries' partial gradients go to that rank and are summed there (a reduce-scatter).
        mine = comm.all_to_all(grad_hidden, ctx.counts, [ctx.counts[comm.rank]] * comm.world)
        mine = mine.reshape(comm.world, ctx.counts[comm.rank], all_hidden.shape[1]).sum(dim=0).to(ctx.hidden_dtype)
        return mine, grad_shard, None, None, None, None


def _unpad(stacked: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([stacked[r, :n] for r, n in enumerate(counts)])


def ordered_top(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, id) pairs of each row, by score descending, ties to the lower id."""
    by_id = torch.sort(ids, dim=1, stable=True).indices
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


def blocked_top(hidden: torch.Tensor, weight: torch.Tensor, k: int, exclude_rows: torch.Tensor,
                exclude_cols: torch.Tensor, block: int, first_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best min(k, rows of weight) (score, id) pairs of each query row of `hidden` against the
    rows of `weight` (ids first_id, first_id + 1, ...), the (row, id) pairs given excluded (-inf),
    `block` rows of `weight` at a time: the prefix of the full ranking by score descending, ties to
    the lower id. Only queries x block scores exist at once."""
    rows = hidden.shape[0]
    block = block if block > 0 else max(1, weight.shape[0])
    best_scores = torch.empty((rows, 0), dtype=torch.float32, device=hidden.device)
    best_ids = torch.empty((rows, 0), dtype=torch.long, device=hidden.device)
    for start in range(0, weight.shape[0], block):
        scores = (hidden @ weight[start:start + block].t()).float()
        lo = first_id + start
        inside = (exclude_cols >= lo) & (exclude_cols < lo + scores.shape[1])
        scores[exclude_rows[inside], exclude_cols[inside] - lo] = float("-inf")
        keep = min(k, scores.shape[1])
        # Every column scoring at least the keep-th best, so that ties are decided by id below.
        kth = torch.topk(scores, keep, dim=1).values[:, -1:]
        wide = int((scores >= kth).sum(dim=1).max()) if rows else keep
        cand = torch.topk(scores, wide, dim=1).indices
        best_scores, best_ids = ordered_top(torch.cat([best_scores, scores.gather(1, cand)], dim=1),
                                            torch.cat([best_ids, cand + lo], dim=1), k)
    return best_scores, best_ids


def pad_ids(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows shorter than k (fewer items than k) padded with -1."""
    if ids.shape[1] >= k:
        return ids
    return torch.cat([ids, ids.new_full((ids.shape[0], k - ids.shape[1]), -1)], dim=1)


class ShardedIDTable(nn.Module):
    """One ID table, row-sharded over the ranks of `group` (default: all). Same calls as
    model.cllm4rec.IDTable: rows of ids, the tied head's loss (`targets`), the top-k (`top_k`)."""

    def __init__(self, name: str, num_rows: int, dim: int, init_std: float, seed: int, group=None):
        super().__init__()
        self.name, self.num_rows, self.dim = name, num_rows, dim
        self.comm = _Comm(group)
        self.start, self.end = row_range(num_rows, self.comm.rank, self.comm.world)
        self.ends = row_ends(num_rows, self.comm.world)
        # A plain tensor, not an nn.Parameter: DeepSpeed neither partitions nor gathers it.
        self.shard = init_rows(name, num_rows, dim, self.start, self.end, init_std, seed).requires_grad_()

    def extra_repr(self) -> str:
        return f"{self.name}: rows {self.start}..{self.end} of {self.num_rows} x {self.dim}"

    def forward(self, ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                top_k: dict | None = None, targets: dict | None = None) -> torch.Tensor:
        if hidden is not None and top_k is not None:
            return self.top(hidden, top_k)
        if hidden is not None and targets is not None:
            return _VocabParallelNLL.apply(hidden, self.shard, targets["queries"], targets["items"],
                                           targets["weights"], self)
        if hidden is not None:  # every item's score: only where one rank holds every row (serving)
            if self.comm.world > 1:
                raise ValueError(f"{self.name}: a table sharded over {self.comm.world} ranks gives no full score "
                                 "matrix; ask for top_k or targets")
            return hidden @ self.shard.detach().to(hidden.dtype).t()
        return _Lookup.apply(self.shard, ids, self)

    @torch.no_grad()
    def top(self, hidden: torch.Tensor, query: dict) -> torch.Tensor:
        """Top-k ids per query row: each rank ranks every rank's queries against its rows, then each
        query's per-shard lists are merged (score descending, ties to the lower id), as
        blocked_topk on the full table."""
        comm, k = self.comm, int(query["k"])
        counts = comm.counts(hidden.shape[0])
        offsets = [sum(counts[:r]) for r in range(comm.world)]
        all_hidden = _unpad(comm.all_gather_padded(hidden.float(), counts), counts)
        pairs = torch.stack([query["exclude_rows"] + offsets[comm.rank], query["exclude_cols"]], dim=1)
        pair_counts = comm.counts(len(pairs))
        all_pairs = _unpad(comm.all_gather_padded(pairs, pair_counts), pair_counts)
        scores, ids = blocked_top(all_hidden, self.shard.detach(), k, all_pairs[:, 0], all_pairs[:, 1],
                                  int(query.get("block") or 0), self.start)
        short = k - ids.shape[1]  # a shard of fewer than k rows: pad past every real id
        scores = torch.cat([scores, scores.new_full((len(scores), short), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((len(ids), short), self.num_rows)], dim=1)
        both = comm.all_gather_padded(torch.stack([scores.double(), ids.double()], dim=-1), [len(ids)] * comm.world)
        mine = both[:, offsets[comm.rank]:offsets[comm.rank] + counts[comm.rank]]  # (world, queries, k, 2)
        merged_scores = mine[..., 0].permute(1, 0, 2).reshape(counts[comm.rank], -1).float()
        merged_ids = mine[..., 1].permute(1, 0, 2).reshape(counts[comm.rank], -1).long()
        _, best = ordered_top(merged_scores, merged_ids, min(k, self.num_rows))
        return pad_ids(best, k)
