"""Process setup shared by the recipes: distributed init, the model, the DeepSpeed engine."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import socket
from pathlib import Path

import numpy as np
import torch

from model.cllm4rec import CLLM4Rec, LossConfig
from model.lora import add_adapters
from model.tokenizer import IDTokenizer
from trainer import backbone as backbone_io
from trainer.config import Config

log = logging.getLogger("cllm4rec")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(collective_timeout_s: float = 1800) -> tuple[int, int]:
    """Start (or join) the process group; returns (rank, world_size). A collective that waits
    longer than `collective_timeout_s` (a rank hung or gone on another node) fails on every rank
    still waiting, instead of holding its nodes until the job's wall-time limit."""
    import deepspeed

    # Tokenization runs in DataLoader worker processes; the tokenizer's own thread pool would
    # be forked with them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        # Started by mpirun (LAUNCHER=openmpi): DeepSpeed would need mpi4py to read these;
        # MASTER_ADDR/MASTER_PORT come from .deepspeed_env.
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    if "RANK" not in os.environ:  # a plain `python`/pytest process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # The shared-memory comm op JIT-compiles for over a minute on first use; plain gloo
        # collectives give identical results. (A private DeepSpeed switch, read at init.)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        from datetime import timedelta

        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl",
                                   timeout=timedelta(seconds=collective_timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    setup_logging(rank)
    return rank, world


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stream_readers(cfg: Config, batch_sizes: dict[str, int]) -> dict:
    """This rank's reader of each shard stream (name -> documents per rank per step), after every
    shard of every stream has been checked. The recipes call it before loading the base, so a bad
    shard folder is reported in seconds, however large the base.

    The ranks split the checks (rank r checks shards r, r+W, ...) and share what they found,
    so every rank makes the same decision: stop naming every bad shard of every stream
    (data.bad_shards=error) or leave the bad shards out of the order and report how many (skip).
    """
    from data_shards.reader import ShardError, ShardReader

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def reader(stream, skip=()):
        return ShardReader(cfg.data.shards, stream, batch_sizes[stream], rank, world, cfg.run.seed,
                           cfg.data.window_shards, skip_shards=tuple(skip))

    readers = {stream: reader(stream) for stream in batch_sizes}
    mine = {stream: r.problems(cfg.data.checksums, range(rank, len(r.shards), world)) for stream, r in readers.items()}
    found: list = [None] * world
    torch.distributed.all_gather_object(found, mine)
    problems = {stream: [p for part in found for p in part[stream]] for stream in readers}
    bad_streams = {stream: found_here for stream, found_here in problems.items() if found_here}
    if bad_streams and cfg.data.bad_shards == "error":
        raise ShardError("; ".join(f"stream {stream!r}: " + "; ".join(found_here)
                                   for stream, found_here in bad_streams.items())
                         + ". Rebuild the shards (cllm4rec prepare/build-shards --overwrite), or set "
                         "data.bad_shards=skip to train without them")
    for stream, found_here in bad_streams.items():
        r = readers[stream]
        bad = [s["path"] for s in r.shards if any(str(r.shard_path(s)) in p for p in found_here)]
        log.warning("stream %r: skipping %d bad shard(s) (data.bad_shards=skip): %s", stream, len(bad), found_here)
        readers[stream] = reader(stream, bad)
    for stream, r in readers.items():
        log.info("stream %r: %d docs in %d shards, %d steps/epoch of %d docs%s%s", stream, r.num_docs,
                 len(r.shards), r.steps_per_epoch, r.global_batch_size,
                 f"; {r.unused_per_epoch} doc(s) sit out each epoch (the last global batch does not split evenly "
                 "across the ranks)" if r.unused_per_epoch else "",
                 f"; {len(r.skipped)} bad shard(s) skipped" if r.skipped else "")
    return readers


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


MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_host_allocator(ds_config: dict) -> str:
    """Choose how glibc's malloc serves large blocks of host memory, by ZeRO stage; returns the
    choice (logged).

    Every step frees and re-allocates large tensors: whole ID-table gradients and DeepSpeed's
    flat buffers, and under ZeRO-3 layer-sized gather buffers in a changing order. Under ZeRO-3,
    kept in the heap, those fragment it (a 1B base on CPU grew to 12 GB per rank instead of
    3.9 GB), so blocks from 64 KiB up are mapped and handed back when freed. Below ZeRO-3 the
    same sizes recur every step and the heap serves them again: mapping them anew made every
    block fault its pages in again, up to 40% of a paper-mode step on a GPT-2-small base on CPU.
    Any MALLOC_* or GLIBC_TUNABLES setting in the environment is left to rule.
    """
    import ctypes

    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return "as set in the environment (" + ", ".join(n for n in MALLOC_ENVIRONMENT if n in os.environ) + ")"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return "the system's default (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # glibc's malloc.h
    if zero_stage(ds_config) == 3:
        settings = [(m_mmap_threshold, 64 * 1024)]
        choice = "blocks of 64 KiB and more are mapped and returned to the system when freed (ZeRO-3)"
    else:
        settings = [(m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)]
        choice = "every block from the heap, which keeps freed memory for the next step (ZeRO stage < 3)"
    if not all(mallopt(option, value) == 1 for option, value in settings):  # mallopt returns 1 on success
        return f"glibc refused the setting for this ZeRO stage ({choice}); set MALLOC_* variables to choose"
    return choice


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
    if zero.get("offload_param") and zero_stage(ds_config) != 3:
        raise ValueError(f"{where}: offload_param needs ZeRO stage 3")
    if ds_config.get("fp16", {}).get("enabled") and ds_config.get("bf16", {}).get("enabled"):
        raise ValueError(f"{where}: enable bf16 or fp16, not both")


def build_model(cfg: Config, ds_config: dict, num_users: int, num_items: int) -> tuple[CLLM4Rec, IDTokenizer]:
    """Tokenizer with ID tokens, frozen base (+ two LoRA adapters), ID tables; before any of them,
    the host allocator is set for the ZeRO stage (tune_host_allocator)."""
    check_supported(cfg, ds_config)
    log.info("host memory: %s", tune_host_allocator(ds_config))
    dtype = compute_dtype(ds_config)
    base_tokenizer = backbone_io.load_tokenizer(cfg.model.base_dir)
    hf_model, _ = backbone_io.load_backbone(
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
    loss = LossConfig(cfg.loss.lambda_c if cfg.model.content else 0.0, cfg.loss.lambda_l, cfg.loss.vocab_chunk)
    if not cfg.model.content:
        mode += "; no content model (model.content=false): no content epochs, no mutual regularization"
    # Under ZeRO-3 the ID tables (rows x hidden size: gigabytes for large catalogues) are
    # partitioned as they are created.
    with zero3_init(ds_config):
        model = CLLM4Rec(backbone, vocab_size, num_users, num_items, loss, cfg.model.init_std)
    # Trainable weights (tables, LoRA) run in the base's dtype: ZeRO-3 keeps one flat buffer of
    # them in a single dtype, and under bf16 the optimizer holds their fp32 master copies.
    # (Partitioned ones were created in that dtype already.)
    for param in model.parameters():
        if param.requires_grad and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    log.info("model: %s; %d users, %d items; %s trainable parameters", mode, num_users, num_items, f"{trainable:,}")
    return model, tokenizer


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


# This process's peak RSS when its engine was built (base loaded and partitioned): the
# loading peak, reported beside the stage's overall peak.
_setup_peak_mb: float | None = None


def report_resources(out_dir: Path, stage: str, started: float, skipped_shards: dict | None = None) -> dict:
    """Wall time, every rank's peak RSS (after setup and overall) and the shards left out
    (data.bad_shards=skip), logged and written to <out_dir>/resources.json by rank 0."""
    import time

    world = torch.distributed.get_world_size()
    peaks, setup_peaks = [None] * world, [None] * world
    torch.distributed.all_gather_object(peaks, peak_rss_mb())
    torch.distributed.all_gather_object(setup_peaks, _setup_peak_mb)
    report = {"stage": stage, "wall_s": round(time.time() - started, 1), "peak_rss_mb_per_rank": peaks,
              "setup_peak_rss_mb_per_rank": setup_peaks, "skipped_shards": skipped_shards or {}}
    if torch.distributed.get_rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "resources.json").write_text(json.dumps(report, indent=2))
        log.info("%s: %.1f s wall, peak RSS per rank %s MB (after setup %s MB)", stage, report["wall_s"], peaks,
                 setup_peaks)
    return report


def throughput_meter(cfg: Config, model: CLLM4Rec, ds_config: dict):
    from trainer.throughput import Throughput, peak_tflops_per_rank

    peak, source = peak_tflops_per_rank(cfg.run.peak_tflops, compute_dtype(ds_config))
    return Throughput(model.backbone.config, model.vocab_size, model.num_items,
                      torch.distributed.get_world_size(), peak, source)


def build_engine(model: CLLM4Rec, ds_config: dict, optimizer=None):
    import deepspeed

    global _setup_peak_mb
    if optimizer is None and (stage := zero_stage(ds_config)) in (1, 2):
        # ZeRO-1/2 partition an optimizer's states and the gradients, which evaluation has none of
        # (DeepSpeed refuses those stages without an optimizer); every rank holds the whole model
        # under them anyway, so it runs as it would have.
        ds_config = {**ds_config, "zero_optimization": {"stage": 0}}
        log.info("no optimizer (evaluation): ZeRO stage %s has nothing to partition, the engine runs at stage 0",
                 stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    _setup_peak_mb = peak_rss_mb()
    return engine
