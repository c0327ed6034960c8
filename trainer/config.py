"""Experiment configuration: YAML files in configs/ plus `key.sub=value` overrides.

Every key is declared here, with its meaning beside it. Unknown keys are errors that
name the file (or override) and the key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.loss_config import LossConfig

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ModelSection:
    base_dir: str = ""  # local directory of a Hugging Face causal LM: config, weights and tokenizer
    add_bos: bool = True  # prepend the base's BOS token to every prompt (ignored if it has none)
    # auto = flash_attention_2 when importable, else sdpa_varlen (SDPA one document at a time; a
    # packed row then costs its documents' attention pairs, not width^2); or sdpa / eager, which
    # attend a packed row whole through a block-diagonal mask
    attn_implementation: str = "auto"
    init_std: float = 0.02  # ID-table init N(0, init_std^2), the reference's
    quantization: str = "none"  # none, or nf4: the frozen base in 4-bit via bitsandbytes (QLoRA); LoRA + ID tables train
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in backward: less memory, ~1/3 more compute
    # false: no content LLM (an ablation, not the paper): no content epochs in pretraining or
    # finetuning and no mutual regularization, so only the collaborative model and the rec head train
    content: bool = True
    # dense: each ID table is one parameter under DeepSpeed (ZeRO-3 partitions it and gathers it
    # whole for every call). sharded: each rank owns a range of every table's rows, outside
    # DeepSpeed; lookups and the item head move only the step's rows and scores
    # (model/sharded_tables.py, docs/method.md). Same results; for catalogues of millions of rows.
    id_tables: str = "dense"


@dataclass
class LoraSection:
    r: int = 8  # LoRA rank; 0 = paper mode: LoRA off, only the ID tables train
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])


@dataclass
class DataSection:
    shards: str = ""  # output folder of `cllm4rec build-shards`
    max_text_tokens: int = 256  # content main texts are cut to this many tokens
    max_items: int = 100  # a collab document / rec prompt lists at most this many items (a random subset)
    window_shards: int = 8  # the reader shuffles documents within windows of this many shards (after shuffling shards)
    num_workers: int = 1  # DataLoader worker processes per rank reading and tokenizing batches (0: in the rank)
    checksums: bool = True  # verify every shard's sha256 at start (ranks split the work); false: sizes + tar headers
    bad_shards: str = "error"  # error: stop naming every bad shard; skip: train without them, count and report them
    log_documents: bool = False  # every rank writes the keys of the documents of each step to documents-rank<r>.jsonl
    # Pack each rank's batch into few rows (per-document position ids, attention within documents);
    # false: one document per row, padded to the longest. Which documents form a step is unchanged.
    pack: bool = True
    pack_tokens: int = 1024  # most tokens in a packed row (or the longest document): sdpa/eager pay width^2 per row


@dataclass
class PretrainSection:
    content_warmup_epochs: int = 1  # content-only epochs first (reference: 10)
    rounds: int = 2  # then this many rounds of one collaborative epoch + one content epoch
    collab_batch_size: int = 16  # documents per rank per step
    content_batch_size: int = 8
    lr: float = 1e-3  # Adam learning rate (reference: 1e-3)
    # Beyond the paper (off in paper mode): cosine decay of lr to 0 over the stage's steps, after
    # warmup_steps of linear warmup from 0. constant: lr throughout (the paper's).
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8  # Adam epsilon: an update is lr * g / (|g| + eps) on a fresh state (see docs/testing.md)
    max_steps_per_epoch: int = 0  # 0 = whole epoch; >0 caps every epoch (smoke runs)


@dataclass
class FinetuneSection:
    init_from: str = ""  # a pretrain output folder; default <run.dir>/pretrain
    epochs: int = 3  # recommendation epochs; validation after each picks the best
    batch_size: int = 16  # users per rank per step
    content_batch_size: int = 8
    content_epochs: bool = True  # one content epoch after each rec epoch (mutual regularization both ways)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant (the paper's) or cosine, as pretrain.lr_schedule
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    holdout_fraction: float = 0.2  # share of each user's train items masked out of the prompt
    target: str = "heldout"  # heldout (the paper) or all_train (the reference code)
    select_metric: str = "recall@20"  # validation metric for model selection
    max_steps_per_epoch: int = 0


@dataclass
class EvaluateSection:
    checkpoint: str = ""  # a finetune or pretrain output folder; default <run.dir>/finetune
    batch_size: int = 32  # users per rank per forward pass
    item_block: int = 65536  # items scored at a time against a running top-100: memory bounded for any item count
    splits: list = field(default_factory=lambda: ["val", "test"])
    recommendations: bool = False  # also write recommendations.jsonl (top-100 per user, train items excluded)
    baselines: bool = True  # print popularity and EASE (lambda chosen on val) beside the model
    # Beyond the paper, off in paper mode: also report the model's ranking fused with EASE's
    # (weighted reciprocal-rank fusion, trainer/baselines.py), the EASE weight chosen on val.
    # Its own row; the model's row is unchanged. Needs baselines and the val split.
    ease_fusion: bool = False
    # Beyond the paper, off in paper mode: finetune output folders of more models with this run's
    # base and settings (e.g. the same stages run with other run.seed values). Each is ranked as
    # this run's checkpoint is, and the rankings are fused with equal weights: the "ensemble"
    # entry of metrics.json, and the ranking the EASE fusion then takes. The model's row is this
    # run's checkpoint alone.
    ensemble: list = field(default_factory=list)
    fusion_weights: list = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # EASE weights tried on val
    fusion_depth: int = 500  # items per user taken from each ranking into the fusion


@dataclass
class RunSection:
    dir: str = "runs/quickstart"  # every stage writes below this folder
    seed: int = 0  # seeds data order, item reordering, hold-out masks, init and dropout
    deepspeed: str = "configs/ds_zero3.json"  # DeepSpeed JSON config
    log_every: int = 1  # print a loss line every this many steps (every step goes to train_log.jsonl)
    save_every_steps: int = 0  # also checkpoint every this many training steps (0: only at epoch ends)
    keep_checkpoints: int = 2  # newest checkpoints kept per stage
    peak_tflops: float = 0.0  # peak TFLOP/s of one rank for the logged MFU; 0 = a known GPU's data sheet, or measured on CPU
    resume: str = ""  # "" = start fresh; auto = continue from the stage's newest checkpoint, if any; or a checkpoint folder
    # seconds a collective may wait for the other ranks before failing on every rank that waits
    # (a rank hung, or gone on another node); the deepspeed launcher ends a node's ranks at once
    # when one of them dies
    collective_timeout_s: float = 1800.0


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossConfig = field(default_factory=LossConfig)  # the model's own loss settings (model/loss_config.py)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _apply(section, values: dict, origin: str, prefix: str = "") -> None:
    known = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise KeyError(f"{origin}: unknown config key '{prefix}{key}'; known keys: {', '.join(known)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"{origin}: '{prefix}{key}' is a section; give it a mapping, not {value!r}")
            _apply(current, value, origin, f"{prefix}{key}.")
            continue
        if isinstance(current, bool) and not isinstance(value, bool):
            raise TypeError(f"{origin}: '{prefix}{key}' must be true or false, got {value!r}")
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, str):
                value = _number(value)  # YAML 1.1 reads 1e-5 (no dot) as text
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{origin}: '{prefix}{key}' must be a number, got {value!r}")
            if isinstance(current, int) and not float(value).is_integer():
                raise TypeError(f"{origin}: '{prefix}{key}' must be a whole number, got {value!r}")
            value = type(current)(value)
        if isinstance(current, list) and not isinstance(value, list):
            raise TypeError(f"{origin}: '{prefix}{key}' must be a list, got {value!r}")
        setattr(section, key, value)


def config_from_dict(values: dict, origin: str, overrides: list[str] = ()) -> Config:
    """A config saved as a dict (config.json of a run or checkpoint), then overrides."""
    cfg = Config()
    _apply(cfg, values, origin)
    _apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `a.b=value` overrides (values parsed as YAML)."""
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found (see configs/ for examples)")
    values = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    return config_from_dict(values, str(path), overrides)


