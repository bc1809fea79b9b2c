"""`python -m vmeanba_compiler.soak`: a long compiled training run that must neither recompile nor leak.

A `vmamba_mini` compiled with `backend="vmeanba"` (calibrated, one scan site rewritten) trains for
`--steps` forward/backward/SGD steps, cycling through every pair of `--resolutions` x
`--batch-sizes`. Inputs follow the training recipe of docs/DYNAMIC_SHAPES.md: the batch axis is
marked dynamic and the image axes static, so warm-up (one step per shape) compiles one graph per
resolution that all batch sizes share. After warm-up it checks:

- recompiles: no further Dynamo graph and no further backend call;
- memory: resident set size (RSS, from /proc/self/statm) sampled every `--sample-every` steps
  after a garbage collection; its growth from the first to the last sample and its least-squares
  slope must stay under `--max-growth-mb` (a per-step leak of even 10 kB would exceed 10 MB).

Prints a summary, writes JSON (machine and versions included) to `--out`, and exits with status 1
if a check fails. A check, not a timed test: it takes minutes.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

from .backend import vmeanba_backend
from .bench.timing import machine_info, write_json
from .calibration import calibrate
from .models import build_vmamba

_MIB = 1 << 20


def resident_set_size() -> Optional[int]:
    """This process's RSS in bytes (Linux /proc), or None where /proc is unavailable."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _slope_per_1k_steps(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of `values` over `steps`, per 1,000 steps."""
    mean_s, mean_v = statistics.fmean(steps), statistics.fmean(values)
    var = sum((s - mean_s) ** 2 for s in steps)
    cov = sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values))
    return 1000.0 * cov / var if var else 0.0


def _images(batch: int, size: int) -> torch.Tensor:
    """A batch whose batch axis is dynamic and image axes static (docs/DYNAMIC_SHAPES.md)."""
    images = torch.randn(batch, 3, size, size)
    torch._dynamo.mark_dynamic(images, 0)
    torch._dynamo.mark_static(images, 2)
    torch._dynamo.mark_static(images, 3)
    return images


def run(steps: int, resolutions: list[int], batch_sizes: list[int], sample_every: int,
        max_growth_mb: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini")
    profile = calibrate(model.eval(), [torch.randn(2, 3, resolutions[0], resolutions[0])], progress=False)
    model.train()
    backend_calls = 0
    options = {"profile": profile, "top_k": 1}

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        nonlocal backend_calls
        backend_calls += 1
        return vmeanba_backend(gm, example_inputs, options=options)

    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]  # calibration traced graphs of its own
    compiled = torch.compile(model, backend=counting_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    shapes = list(itertools.product(batch_sizes, resolutions))
    labels = torch.Generator().manual_seed(1)

    def step(batch: int, size: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        target = torch.randint(0, 10, (batch,), generator=labels)
        loss = torch.nn.functional.cross_entropy(compiled(_images(batch, size)), target)
        loss.backward()
        optimizer.step()
        return loss.item()

    started = time.perf_counter()
    for batch, size in shapes:
        step(batch, size)
    warmup_s = time.perf_counter() - started
    graphs_after_warmup, calls_after_warmup = counters["stats"]["unique_graphs"] - graphs_before, backend_calls

    step_ms: dict[str, list[float]] = {f"{b}x{s}": [] for b, s in shapes}
    samples: list[tuple[int, float]] = []
    losses = []
    for i in range(steps):
        batch, size = shapes[i % len(shapes)]
        t0 = time.perf_counter()
        losses.append(step(batch, size))
        step_ms[f"{batch}x{size}"].append((time.perf_counter() - t0) * 1e3)
        if i % sample_every == 0 or i == steps - 1:
            gc.collect()
            rss = resident_set_size()
            if rss is not None:
                samples.append((i, rss / _MIB))

    recompiles = {
        "dynamo_graphs": counters["stats"]["unique_graphs"] - graphs_before - graphs_after_warmup,
        "backend_calls": backend_calls - calls_after_warmup,
    }
    growth = samples[-1][1] - samples[0][1] if samples else None
    slope = _slope_per_1k_steps([s for s, _ in samples], [v for _, v in samples]) if len(samples) > 1 else None
    checks = {
        "no_recompile_after_warmup": not any(recompiles.values()),
        "rss_growth_under_limit": growth is not None and growth < max_growth_mb
                                  and (slope is None or slope < max_growth_mb),
        "losses_finite": all(math.isfinite(v) for v in losses),
    }
    return {
        "command": "python -m vmeanba_compiler.soak " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "settings": {"steps": steps, "resolutions": resolutions, "batch_sizes": batch_sizes,
                     "sample_every": sample_every, "max_growth_mb": max_growth_mb,
                     "selection": "top_k=1 (the calibrated site of lowest impact)", "model": "vmamba_mini",
                     "threads": torch.get_num_threads()},
        "warmup": {"steps": len(shapes), "seconds": warmup_s, "dynamo_graphs": graphs_after_warmup,
                   "backend_calls": calls_after_warmup},
        "recompiles_after_warmup": recompiles,
        "rss_mb": {"first": samples[0][1] if samples else None, "last": samples[-1][1] if samples else None,
                   "max": max(v for _, v in samples) if samples else None, "growth": growth,
                   "slope_per_1k_steps": slope, "samples": samples},
        "step_ms_median": {k: statistics.median(v) for k, v in step_ms.items() if v},
        "loss": {"first": losses[0], "last": losses[-1]},
        "checks": checks,
        "passed": all(checks.values()),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmeanba_compiler.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="measured steps after warm-up")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[24, 32, 40])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sample-every", type=int, default=50, help="steps between RSS samples")
    parser.add_argument("--max-growth-mb", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps step times steady on a shared machine (speed is not checked)")
    parser.add_argument("--out", type=Path, default=Path("results/cpu/soak.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if min(args.batch_sizes) < 2:
        parser.error("--batch-sizes must be >= 2: PyTorch specialises size 1, which always gets its own graph")
    report = run(args.steps, args.resolutions, args.batch_sizes, args.sample_every, args.max_growth_mb)
    write_json(args.out, report)
    rss = report["rss_mb"]
    print(f"warm-up: {report['warmup']['steps']} steps, {report['warmup']['dynamo_graphs']} graphs, "
          f"{report['warmup']['seconds']:.0f} s")
    print(f"after warm-up ({args.steps} steps): recompiles {report['recompiles_after_warmup']}; "
          f"RSS {rss['first']:.1f} -> {rss['last']:.1f} MiB (growth {rss['growth']:+.2f} MiB, "
          f"slope {rss['slope_per_1k_steps']:+.2f} MiB/1k steps)")
    print("median step ms: " + ", ".join(f"batch x size {k}: {v:.1f}" for k, v in report["step_ms_median"].items()))
    print(("PASSED" if report["passed"] else "FAILED") + f" {report['checks']} -> {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
