"""A small synthetic dataset in the CLLM4Rec folder format (for the quick start and tests).

Users and items belong to latent clusters; a user picks about 85% of its items from its own
cluster (popularity-weighted), so item-item models (EASE) beat popularity clearly. Titles,
categories and reviews use cluster-specific words, so the text carries the same signal.
Every user has >= 5 interactions, split per user at random about 80/10/10 with >= 1 val and
>= 1 test item. Reviews exist only for train pairs. Seeded and deterministic.

The folder is written exactly like the real ones (meta.pkl, {train,val,test}_matrix.npz,
item_texts/{title,categories}.pkl, user_item_texts/review.pkl), so it goes through the same
:func:`data_shards.sources.load_cllm4rec` path. It uses pickle only because that is the
CLLM4Rec input format.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.sparse as sp

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "bar", "cel", "dor", "fen", "gil",
              "hul", "jas", "kor", "lum", "mor", "nix", "pra", "quo", "ros", "tel", "ul", "vin", "wex", "yar")
_NOUNS = ("Cream", "Serum", "Lotion", "Shampoo", "Conditioner", "Polish", "Mask", "Cleanser", "Oil", "Balm")
_GENERIC = ("really", "quite", "very", "nice", "good", "works", "skin", "hair", "smell", "texture",
            "price", "bottle", "daily", "would", "buy", "again")


def _word(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        w = "".join(_SYLLABLES[int(k)] for k in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
        if w not in used:
            used.add(w)
            return w


def _sentences(rng, words, n_words) -> str:
    pick = [words[int(k)] for k in rng.integers(len(words), size=n_words)]
    return " ".join(pick)


def write_synthetic_cllm4rec(out_dir, num_users: int = 300, num_items: int = 200, num_clusters: int = 8,
                             seed: int = 0) -> Path:
    """Write the synthetic CLLM4Rec folder to ``out_dir`` (created if needed) and return its path."""
    if num_items < 5:
        raise ValueError(f"num_items must be >= 5 (every user has >= 5 interactions), got {num_items}")
    if not 1 <= num_clusters <= num_items:
        raise ValueError(f"need 1 <= num_clusters <= num_items, got {num_clusters}")
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    out = Path(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 20240611]))

    user_cluster = rng.integers(num_clusters, size=num_users)
    item_cluster = rng.permutation(np.arange(num_items) % num_clusters)
    popularity = rng.lognormal(0.0, 0.8, size=num_items)

    rows = {"train": [], "val": [], "test": []}
    for u in range(num_users):
        same = item_cluster == user_cluster[u]
        in_mass, out_mass = popularity[same].sum(), popularity[~same].sum()
        w = popularity.copy()
        if out_mass > 0:
            w[~same] *= (0.15 / 0.85) * in_mass / out_mass
        n = int(min(num_items, 5 + rng.poisson(5)))
        items = rng.choice(num_items, size=n, replace=False, p=w / w.sum())
        n_val = max(1, int(round(0.1 * n)))
        n_test = max(1, int(round(0.1 * n)))
        perm = rng.permutation(items)
        rows["val"] += [(u, int(i)) for i in perm[:n_val]]
        rows["test"] += [(u, int(i)) for i in perm[n_val:n_val + n_test]]
        rows["train"] += [(u, int(i)) for i in perm[n_val + n_test:]]

    out.mkdir(parents=True, exist_ok=True)
    shape = (num_users, num_items)
    for name, pairs in rows.items():
        r = np.array([p[0] for p in pairs], dtype=np.int64)
        c = np.array([p[1] for p in pairs], dtype=np.int64)
        m = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (r, c)), shape=shape)
        m.sort_indices()
        sp.save_npz(out / f"{name}_matrix.npz", m)
    meta = {"num_users": int(num_users), "num_items": int(num_items), "dataset": "synthetic",
            "num_clusters": int(num_clusters), "seed": int(seed)}
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump(meta, f, protocol=4)

    # Cluster vocabularies: a brand, category words and descriptive words per cluster.
    used: set[str] = set()
    brand = [_word(rng, used).capitalize() for _ in range(num_clusters)]
    cats = [[_word(rng, used).capitalize() for _ in range(2)] for _ in range(num_clusters)]
    words = [[_word(rng, used) for _ in range(10)] for _ in range(num_clusters)]

    titles, categories = [], []
    item_noun = {}
    for i in range(num_items):
        c = int(item_cluster[i])
        noun = _NOUNS[int(rng.integers(len(_NOUNS)))]
        item_noun[i] = noun
        w1, w2 = (words[c][int(k)] for k in rng.choice(len(words[c]), size=2, replace=False))
        titles.append([f"The title of item_{i} is:", f" {brand[c]} {w1.capitalize()} {w2.capitalize()} {noun}"])
        categories.append([f"The categories of item_{i} are:", f" Beauty, {cats[c][0]}, {cats[c][1]}"])
    reviews = []
    for u, i in rows["train"]:
        c = int(item_cluster[i])
        text = (f" This {item_noun[i].lower()} is {_sentences(rng, words[c], 3)}. "
                f"{_sentences(rng, _GENERIC, 4).capitalize()} {_sentences(rng, words[c], 2)}, "
                f"{brand[c]} {_sentences(rng, _GENERIC, 3)}.")
        reviews.append([f"user_{u} wrote about item_{i}:", text])

    (out / "item_texts").mkdir(exist_ok=True)
    (out / "user_item_texts").mkdir(exist_ok=True)
    for path, data in ((out / "item_texts" / "title.pkl", titles),
                       (out / "item_texts" / "categories.pkl", categories),
                       (out / "user_item_texts" / "review.pkl", reviews)):
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=4)
    return out