def _apply_overrides(cfg: Config, overrides) -> None:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        nested: dict = {}
        cursor = nested
        keys = dotted.split(".")
        for key in keys[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[keys[-1]] = value
        _apply(cfg, nested, f"override '{item}'")


def _validate(cfg: Config) -> None:
    if cfg.finetune.target not in ("heldout", "all_train"):
        raise ValueError(f"finetune.target must be 'heldout' or 'all_train', got {cfg.finetune.target!r}")
    if not 0 < cfg.finetune.holdout_fraction < 1:
        raise ValueError(f"finetune.holdout_fraction must be in (0, 1), got {cfg.finetune.holdout_fraction}")
    if cfg.lora.r < 0:
        raise ValueError(f"lora.r must be >= 0 (0 = paper mode), got {cfg.lora.r}")
    for name, value in (("pretrain.collab_batch_size", cfg.pretrain.collab_batch_size),
                        ("pretrain.content_batch_size", cfg.pretrain.content_batch_size),
                        ("finetune.batch_size", cfg.finetune.batch_size),
                        ("finetune.content_batch_size", cfg.finetune.content_batch_size),
                        ("finetune.epochs", cfg.finetune.epochs), ("evaluate.batch_size", cfg.evaluate.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for stage in ("pretrain", "finetune"):
        section = getattr(cfg, stage)
        if section.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{stage}.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {section.lr_schedule!r}")
        if section.warmup_steps < 0:
            raise ValueError(f"{stage}.warmup_steps must be >= 0, got {section.warmup_steps}")
    if cfg.finetune.select_metric not in ("recall@20", "recall@40", "ndcg@100"):
        raise ValueError(f"finetune.select_metric must be recall@20, recall@40 or ndcg@100, "
                         f"got {cfg.finetune.select_metric!r}")
    unknown_splits = set(cfg.evaluate.splits) - {"val", "test"}
    if unknown_splits:
        raise ValueError(f"evaluate.splits: unknown split(s) {sorted(unknown_splits)}; use val and/or test")
    if cfg.evaluate.ease_fusion:
        if not (cfg.evaluate.baselines and "val" in cfg.evaluate.splits):
            raise ValueError("evaluate.ease_fusion needs evaluate.baselines=true and 'val' in evaluate.splits "
                             "(the fusion weight is chosen on validation)")
        if not cfg.evaluate.fusion_weights or not all(0 <= w <= 1 for w in cfg.evaluate.fusion_weights):
            raise ValueError(f"evaluate.fusion_weights must be a non-empty list of EASE weights in [0, 1], "
                             f"got {cfg.evaluate.fusion_weights}")
        if cfg.evaluate.fusion_depth < 100:
            raise ValueError(f"evaluate.fusion_depth must be at least 100 (the metrics' depth), "
                             f"got {cfg.evaluate.fusion_depth}")
    if cfg.data.bad_shards not in ("error", "skip"):
        raise ValueError(f"data.bad_shards must be 'error' or 'skip', got {cfg.data.bad_shards!r}")
    for name, value in (("data.window_shards", cfg.data.window_shards), ("run.keep_checkpoints", cfg.run.keep_checkpoints),
                        ("data.pack_tokens", cfg.data.pack_tokens), ("evaluate.item_block", cfg.evaluate.item_block)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for name, value in (("data.num_workers", cfg.data.num_workers), ("run.save_every_steps", cfg.run.save_every_steps),
                        ("loss.vocab_chunk", cfg.loss.vocab_chunk)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if cfg.model.id_tables not in ("dense", "sharded"):
        raise ValueError(f"model.id_tables must be 'dense' or 'sharded', got {cfg.model.id_tables!r}")
    if cfg.model.quantization not in ("none", "nf4"):
        raise ValueError(f"model.quantization must be 'none' or 'nf4', got {cfg.model.quantization!r}")
    attentions = ("auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2")
    if cfg.model.attn_implementation not in attentions:
        raise ValueError(f"model.attn_implementation: unknown value {cfg.model.attn_implementation!r}; "
                         f"use one of {', '.join(attentions)}")
