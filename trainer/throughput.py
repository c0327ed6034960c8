"""Tokens/s, documents/s and model-FLOPs utilisation (MFU) of training steps.

FLOP convention. A training step costs 4 * N * tokens FLOPs, where tokens are the real
(non-padding) tokens of the step and N the weights a token passes through: the base's
decoder layers plus the step's output head (the vocabulary head for content documents, the
item table for collaborative and recommendation documents). The forward pass is 2N per token;
the backward pass computes activation gradients (2N) but no weight gradients, because the base
is frozen. The weight gradients of LoRA and of the ID rows a step touches (under 1% of N), and
attention's sequence-length term, are not counted. With gradient checkpointing the recomputed
forward is not counted either (MFU counts useful work).

MFU = (FLOPs of the step over all ranks / step time) / (world size * peak FLOP/s per rank).
The peak is run.peak_tflops when set; otherwise the dense bf16/fp16 or fp32 peak of a known GPU,
or on a CPU the measured throughput of a large matmul in the compute dtype.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("cllm4rec")

# Dense tensor-core peaks (TFLOP/s) from the vendors' data sheets: (bf16/fp16, fp32 without TF32).
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
                   "A10": (125.0, 31.2), "V100": (125.0, 15.7)}


def measure_matmul_tflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3, device: str = "cpu") -> float:
    # A private generator: drawing from the global one would shift a resumed run's dropout stream.
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, dtype=dtype, device=device, generator=generator) for _ in range(2))
    a @ b  # the first call pays one-off setup
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size ** 3 * runs / (time.perf_counter() - started) / 1e12


def peak_tflops_per_rank(configured: float, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s of one rank, where the number comes from)."""
    if configured > 0:
        return configured, "run.peak_tflops"
    half = dtype in (torch.bfloat16, torch.float16)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for model, (low, full) in GPU_PEAK_TFLOPS.items():
            if model in name:
                return (low if half else full), f"{name} data sheet, {'bf16/fp16' if half else 'fp32'} dense"
        return measure_matmul_tflops(dtype, 8192, device="cuda"), f"{name}: not in the table, measured matmul"
    return measure_matmul_tflops(dtype), f"measured {dtype} matmul on this CPU rank"


def flops_per_token(hf_config, head_rows: int) -> float:
    """4 * (decoder-layer weights + an output head of `head_rows` rows), per the convention above."""
    d, inner, layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", heads) or heads
    head_dim = getattr(hf_config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v projections
    mlp = 3 * d * inner  # gate, up and down projections
    return 4.0 * (layers * (attention + mlp) + head_rows * d)


class Throughput:
    """Per-step rates from the step's real tokens, documents and time."""

    def __init__(self, hf_config, vocab_size: int, num_items: int, world: int, peak_tflops: float, source: str):
        self.per_token = {"content": flops_per_token(hf_config, vocab_size),
                          "collab": flops_per_token(hf_config, num_items),
                          "rec": flops_per_token(hf_config, num_items)}
        self.world = world
        self.peak = peak_tflops * 1e12
        log.info("MFU: peak %.2f TFLOP/s per rank (%s); step FLOPs = 4 x weights passed x real tokens "
                 "(frozen base: no weight gradients; see trainer/throughput.py)", peak_tflops, source)

    def rates(self, task: str, tokens: int, docs: int, seconds: float) -> dict:
        seconds = max(seconds, 1e-9)
        flops = self.per_token[task] * tokens
        mfu = flops / seconds / (self.world * self.peak) if self.peak > 0 else None
        return {"tokens_per_s": round(tokens / seconds, 1), "docs_per_s": round(docs / seconds, 2),
                "mfu": None if mfu is None else round(mfu, 5)}
