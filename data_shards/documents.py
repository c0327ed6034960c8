"""The method's document templates (docs/method.md) and per-use randomness.

Model-agnostic: everything here is plain strings and integer ids; tokenization is the
model's business. ``user_<u>`` / ``item_<i>`` are the atomic ID tokens of the method.

Randomness: a document's stochastic item reordering (and its recommendation hold-out) is
drawn from :func:`doc_rng` seeded with (seed, epoch, position), where position is the
document's global position in the epoch order (the ``"pos"`` key the shard reader adds).
That makes the draws independent of the rank layout: the same document at the same global
position gets the same permutation on 1 rank or on 64.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# Kinds that describe an item, a (user, item) pair, or a user.
_CONTENT_PROMPTS = {
    "review": "user_{u} wrote the following review for item_{i}:",
    "title": "The title of item_{i} is:",
    "brand": "The brand of item_{i} is:",
    "categories": "The categories of item_{i} are:",
    "description": "The description of item_{i} is:",
    "tags": "The tags of item_{i} are:",
    "biography": "The biography of user_{u} is:",
}
CONTENT_KINDS = tuple(_CONTENT_PROMPTS)


def collab_prompt(user: int) -> str:
    """Prompt of a collaborative document: ``"user_{u} has interacted with"``."""
    return f"user_{int(user)} has interacted with"



def item_sequence(items: Iterable[int]) -> str:
    """``"item_a item_b ..."``: single spaces, no leading or trailing space ("" for no items)."""
    return " ".join(f"item_{int(i)}" for i in items)


def content_prompt(kind: str, user: int | None, item: int | None) -> str:
    """Prompt of a content document of the given kind (see docs/method.md)."""
    try:
        template = _CONTENT_PROMPTS[kind]
    except KeyError:
        raise ValueError(f"unknown content kind {kind!r}; expected one of {CONTENT_KINDS}") from None
    if "{u}" in template and user is None:
        raise ValueError(f"a {kind!r} document needs a user id")
    if "{i}" in template and item is None:
        raise ValueError(f"a {kind!r} document needs an item id")
    return template.format(u=None if user is None else int(user), i=None if item is None else int(item))


def content_text(text: str) -> str:
    """Main text of a content document: one leading space + the stripped text."""
    return " " + text.strip()


def rec_prompt(user: int, history: Sequence[int]) -> str:
    """Recommendation prompt (finetuning and evaluation).

    ``"user_{u} has interacted with item_a item_b, user_{u} will interact with"``; with an empty
    history ``"user_{u} has interacted with, user_{u} will interact with"``.
    """
    u = int(user)
    seq = item_sequence(history)
    head = f"user_{u} has interacted with" + (f" {seq}" if seq else "")
    return f"{head}, user_{u} will interact with"


def doc_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The per-use RNG of one document: ``Generator(PCG64(SeedSequence([seed, epoch, position])))``.

    All three must be non-negative integers (SeedSequence's requirement).
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(position)]))


def shuffled(items: Iterable[int], rng: np.random.Generator) -> list[int]:
    """A random permutation of ``items`` (as Python ints) drawn from ``rng``."""
    arr = np.asarray(list(items), dtype=np.int64)
    return [int(x) for x in rng.permutation(arr)] if arr.size else []


def holdout_split(items: Sequence[int], fraction: float = 0.2,
                  rng: np.random.Generator | None = None) -> tuple[list[int], list[int]]:
    """Split a user's train items into (history, heldout) for recommendation finetuning.

    ``floor(fraction * n)`` items, at least 1, are held out at random; when n >= 2 at least one
    item stays in the history (so n == 1 gives an empty history). ``history`` is in random order
    (it is the prompt's item order); ``heldout`` is sorted ascending (it is a multi-hot target).
    ``rng`` is required (use :func:`doc_rng`): the split must be reproducible.
    """
    if rng is None:
        raise ValueError("holdout_split needs an rng (e.g. doc_rng(seed, epoch, pos)) so that it is reproducible")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    arr = np.asarray(list(items), dtype=np.int64)
    n = int(arr.size)
    if n == 0:
        return [], []
    k = max(1, math.floor(fraction * n + 1e-9))
    if n >= 2:
        k = min(k, n - 1)
    perm = rng.permutation(arr)
    history = [int(x) for x in perm[k:]]
    heldout = sorted(int(x) for x in perm[:k])
    return history, heldout
