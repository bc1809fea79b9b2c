"""Shared timing and provenance helpers for every benchmark.

Times are medians over repeats after warm-up (the first call of a compiled function includes its
compilation, which is reported separately where it matters). CPU times are only meaningful as
ratios measured in the same run; the machine block says where they were taken.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Run `fn` warmup times, then `repeats` timed times; return seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return samples


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int = 1, flush_l2: bool = True) -> list[float]:
    """Seconds per call of `fn` on the current CUDA stream, measured with CUDA events around the
    call alone. With `flush_l2`, a 256 MiB buffer is overwritten before every timed call, so
    inputs come from DRAM as they would in a model, not from a warm L2 (which would inflate the
    bandwidth of small shapes)."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and all samples, in milliseconds."""
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "samples_ms": [s * 1e3 for s in samples],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict[str, Any]:
    """Where and with what a benchmark ran: enough to tell two result files apart."""
    import triton

    from .. import __version__

    info: dict[str, Any] = {
        "vmeanba_compiler": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write results atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
