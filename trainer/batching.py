"""From shard documents (ids and text) to model batches (token tensors).

Each document becomes one sequence: prompt tokens, then main-text tokens. `targets[t]` is
what position t must predict (the next token) when t+1 is a main-text token, and -1
elsewhere: the loss is on the main text only, and the prompt's last position predicts the
first main token (as in the paper). For collab documents targets are item indices, for content
documents vocabulary ids.

All randomness (item order, hold-out) comes from `doc_rng(seed, epoch, pos)`, so a document
is rendered identically whichever rank reads it.

Layout. With `pack` (data.pack) the documents of a batch are packed into as few rows as fit
(`pack_rows`): each document keeps its own position ids (0, 1, ...), and there is no
attention_mask, so the model separates the documents of a row by their position ids (a
block-diagonal causal mask; sdpa_varlen and flash-attn's varlen kernel attend each document
alone). Without it, one document per row, padded to the longest (attention_mask). Either way
`doc_index[r, c]` is the document at that position (-1: padding) and `last_index[d]` the flat
index (r * width + c) of document d's last token.
Packing only rearranges the documents the reader gave this rank for this step, so which
documents train together, and resume, do not change.
"""
from __future__ import annotations

import torch

from data_shards.documents import (collab_prompt, content_prompt, content_text, doc_rng, holdout_split,
                                   rec_prompt, shuffled)
from model.tokenizer import IDTokenizer


def _fits(lengths: list[int], order: list[int], width: int, rows: int) -> list[list[int]] | None:
    """First-fit-decreasing into `rows` rows of `width` tokens, or None if it does not fit."""
    layout: list[list[int]] = []
    free: list[int] = []
    for doc in order:
        for row, space in enumerate(free):
            if lengths[doc] <= space:
                layout[row].append(doc)
                free[row] -= lengths[doc]
                break
        else:
            if len(layout) == rows:
                return None
            layout.append([doc])
            free.append(width - lengths[doc])
    return layout


