"""Host memory: how glibc's malloc serves large blocks, and each stage's report of wall time and
peak resident memory per rank."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("cllm4rec")


MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_host_allocator(zero3: bool) -> str:
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
    if zero3:
        settings = [(m_mmap_threshold, 64 * 1024)]
        choice = "blocks of 64 KiB and more are mapped and returned to the system when freed (ZeRO-3)"
    else:
        settings = [(m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)]
        choice = "every block from the heap, which keeps freed memory for the next step (ZeRO stage < 3)"
    if not all(mallopt(option, value) == 1 for option, value in settings):  # mallopt returns 1 on success
        return f"glibc refused the setting for this ZeRO stage ({choice}); set MALLOC_* variables to choose"
    return choice


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


class ResourceReport:
    """A stage's wall time and every rank's peak RSS, after setup (the base loaded and
    partitioned: the loading peak) and overall, with the shards left out (data.bad_shards=skip);
    logged and written to <out_dir>/resources.json by rank 0."""

    def __init__(self, stage: str):
        self.stage = stage
        self.started = time.time()
        self.earlier_s = 0.0  # wall time of the processes that ran this stage before a resume
        self.setup_peak_mb: float | None = None

    def setup_done(self) -> None:
        self.setup_peak_mb = peak_rss_mb()

    def elapsed(self) -> float:
        """The stage's wall time so far, earlier processes included (saved in every checkpoint)."""
        return self.earlier_s + time.time() - self.started

    def resumed_after(self, earlier_s: float) -> None:
        """A resumed stage also counts its earlier processes' time, up to the checkpoint it
        resumed from (work done after that checkpoint was lost and is done again)."""
        self.earlier_s = earlier_s

    def write(self, out_dir: Path, skipped_shards: dict | None = None) -> dict:
        """Collective."""
        world = torch.distributed.get_world_size()
        peaks, setup_peaks = [None] * world, [None] * world
        torch.distributed.all_gather_object(peaks, peak_rss_mb())
        torch.distributed.all_gather_object(setup_peaks, self.setup_peak_mb)
        report = {"stage": self.stage, "wall_s": round(self.elapsed(), 1), "resumed_after_s": round(self.earlier_s, 1),
                  "peak_rss_mb_per_rank": peaks, "setup_peak_rss_mb_per_rank": setup_peaks,
                  "skipped_shards": skipped_shards or {}}
        if torch.distributed.get_rank() == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "resources.json").write_text(json.dumps(report, indent=2))
            log.info("%s: %.1f s wall%s, peak RSS per rank %s MB (after setup %s MB)", self.stage, report["wall_s"],
                     f" ({self.earlier_s:.1f} s of it before the resume)" if self.earlier_s else "", peaks, setup_peaks)
        return report


