"""Engine setup shared by the recipes: the DeepSpeed config, the model (tokenizer, frozen base,
LoRA adapters, ID tables) and the DeepSpeed engine around it."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import torch

from model.cllm4rec import CLLM4Rec
from model.lora import add_adapters
from model.tokenizer import IDTokenizer
from trainer import backbone as backbone_io
from trainer import compat
from trainer.config import Config
from trainer.resources import tune_host_allocator

log = logging.getLogger("cllm4rec")


def load_ds_config(path: str, micro_batch: int) -> dict:
    config_path = Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"run.deepspeed={path!r}: DeepSpeed config not found (see configs/ds_*.json)")
    ds = json.loads(config_path.read_text())
    world = torch.distributed.get_world_size()
    accumulation = int(ds.get("gradient_accumulation_steps", 1))
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["train_batch_size"] = micro_batch * accumulation * world
    ds.setdefault("zero_allow_untested_optimizer", True)
    if ds.get("zero_optimization", {}).get("offload_optimizer"):
        ds["zero_force_ds_cpu_optimizer"] = False  # our client optimizer runs on the CPU partition
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def zero3_init(ds_config: dict):
    """A context in which new parameters are partitioned as they are created (ZeRO-3 only)."""
    if zero_stage(ds_config) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the base is loaded and computed in: what the DeepSpeed config trains in."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def check_supported(cfg: Config, ds_config: dict) -> None:
    """Refuse, before any loading, combinations that cannot work, naming the keys to change."""
    zero = ds_config.get("zero_optimization", {})
    where = f"run.deepspeed={cfg.run.deepspeed}"
    if cfg.model.quantization == "nf4":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("model.quantization=nf4 needs bitsandbytes (pip install bitsandbytes>=0.50.2)")
        if zero.get("offload_param"):
            raise ValueError(f"model.quantization=nf4 with {where}: a 4-bit base cannot be offloaded by ZeRO "
                             "(offload_param); use configs/ds_zero3.json or ds_zero3_offload_opt.json")
        if ds_config.get("fp16", {}).get("enabled"):
            raise ValueError(f"model.quantization=nf4 with fp16 in {where}: use bf16 or fp32 compute")
    if cfg.model.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use auto or sdpa on CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 but flash-attn is not installed "
                             "(pip install -e '.[gpu]'), or use auto")
        if compute_dtype(ds_config) == torch.float32:
            raise ValueError(f"model.attn_implementation=flash_attention_2 needs bf16 or fp16 in {where} "
                             "(flash-attn has no fp32 kernels)")
    if cfg.model.id_tables == "sharded":
        if ds_config.get("fp16", {}).get("enabled"):
            raise ValueError(f"model.id_tables=sharded with fp16 in {where}: DeepSpeed's loss scaling does not "
                             "see the table shards (they live outside it); use bf16 or fp32")
        if float(ds_config.get("gradient_clipping", 0) or 0) > 0:
            raise ValueError(f"model.id_tables=sharded with gradient_clipping in {where}: DeepSpeed's clipping "
                             "norm would leave out the table shards; remove gradient_clipping or use dense tables")
        if int(ds_config.get("gradient_accumulation_steps", 1)) > 1:
            raise ValueError(f"model.id_tables=sharded with gradient_accumulation_steps > 1 in {where}: the shards "
                             "step on every micro-batch; raise the batch size instead")
    if zero.get("offload_param") and zero_stage(ds_config) != 3:
        raise ValueError(f"{where}: offload_param needs ZeRO stage 3")
    if ds_config.get("fp16", {}).get("enabled") and ds_config.get("bf16", {}).get("enabled"):
        raise ValueError(f"{where}: enable bf16 or fp16, not both")


def build_model(cfg: Config, ds_config: dict, num_users: int, num_items: int) -> tuple[CLLM4Rec, IDTokenizer]:
    """Tokenizer with ID tokens, frozen base (+ two LoRA adapters), ID tables; before any of them,
    the host allocator is set for the ZeRO stage (tune_host_allocator)."""
    check_supported(cfg, ds_config)
    log.info("host memory: %s", tune_host_allocator(zero_stage(ds_config) == 3))
    dtype = compute_dtype(ds_config)
    base_tokenizer = backbone_io.load_tokenizer(cfg.model.base_dir)
    hf_model, attention = backbone_io.load_backbone(
        cfg.model.base_dir, cfg.model.attn_implementation, dtype,
        zero3_config=ds_config if zero_stage(ds_config) == 3 and cfg.model.quantization == "none" else None,
        quantization=cfg.model.quantization)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so a frozen base with
        # LoRA (or with only the ID tables training) recomputes correctly.
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing: on (activations of each decoder layer are recomputed in backward)")
    vocab_size = hf_model.config.vocab_size
    if vocab_size < len(base_tokenizer):
        raise ValueError(f"{cfg.model.base_dir}: the tokenizer has {len(base_tokenizer)} tokens but the model's "
                         f"vocabulary only {vocab_size}")
    tokenizer = IDTokenizer(base_tokenizer, num_users, num_items, cfg.model.add_bos, vocab_size)
    if cfg.lora.r > 0:
        backbone = add_adapters(hf_model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        mode = f"LoRA r={cfg.lora.r} on {','.join(cfg.lora.target_modules)} + ID tables"
    else:
        backbone = hf_model
        mode = "paper mode: LoRA off, only the ID tables train"
    loss = cfg.loss if cfg.model.content else dataclasses.replace(cfg.loss, lambda_c=0.0)
    if not cfg.model.content:
        mode += "; no content model (model.content=false): no content epochs, no mutual regularization"
    # Under ZeRO-3 the ID tables (rows x hidden size: gigabytes for large catalogues) are
    # partitioned as they are created.
    sharded = cfg.model.id_tables == "sharded"
    # The shards' collectives get a group of their own, so that they never interleave with ZeRO's.
    table_group = torch.distributed.new_group() if sharded and torch.distributed.is_initialized() else None
    with zero3_init(ds_config):
        model = CLLM4Rec(backbone, vocab_size, num_users, num_items, loss, cfg.model.init_std, attention,
                         seed=cfg.run.seed, sharded_tables=sharded, table_group=table_group)
    # Trainable weights (tables, LoRA) run in the base's dtype: ZeRO-3 keeps one flat buffer of
    # them in a single dtype, and under bf16 the optimizer holds their fp32 master copies.
    # (Partitioned ones were created in that dtype already.)
    for param in model.parameters():
        if param.requires_grad and not compat.is_partitioned(param):
            param.data = param.data.to(dtype)
    trainable = sum(compat.full_numel(p) for p in model.parameters() if p.requires_grad)
    if sharded:
        trainable += sum(t.num_rows * t.dim for t in model.tables.values())
        mode += f"; ID tables row-sharded over {torch.distributed.get_world_size()} rank(s)"
    log.info("model: %s; %d users, %d items; %s trainable parameters", mode, num_users, num_items, f"{trainable:,}")
    return model, tokenizer


def throughput_meter(cfg: Config, model: CLLM4Rec, ds_config: dict):
    from trainer.throughput import Throughput, peak_tflops_per_rank

    peak, source = peak_tflops_per_rank(cfg.run.peak_tflops, compute_dtype(ds_config))
    return Throughput(model.backbone.config, model.vocab_size, model.num_items,
                      torch.distributed.get_world_size(), peak, source)


def build_engine(model: CLLM4Rec, ds_config: dict, optimizer=None, lr_scheduler=None):
    import deepspeed

    if optimizer is None and (stage := zero_stage(ds_config)) in (1, 2):
        # ZeRO-1/2 partition an optimizer's states and the gradients, which evaluation has none of
        # (DeepSpeed refuses those stages without an optimizer); every rank holds the whole model
        # under them anyway, so it runs as it would have.
        ds_config = {**ds_config, "zero_optimization": {"stage": 0}}
        log.info("no optimizer (evaluation): ZeRO stage %s has nothing to partition, the engine runs at stage 0",
                 stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    return engine