def pack_rows(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Documents (by index) per row: as few rows of at most max(pack_tokens, longest) tokens as
    first-fit-decreasing manages, then the narrowest width that still fits them in that many rows,
    so the padding is what is left at the row ends. Deterministic in the lengths.

    `pack_tokens` bounds a row because with sdpa / eager attention a row costs width^2 (the
    masked-out pairs are computed too); sdpa_varlen and flash-attn's varlen kernel do not pay that.
    """
    order = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
    longest, total = max(lengths), sum(lengths)
    cap = max(pack_tokens, longest)
    rows = -(-total // cap)
    while True:
        width = max(longest, -(-total // rows))
        while width <= cap:
            layout = _fits(lengths, order, width, rows)
            if layout is not None:
                return layout
            width += max(1, width // 64)
        rows += 1


def _pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class Collator:
    def __init__(self, tokenizer: IDTokenizer, seed: int, max_text_tokens: int, max_items: int,
                 holdout_fraction: float = 0.2, rec_target: str = "heldout", pack: bool = True,
                 pack_tokens: int = 1024):
        self.tok = tokenizer
        self.seed = seed
        self.max_text_tokens = max_text_tokens
        self.max_items = max_items
        self.holdout_fraction = holdout_fraction
        self.rec_target = rec_target
        self.pack = pack
        self.pack_tokens = pack_tokens

    @classmethod
    def from_config(cls, tokenizer: IDTokenizer, cfg, **kw) -> "Collator":
        return cls(tokenizer, cfg.run.seed, cfg.data.max_text_tokens, cfg.data.max_items, pack=cfg.data.pack,
                   pack_tokens=cfg.data.pack_tokens, **kw)

    def layout(self, seqs: list[list[int]], targets: list[list[int]] | None = None) -> dict:
        """Token tensors of the sequences, packed or padded (module docstring)."""
        rows = pack_rows([len(s) for s in seqs], self.pack_tokens) if self.pack else [[d] for d in range(len(seqs))]
        width = max(sum(len(seqs[d]) for d in row) for row in rows)
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        # Padding gets positions 0, 1, ... too: in a packed row its tail is then a sequence of its own.
        positions = torch.arange(width).repeat(len(rows), 1)
        doc_index = torch.full((len(rows), width), -1, dtype=torch.long)
        target_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        last = torch.empty(len(seqs), dtype=torch.long)
        for r, row in enumerate(rows):
            col = 0
            for d in row:
                n = len(seqs[d])
                ids[r, col:col + n] = torch.tensor(seqs[d], dtype=torch.long)
                positions[r, col:col + n] = torch.arange(n)
                doc_index[r, col:col + n] = d
                if targets is not None:
                    target_ids[r, col:col + n] = torch.tensor(targets[d], dtype=torch.long)
                last[d] = r * width + col + n - 1
                col += n
            positions[r, col:] = torch.arange(width - col)
        batch = {"input_ids": ids, "position_ids": positions, "doc_index": doc_index, "last_index": last}
        if not self.pack:
            batch["attention_mask"] = (doc_index >= 0).long()
        if targets is not None:
            batch["targets"] = target_ids
        return batch

    def _sequences(self, prompts: list[list[int]], mains: list[list[int]], target_offset: int) -> dict:
        seqs, targets = [], []
        for prompt, main in zip(prompts, mains):
            seq = prompt + main
            target = [-1] * len(seq)
            for t in range(len(prompt) - 1, len(seq) - 1):
                target[t] = seq[t + 1] - target_offset
            seqs.append(seq)
            targets.append(target)
        return self.layout(seqs, targets)

    def _reg(self, users: list[int | None], items: list[list[int]]) -> dict:
        return {"reg_users": torch.tensor([-1 if u is None else u for u in users], dtype=torch.long),
                "reg_items": _pad_rows([sorted(set(i)) or [-1] for i in items], -1)}

    def collab(self, docs: list[dict], epoch: int) -> dict:
        """`user_i has interacted with` + the user's train items in a fresh random order."""
        items = [shuffled(d["items"], doc_rng(self.seed, epoch, d["pos"]))[: self.max_items] for d in docs]
        prompts = self.tok.encode_many([collab_prompt(d["user"]) for d in docs])
        mains = [[self.tok.item_token(i) for i in row] for row in items]
        batch = self._sequences(prompts, mains, self.tok.item_offset)
        return {**batch, **self._reg([d["user"] for d in docs], items)}

    def content(self, docs: list[dict], epoch: int) -> dict:
        prompts = self.tok.encode_many([content_prompt(d["kind"], d["user"], d["item"]) for d in docs])
        mains = [m[: self.max_text_tokens] for m in self.tok.encode_many([content_text(d["text"]) for d in docs],
                                                                             with_bos=False)]
        batch = self._sequences(prompts, mains, 0)
        items = [[] if d["item"] is None else [d["item"]] for d in docs]
        return {**batch, **self._reg([d["user"] for d in docs], items)}

    def _prompt_batch(self, users: list[int], histories: list[list[int]]) -> dict:
        return self.layout(self.tok.encode_many([rec_prompt(u, h) for u, h in zip(users, histories)]))

    def rec(self, docs: list[dict], epoch: int) -> dict:
        """Prompt with a random 20% of the train items masked out; target: the masked items
        (or all train items with rec_target=all_train, as in the reference code)."""
        histories, target_docs, target_items = [], [], []
        for row, doc in enumerate(docs):
            rng = doc_rng(self.seed, epoch, doc["pos"])
            if self.rec_target == "heldout":
                history, heldout = holdout_split(doc["items"], self.holdout_fraction, rng)
            else:
                history, heldout = shuffled(doc["items"], rng), doc["items"]
            histories.append(history[: self.max_items])
            target_docs += [row] * len(heldout)
            target_items += list(heldout)
        users = [d["user"] for d in docs]
        # The multi-hot target as (document, item) pairs: nothing catalogue-wide per document.
        targets = {"target_docs": torch.tensor(target_docs, dtype=torch.long),
                   "target_items": torch.tensor(target_items, dtype=torch.long)}
        return {**self._prompt_batch(users, histories), **targets, **self._reg(users, histories)}

    def score(self, users: list[int], train_items: list[list[int]]) -> dict:
        """Evaluation prompt: all train items, in an order fixed by (seed, user)."""
        histories = [shuffled(items, doc_rng(self.seed, 0, u))[: self.max_items] for u, items in zip(users, train_items)]
        return self._prompt_batch(users, histories)
