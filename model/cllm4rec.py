"""The CLLM4Rec model: one frozen base LLM shared by a collaborative and a content model.

Each model owns a user table and an item table (new rows, kept apart from the frozen
vocabulary embeddings) and, in LoRA mode, one LoRA adapter on the shared base.

    collaborative LLM: base (+ "collab" adapter) with the collab tables.
        item head  = collab item table (tied): softmax over the J items only.
        rec head   = the same tied table, applied to the last prompt position.
    content LLM:       base (+ "content" adapter) with the content tables.
        vocab head = the base's frozen LM head.

Everything runs through `forward(task, batch)` so that a DeepSpeed engine can wrap the
module: under ZeRO-3 parameters are gathered by module hooks, so tables are only ever read
by calling them, never through `.weight` from outside.

Loss scales (docs/method.md): LM terms are a SUM over the main-text tokens of a document;
mutual regularization adds lambda_c/2 * ||z - sg(z_other)||^2 for each distinct user/item of
the document. Both are averaged over the documents of the batch, so the per-document balance
is the paper's and does not depend on how a global batch is split across ranks.

Batches (trainer/batching.py) are either padded (one document per row, `attention_mask`) or
packed (several documents per row, no `attention_mask`, `position_ids` restarting at 0 for each
document). `doc_index` says which document each position belongs to (-1: padding), so losses
are summed per document whatever the layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from model.attention import SDPA_VARLEN, document_layout
from model.loss_config import LossConfig
from model.lora import MODELS, activate_adapter
from model.sharded_tables import ShardedIDTable, blocked_top, init_rows, pad_ids

TASKS = ("collab", "content", "rec", "score", "topk")


def chunked_vocab_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy of `hidden @ weight.T (+ bias)` against `targets` for a FROZEN
    output layer, and its gradient with respect to `hidden`, `chunk` positions at a time, outside
    autograd. At most one chunk of vocabulary-wide logits ever exists, so peak memory is chunk x
    vocabulary whatever the number of positions; VocabCrossEntropy attaches the result to `hidden`.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the chunked vocabulary cross-entropy is for a frozen output layer; the vocabulary head "
                         "here requires grad")
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            rows = torch.arange(len(t), device=t.device)
            logits = F.linear(h, weight, bias).float()
            picked = logits[rows, t]
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: the chunk's one vocabulary-wide buffer
            total = probs.sum(dim=-1, keepdim=True)
            losses[start:start + chunk] = (top + total.log()).squeeze(-1) - picked
            probs.div_(total)
            probs[rows, t] -= 1.0  # d loss / d logits = softmax - one-hot
            grad[start:start + chunk] = probs.to(weight.dtype) @ weight
    return losses, grad


class VocabCrossEntropy(torch.autograd.Function):
    """`losses` as a function of `hidden`, given d loss / d hidden (chunked_vocab_cross_entropy's):
    backward only scales that gradient, so nothing vocabulary-wide is saved for it and the frozen
    head is not needed (nor, under ZeRO-3, gathered) again."""

    @staticmethod
    def forward(ctx, hidden, losses, grad):
        ctx.save_for_backward(grad)
        return losses.clone()

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_losses.unsqueeze(-1)).to(grad.dtype), None, None


class VocabLoss(nn.Module):
    """chunked_vocab_cross_entropy against a frozen head, as a module of its own.

    Under ZeRO-3 the head's parameters are registered as this module's external parameters, so
    DeepSpeed gathers them for this module's forward (one all-gather per call, however many
    chunks; the same on every rank) and releases them after it, and does not gather them for
    every other forward pass of the model. The outputs do not require grad, so DeepSpeed hooks no
    backward to this module and the head is not gathered again in backward.
    """

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = list(head.parameters(recurse=False))  # reading the list does not gather them
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned (trainer/compat.py, is_partitioned)
            import deepspeed

            for p in params:
                deepspeed.zero.register_external_parameter(self, p)
        return chunked_vocab_cross_entropy(hidden.detach(), head.weight, getattr(head, "bias", None), targets, chunk)


def blocked_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, exclude_rows: torch.Tensor,
                 exclude_cols: torch.Tensor, block: int) -> torch.Tensor:
    """Top-k item ids of each row of `hidden` scored against `weight` (items x dim), the
    (row, item) pairs given excluded (-inf), `block` items at a time.

    Only rows x block scores exist at once, so memory does not grow with the number of items.
    The result equals ranking the full score matrix by score descending, ties to the lower id
    (trainer.metrics.topk_excluding); past the last item rows are padded with -1.
    """
    return pad_ids(blocked_top(hidden, weight, k, exclude_rows, exclude_cols, block)[1], k)


class IDTable(nn.Module):
    """Embedding rows for users or items; also scores hidden states against all rows (tied head).
    One parameter: under ZeRO-3 it is partitioned and gathered whole for every call. Its rows
    are drawn as model.sharded_tables draws them, so both kinds of table start from the same values."""

    def __init__(self, name: str, num_rows: int, dim: int, init_std: float = 0.02, seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(init_rows(name, num_rows, dim, 0, num_rows, init_std, seed))

    def forward(self, ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                top_k: dict | None = None, targets: dict | None = None) -> torch.Tensor:
        """Rows of `ids`; or scores of `hidden` against every row; or, with `top_k` (k, block,
        exclude_rows, exclude_cols: see blocked_topk), the best rows' ids without the full scores;
        or, with `targets` (queries, items, weights), each hidden row's loss
        -sum_t weight_t * log_softmax(scores)[item_t] over its targets. One call each, so under
        ZeRO-3 one gather of the table."""
        if hidden is not None and top_k is not None:
            return blocked_topk(hidden, self.weight, top_k["k"], top_k["exclude_rows"], top_k["exclude_cols"],
                                top_k["block"])
        if hidden is not None and targets is not None:
            log_probs = F.log_softmax((hidden @ self.weight.t()).float(), dim=-1)
            picked = log_probs[targets["queries"], targets["items"]] * targets["weights"]
            return -torch.zeros(hidden.shape[0], device=hidden.device).index_add(0, targets["queries"], picked)
        if hidden is not None:
            return hidden @ self.weight.t()
        return F.embedding(ids, self.weight)


class CLLM4Rec(nn.Module):
    def __init__(self, backbone: nn.Module, vocab_size: int, num_users: int, num_items: int,
                 loss: LossConfig | None = None, init_std: float = 0.02, attention: str = "", seed: int = 0,
                 sharded_tables: bool = False, table_group=None):
        super().__init__()
        self.backbone = backbone
        self.attention = attention  # the base's attention implementation: how packed documents reach it
        self.vocab_size = vocab_size
        self.num_users = num_users
        self.num_items = num_items
        self.loss_cfg = loss or LossConfig()
        dim = self.hidden_size = self._hf().config.hidden_size
        # sharded_tables: each rank owns a range of every table's rows (model/sharded_tables.py),
        # outside DeepSpeed, over the ranks of `table_group`; else one parameter per table.
        self.sharded_tables = sharded_tables
        table = (lambda name, rows: ShardedIDTable(name, rows, dim, init_std, seed, table_group)) if sharded_tables \
            else (lambda name, rows: IDTable(name, rows, dim, init_std, seed))
        self.tables = nn.ModuleDict({
            f"{model}_{kind}": table(f"{model}_{kind}", num_users if kind == "user" else num_items)
            for model in MODELS for kind in ("user", "item")
        })
        self.vocab_loss = VocabLoss()  # no parameters of its own
        if not self.lora:  # paper mode: only the ID tables train
            self.backbone.requires_grad_(False)

    # ----- pieces of the shared base ---------------------------------------------------------
    @property
    def lora(self) -> bool:
        return isinstance(self.backbone, PeftModel)

    def _hf(self):
        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    def _use(self, model: str) -> None:
        if self.lora:
            activate_adapter(self.backbone, model)

    def embed(self, ids: torch.Tensor, model: str) -> torch.Tensor:
        """Input embeddings: frozen vocabulary rows for text, `model`'s ID tables for IDs. Only the
        positions that hold an ID are looked up (every rank calls both tables, even with none)."""
        n, i = self.vocab_size, self.num_users
        vocab = self._hf().get_input_embeddings()(ids.clamp(max=n - 1))
        is_user, is_item = (ids >= n) & (ids < n + i), ids >= n + i
        users = self.tables[f"{model}_user"](ids[is_user] - n).to(vocab.dtype)
        items = self.tables[f"{model}_item"](ids[is_item] - n - i).to(vocab.dtype)
        return vocab.index_put((is_user,), users).index_put((is_item,), items)

    def hidden_states(self, batch: dict, model: str) -> torch.Tensor:
        """Last hidden states, (rows, width, dim). A packed batch has no attention_mask: its
        documents are told apart by their position ids, by transformers (a block-diagonal causal
        mask for sdpa / eager, varlen for flash-attn) or by sdpa_varlen (model/attention.py)."""
        self._use(model)
        ids = batch["input_ids"]
        embeds = self.embed(ids, model)
        mask, positions = batch.get("attention_mask"), batch.get("position_ids")
        rows, width = ids.shape
        attention = self.attention
        if mask is None and rows > 1 and attention == "flash_attention_2":
            # flash-attn reads documents from position ids (varlen) only in a single row, so the
            # packed rows are laid end to end; each row's padding tail is its own short sequence.
            embeds, positions = embeds.reshape(1, rows * width, -1), positions.reshape(1, -1)
        extra = {}
        if mask is None and positions is not None and attention == SDPA_VARLEN:
            extra["documents"] = document_layout(positions)
        out = self._hf().get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                       use_cache=False, **extra)
        return out.last_hidden_state.reshape(rows, width, -1)

    # ----- losses --------------------------------------------------------------------------------
    def mutual_regularization(self, batch: dict, model: str) -> torch.Tensor:
        """sum over the documents' distinct IDs of lambda_c/2 ||z^model - sg(z^other)||^2 (+ prior).

        Padding ids (-1) are looked up as row 0 and masked out rather than skipped: under
        ZeRO-3 every lookup gathers the table, so every rank must make the same calls whatever
        its batch holds.
        """
        other = "content" if model == "collab" else "collab"
        total = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        for kind, ids in (("user", batch["reg_users"]), ("item", batch["reg_items"])):
            valid = (ids >= 0).float()
            safe = ids.clamp(min=0)
            mine = self.tables[f"{model}_{kind}"](safe).float()
            with torch.no_grad():
                theirs = self.tables[f"{other}_{kind}"](safe).float()
            total = total + self.loss_cfg.lambda_c / 2 * ((mine - theirs).pow(2).sum(-1) * valid).sum()
            if model == "collab" and self.loss_cfg.lambda_l > 0:
                total = total + self.loss_cfg.lambda_l / 2 * (mine.pow(2).sum(-1) * valid).sum()
        return total

    @staticmethod
    def _per_document(values: torch.Tensor, docs_of_values: torch.Tensor, docs: int) -> torch.Tensor:
        return torch.zeros(docs, dtype=values.dtype, device=values.device).index_add(0, docs_of_values, values)

    def collab_nll(self, hidden: torch.Tensor, batch: dict, docs: int) -> torch.Tensor:
        """Item-head LM loss per document: every main-text token is an item, scored against the
        J items only."""
        keep = batch["targets"] >= 0
        kept = hidden[keep]
        rows = torch.arange(kept.shape[0], device=kept.device)
        losses = self.tables["collab_item"](hidden=kept, targets={
            "queries": rows, "items": batch["targets"][keep], "weights": torch.ones(len(rows), device=kept.device)})
        return self._per_document(losses, batch["doc_index"][keep], docs)

    def content_nll(self, hidden: torch.Tensor, batch: dict, docs: int) -> torch.Tensor:
        """Vocabulary-head LM loss per document over the main-text positions.

        With loss.vocab_chunk > 0, chunked_vocab_cross_entropy: one chunk of vocabulary-wide
        logits at a time and none kept for backward. Under ZeRO-3 the head is gathered once per
        call, in forward only (VocabLoss), whatever the number of chunks, so ranks with different
        batches stay in step.
        vocab_chunk = 0 is the naive way, kept for comparison: the head on every position of
        the batch, padding included, as a causal LM's forward does.
        """
        targets, doc_index = batch["targets"], batch["doc_index"]
        head = self._hf().get_output_embeddings()
        keep = targets >= 0
        if self.loss_cfg.vocab_chunk <= 0:
            logits = head(hidden).float()
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
            return self._per_document(losses[keep.flatten()], doc_index[keep], docs)
        kept = hidden[keep]
        losses, grad = self.vocab_loss(kept, targets[keep], head, self.loss_cfg.vocab_chunk)
        return self._per_document(VocabCrossEntropy.apply(kept, losses, grad), doc_index[keep], docs)

    def last_prompt_hidden(self, batch: dict, model: str) -> torch.Tensor:
        """Each document's last position; `last_index` indexes the flattened (rows x width) batch."""
        hidden = self.hidden_states(batch, model)
        return hidden.flatten(0, 1)[batch["last_index"]]

    def item_scores(self, batch: dict) -> torch.Tensor:
        """Rec head: last prompt state against every item (tied to the collab item table), one
        matrix product for the whole batch."""
        return self.tables["collab_item"](hidden=self.last_prompt_hidden(batch, "collab")).float()

    def rec_nll(self, batch: dict) -> torch.Tensor:
        """Rec head loss per document: -sum over its target items of log_softmax(scores) (the
        multi-hot target of (target_docs, target_items) pairs, weight 1 each)."""
        items = batch["target_items"]
        return self.tables["collab_item"](hidden=self.last_prompt_hidden(batch, "collab"), targets={
            "queries": batch["target_docs"], "items": items, "weights": torch.ones(len(items), device=items.device)})

    def top_items(self, batch: dict) -> torch.Tensor:
        """The rec head's top `k` items per document, the (exclude_rows, exclude_cols) pairs left
        out, scored `item_block` items at a time (blocked_topk)."""
        hidden = self.last_prompt_hidden(batch, "collab")
        query = {"k": int(batch["k"]), "block": int(batch.get("item_block", 0)),
                 "exclude_rows": batch["exclude_rows"], "exclude_cols": batch["exclude_cols"]}
        return self.tables["collab_item"](hidden=hidden, top_k=query)

    # ----- the one entry point -------------------------------------------------------------------
    def forward(self, task: str, batch: dict) -> dict:
        """`doc_nll`: each document's LM (or rec) loss, the same whether the batch is packed or not."""
        if task == "score":
            return {"scores": self.item_scores(batch)}
        if task == "topk":
            return {"items": self.top_items(batch)}
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        docs = batch["reg_users"].shape[0]
        if task == "collab":
            doc_nll = self.collab_nll(self.hidden_states(batch, "collab"), batch, docs)
            reg = self.mutual_regularization(batch, "collab")
        elif task == "content":
            doc_nll = self.content_nll(self.hidden_states(batch, "content"), batch, docs)
            reg = self.mutual_regularization(batch, "content")
        else:
            doc_nll = self.rec_nll(batch)
            reg = self.mutual_regularization(batch, "collab")
        nll = doc_nll.sum()
        return {"loss": (nll + reg) / docs, "nll": nll.detach() / docs, "reg": reg.detach() / docs,
                "doc_nll": doc_nll.detach()}
