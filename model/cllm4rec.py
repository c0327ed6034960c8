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

Loss scales (README, "The method"): LM terms are a SUM over the main-text tokens of a document;
mutual regularization adds lambda_c/2 * ||z - sg(z_other)||^2 for each distinct user/item of
the document. Both are averaged over the documents of the batch, so the per-document balance
is the paper's and does not depend on how a global batch is split across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from model.lora import activate_adapter

TASKS = ("collab", "content", "rec", "score")


def chunks_needed(positions: int, chunk: int) -> int:
    return max(1, -(-positions // chunk))


class IDTable(nn.Module):
    """Embedding rows for users or items; also scores hidden states against all rows (tied head)."""

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_rows, dim) * init_std)

    def forward(self, ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is not None:
            return hidden @ self.weight.t()
        return F.embedding(ids, self.weight)


@dataclass
class LossConfig:
    lambda_c: float = 1.0  # mutual-regularization strength between collab and content tables
    lambda_l: float = 0.0  # optional Gaussian prior on the collab rows of each document
    vocab_chunk: int = 1024  # positions per chunk of the vocabulary head's cross-entropy


class CLLM4Rec(nn.Module):
    def __init__(self, backbone: nn.Module, vocab_size: int, num_users: int, num_items: int,
                 loss: LossConfig | None = None, init_std: float = 0.02):
        super().__init__()
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.num_users = num_users
        self.num_items = num_items
        self.loss_cfg = loss or LossConfig()
        dim = self._hf().config.hidden_size
        self.tables = nn.ModuleDict({
            f"{model}_{kind}": IDTable(num_users if kind == "user" else num_items, dim, init_std)
            for model in ("collab", "content") for kind in ("user", "item")
        })
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
        """Input embeddings: frozen vocabulary rows for text, `model`'s ID tables for IDs."""
        n, i, j = self.vocab_size, self.num_users, self.num_items
        vocab = self._hf().get_input_embeddings()(ids.clamp(max=n - 1))
        users = self.tables[f"{model}_user"]((ids - n).clamp(0, i - 1)).to(vocab.dtype)
        items = self.tables[f"{model}_item"]((ids - n - i).clamp(0, j - 1)).to(vocab.dtype)
        is_user = ((ids >= n) & (ids < n + i)).unsqueeze(-1)
        is_item = (ids >= n + i).unsqueeze(-1)
        return torch.where(is_item, items, torch.where(is_user, users, vocab))

    def hidden_states(self, batch: dict, model: str) -> torch.Tensor:
        self._use(model)
        embeds = self.embed(batch["input_ids"], model)
        out = self._hf().get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)
        return out.last_hidden_state

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

    def _main_positions(self, hidden: torch.Tensor, targets: torch.Tensor):
        keep = targets >= 0
        return hidden[keep], targets[keep]

    def collab_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Item-head LM loss: every main-text token is an item, scored against the J items only."""
        h, t = self._main_positions(hidden, targets)
        logits = self.tables["collab_item"](hidden=h).float()
        return F.cross_entropy(logits, t, reduction="sum")

    def content_nll(self, hidden: torch.Tensor, targets: torch.Tensor, num_chunks: int | None = None) -> torch.Tensor:
        """Vocabulary-head LM loss over main-text positions, in chunks of `vocab_chunk` positions
        so that only one chunk of full-vocabulary logits exists at a time in the forward pass.

        Under ZeRO-3 each call of the head gathers its weight, so all ranks must make the same
        number of calls: a distributed caller passes `num_chunks`, the largest count over ranks
        (extra chunks are empty).
        """
        h, t = self._main_positions(hidden, targets)
        chunk = self.loss_cfg.vocab_chunk
        if num_chunks is None:
            num_chunks = chunks_needed(len(t), chunk)
        head = self._hf().get_output_embeddings()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for k in range(num_chunks):
            h_k, t_k = h[k * chunk:(k + 1) * chunk], t[k * chunk:(k + 1) * chunk]
            total = total + F.cross_entropy(head(h_k).float(), t_k, reduction="sum")
        return total

    def last_prompt_hidden(self, batch: dict, model: str) -> torch.Tensor:
        hidden = self.hidden_states(batch, model)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, batch["last_index"]]

    def item_scores(self, batch: dict) -> torch.Tensor:
        """Rec head: last prompt state against every item (tied to the collab item table)."""
        return self.tables["collab_item"](hidden=self.last_prompt_hidden(batch, "collab")).float()

    # ----- the one entry point -------------------------------------------------------------------
    def forward(self, task: str, batch: dict) -> dict:
        docs = batch["input_ids"].shape[0]
        if task == "collab":
            nll = self.collab_nll(self.hidden_states(batch, "collab"), batch["targets"])
            reg = self.mutual_regularization(batch, "collab")
        elif task == "content":
            nll = self.content_nll(self.hidden_states(batch, "content"), batch["targets"], batch.get("vocab_chunks"))
            reg = self.mutual_regularization(batch, "content")
        elif task == "rec":
            logits = self.item_scores(batch)
            target = batch["rec_targets"]
            nll = -(target * F.log_softmax(logits, dim=-1)).sum()
            reg = self.mutual_regularization(batch, "collab")
        elif task == "score":
            return {"scores": self.item_scores(batch)}
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return {"loss": (nll + reg) / docs, "nll": nll.detach() / docs, "reg": reg.detach() / docs}
