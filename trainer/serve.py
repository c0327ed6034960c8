"""Inference bundles: `cllm4rec export` writes one, `cllm4rec recommend` serves top-k items from it.

A bundle holds what the trained model adds to its frozen base, in plain formats::

    bundle/
        adapters/collab/, adapters/content/   PEFT LoRA adapters (LoRA mode)
        id_tables.safetensors                 collab_user, collab_item, content_user, content_item
        model_state.json                      users, items, vocabulary and hidden size, LoRA on/off
        tokenizer/                            the base tokenizer files + id_tokens.json (the ID token layout)
        config.json                           the run's resolved config (model.base_dir: the frozen base)
        train.npz                             users' train items: the prompts, and what is never recommended
        id_maps/                              (when the shards have them) the original user and item ids

It loads with transformers + peft alone (no DeepSpeed): ``AutoModelForCausalLM.from_pretrained
(base)`` then ``PeftModel.from_pretrained(model, "bundle/adapters/collab")``; this module does
that, plus the ID tables. Users are scored in the evaluate stage's blocks (ranking.user_blocks),
so `recommend` reproduces `recommendations.jsonl` exactly.

Beyond the paper, as `evaluate.ensemble`: more bundles of models trained with the same base and
settings (other seeds) serve as one ensemble. The one loaded base takes each bundle's tables and
adapters in turn, each ranks its top `ensemble_depth` items, and the lists are fused with equal
weights, as evaluate writes `recommendations_ensemble.jsonl`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from trainer.batching import Collator
from trainer.config import Config, config_from_dict

log = logging.getLogger("cllm4rec")


def _config_of(source: Path) -> dict:
    """The resolved config of a stage output folder (config.json) or a training checkpoint."""
    if (source / "trainer_state.json").is_file():
        return json.loads((source / "trainer_state.json").read_text())["config"]
    if (source / "config.json").is_file():
        return json.loads((source / "config.json").read_text())
    raise FileNotFoundError(f"{source}: neither a stage output folder (config.json + model_state.json) nor a "
                            "training checkpoint (trainer_state.json); point --from at one")


def _plain_model(cfg: Config, num_users: int, num_items: int):
    """The model as the recipes build it, without DeepSpeed (no ZeRO: an empty DeepSpeed config)."""
    from trainer.engine import build_model

    return build_model(cfg, {}, num_users, num_items)


def export(source, output, overwrite: bool = False) -> Path:
    """Write a bundle (module docstring) from a stage output folder or a training checkpoint."""
    from data_shards.reader import load_index
    from trainer.model_state import load_model_state, save_model_state

    source, output = Path(source), Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} is not empty; pass --overwrite or choose another folder")
    cfg = config_from_dict(_config_of(source), str(source))
    index = load_index(cfg.data.shards)
    model, tokenizer = _plain_model(cfg, index["num_users"], index["num_items"])
    if (source / "trainer_state.json").is_file():
        _load_checkpoint_params(model, source)
    else:
        load_model_state(model, source)
    if output.exists():
        shutil.rmtree(output)
    save_model_state(model, output, rank=0)
    tokenizer.base.save_pretrained(str(output / "tokenizer"))
    (output / "tokenizer" / "id_tokens.json").write_text(json.dumps({
        "user_token": "user_<u>", "item_token": "item_<i>", "first_user_id": tokenizer.user_offset,
        "first_item_id": tokenizer.item_offset, "num_users": tokenizer.num_users, "num_items": tokenizer.num_items,
        "split_pattern": r"(user_\d+|item_\d+)"}, indent=2))
    (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    shutil.copy(Path(cfg.data.shards) / "splits" / "train.npz", output / "train.npz")
    if (Path(cfg.data.shards) / "id_maps").is_dir():
        shutil.copytree(Path(cfg.data.shards) / "id_maps", output / "id_maps")
    log.info("exported %s to %s", source, output)
    return output


def _load_checkpoint_params(model, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "trainable.safetensors"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                if f"param/{name}" not in saved:
                    raise KeyError(f"{checkpoint}: no saved value for {name}; was it saved by another configuration?")
                param.copy_(saved[f"param/{name}"])


def _bundle_meta(bundle: Path) -> dict:
    if not (bundle / "model_state.json").is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle (no model_state.json); make one with `cllm4rec export`")
    return json.loads((bundle / "model_state.json").read_text())


class Recommender:
    """A bundle loaded for scoring, on the CPU (or the device given); with `members`, the
    ensemble of it and those bundles (module docstring)."""

    def __init__(self, bundle, base_dir: str | None = None, members=(), ensemble_depth: int = 100):
        from trainer.model_state import load_model_state

        self.bundle = Path(bundle)
        meta = _bundle_meta(self.bundle)
        self.train = sp.csr_matrix(sp.load_npz(self.bundle / "train.npz"), dtype=np.float32)
        self.members = [Path(m) for m in members]
        self.ensemble_depth = int(ensemble_depth)
        if self.ensemble_depth < 1:
            raise ValueError(f"ensemble depth {ensemble_depth}: items taken from each model's list, at least 1")
        for member in self.members:
            member_meta = _bundle_meta(member)
            if member_meta != meta:
                raise ValueError(f"{member} is not a model of {self.bundle}'s kind: model_state.json "
                                 f"{member_meta} against {meta}; an ensemble's bundles share base and settings")
            train = sp.load_npz(member / "train.npz").tocsr()
            if train.shape != self.train.shape or (train != self.train).nnz:
                raise ValueError(f"{member} was trained on other train data than {self.bundle} (train.npz differs); "
                                 "an ensemble's bundles come from the same shards")
        if len({m.resolve() for m in [self.bundle, *self.members]}) < len(self.members) + 1:
            raise ValueError(f"the ensemble {[str(m) for m in [self.bundle, *self.members]]} repeats a bundle; "
                             "give each once")
        self.cfg = config_from_dict(json.loads((self.bundle / "config.json").read_text()), str(self.bundle),
                                    [f"model.base_dir={base_dir}"] if base_dir else [])
        self.model, tokenizer = _plain_model(self.cfg, meta["num_users"], meta["num_items"])
        load_model_state(self.model, self.bundle)
        self.model.eval()
        self.collator = Collator.from_config(tokenizer, self.cfg)

    def _each_model(self):
        """Loads every model of the ensemble into the one base in turn (just this one, alone)."""
        from trainer.model_state import load_model_state

        if not self.members:
            yield
            return
        for bundle in (self.bundle, *self.members):
            load_model_state(self.model, bundle)
            yield

    def _depth(self, k: int) -> int:
        """Items each model ranks: k alone, at least ensemble_depth in an ensemble."""
        return max(k, self.ensemble_depth) if self.members else k

    def _fused(self, lists: list[np.ndarray], train_rows, k: int) -> np.ndarray:
        from trainer.baselines import fuse_ensemble

        return lists[0][:, :k] if len(lists) == 1 else fuse_ensemble(lists, train_rows, k)

    def for_users(self, users: list[int], k: int, batch_size: int | None = None) -> dict[int, list[int]]:
        """Top-k items of known users (train items excluded), scored in the evaluate stage's blocks."""
        from trainer.ranking import rank_block, user_blocks

        num_users = self.train.shape[0]
        bad = [u for u in users if not 0 <= u < num_users]
        if bad:
            raise ValueError(f"unknown user id(s) {bad[:5]}: this bundle has users 0..{num_users - 1}")
        blocks = user_blocks(num_users, batch_size or self.cfg.evaluate.batch_size)
        size = len(blocks[0])
        users = sorted(set(users))
        depth = self._depth(k)
        lists = []
        for _ in self._each_model():
            ranked = {}
            for b in sorted({u // size for u in users}):
                top = rank_block(self.model, self.collator, self.train, blocks[b], depth, self.cfg.evaluate.item_block)
                ranked.update((int(user), top[row]) for row, user in enumerate(blocks[b]))
            lists.append(np.stack([ranked[u] for u in users]))
        fused = self._fused(lists, self.train[users], k)
        return {user: [int(i) for i in row if i >= 0] for user, row in zip(users, fused)}

    @torch.no_grad()
    def for_history(self, user: int, items: list[int], k: int) -> list[int]:
        """Top-k items for a history passed in (scored with user `user`'s ID token), history excluded."""
        from trainer.metrics import topk_excluding

        num_items = self.train.shape[1]
        bad = [i for i in items if not 0 <= i < num_items]
        if bad:
            raise ValueError(f"unknown item id(s) {bad[:5]}: this bundle has items 0..{num_items - 1}")
        history = np.asarray(items, dtype=np.int64)
        depth = self._depth(k)
        lists = []
        for _ in self._each_model():
            scores = self.model("score", self.collator.score([user], [items]))["scores"]
            lists.append(np.asarray(topk_excluding(scores, [history], depth)))
        seen = sp.csr_matrix((np.ones(len(history)), (np.zeros(len(history), dtype=np.int64), history)),
                             shape=(1, num_items))
        return [int(i) for i in self._fused(lists, seen, k)[0] if i >= 0]


class IdMaps:
    """The data's own ids (an Amazon reviewerID or asin, a MovieLens id) and the contiguous ids a
    bundle scores with: ``id_maps/users.json`` and ``items.json`` (a list: position = contiguous
    id), which `cllm4rec prepare` writes and `cllm4rec export` copies into the bundle."""

    def __init__(self, bundle):
        folder = Path(bundle) / "id_maps"
        paths = {kind: folder / f"{kind}.json" for kind in ("users", "items")}
        if not all(path.is_file() for path in paths.values()):
            raise FileNotFoundError(f"{bundle} has no id maps ({folder}/users.json and items.json): its shards were "
                                    "not made by `cllm4rec prepare`, so it knows only contiguous ids; leave out "
                                    "--original-ids")
        self.names = {kind: [str(v) for v in json.loads(path.read_text())] for kind, path in paths.items()}
        self.ids = {kind: {name: i for i, name in enumerate(names)} for kind, names in self.names.items()}
        self.folder = folder

    def to_ids(self, kind: str, names: list[str]) -> list[int]:
        unknown = [name for name in names if name not in self.ids[kind]]
        if unknown:
            raise ValueError(f"unknown original {kind[:-1]} id(s) {unknown[:5]}: not in {self.folder / (kind + '.json')}")
        return [self.ids[kind][name] for name in names]

    def to_names(self, kind: str, ids: list[int]) -> list[str]:
        return [self.names[kind][i] for i in ids]
