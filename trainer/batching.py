"""From shard documents (ids and text) to model batches (token tensors).

Each document becomes one sequence: prompt tokens, then main-text tokens. `targets[t]` is
what position t must predict (the next token) when t+1 is a main-text token, and -1
elsewhere: the loss is on the main text only, and the prompt's last position predicts the
first main token (as in the paper). For collab documents targets are item indices, for content
documents vocabulary ids.

All randomness (item order, hold-out) comes from `doc_rng(seed, epoch, pos)`, so a document
is rendered identically whichever rank reads it.
"""
from __future__ import annotations

import torch

from data_shards.documents import (collab_prompt, content_prompt, content_text, doc_rng, holdout_split,
                                   rec_prompt, shuffled)
from model.tokenizer import IDTokenizer


def _pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class Collator:
    def __init__(self, tokenizer: IDTokenizer, seed: int, max_text_tokens: int, max_items: int,
                 holdout_fraction: float = 0.2, rec_target: str = "heldout"):
        self.tok = tokenizer
        self.seed = seed
        self.max_text_tokens = max_text_tokens
        self.max_items = max_items
        self.holdout_fraction = holdout_fraction
        self.rec_target = rec_target

    def _sequences(self, prompts: list[list[int]], mains: list[list[int]], target_offset: int) -> dict:
        seqs, targets = [], []
        for prompt, main in zip(prompts, mains):
            seq = prompt + main
            target = [-1] * len(seq)
            for t in range(len(prompt) - 1, len(seq) - 1):
                target[t] = seq[t + 1] - target_offset
            seqs.append(seq)
            targets.append(target)
        enc = self.tok.pad(seqs)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "targets": _pad_rows(targets, -1)}

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
        enc = self.tok([rec_prompt(u, h) for u, h in zip(users, histories)])
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "last_index": enc.lengths - 1}

    def rec(self, docs: list[dict], epoch: int) -> dict:
        """Prompt with a random 20% of the train items masked out; target: the masked items
        (or all train items with rec_target=all_train, as in the reference code)."""
        histories, targets = [], torch.zeros((len(docs), self.tok.num_items))
        for row, doc in enumerate(docs):
            rng = doc_rng(self.seed, epoch, doc["pos"])
            if self.rec_target == "heldout":
                history, heldout = holdout_split(doc["items"], self.holdout_fraction, rng)
            else:
                history, heldout = shuffled(doc["items"], rng), doc["items"]
            histories.append(history[: self.max_items])
            targets[row, heldout] = 1.0
        users = [d["user"] for d in docs]
        return {**self._prompt_batch(users, histories), "rec_targets": targets, **self._reg(users, histories)}

    def score(self, users: list[int], train_items: list[list[int]]) -> dict:
        """Evaluation prompt: all train items, in an order fixed by (seed, user)."""
        histories = [shuffled(items, doc_rng(self.seed, 0, u))[: self.max_items] for u, items in zip(users, train_items)]
        return self._prompt_batch(users, histories)
