"""End-to-end model benchmark for a GPU session: whole VMamba models, three compilations each.

    python -m vmeanba_compiler.bench.end_to_end --out results/gpu/end_to_end.json

For every (model, batch, precision): `backend="inductor"`, `backend="vmeanba"` with no site
reduced ("none": what the backend costs by itself) and with every site reduced ("all": the most
the rewrite can gain), compiled in one process and timed in alternating rounds (`bench.model`),
so the ratios compare like with like. Reported per contender: the first call (compilation) in
seconds and the median step in milliseconds; per run: inductor/all and inductor/none speedups.
"float16" runs the compiled model under `torch.autocast` (the scan ops keep fp32 math, see
docs/PRECISION.md); "float32" runs as is. Every input is seeded, weights are random (speed does
not depend on training).

The default device is CUDA and the command refuses to run without it. `--device cpu` exists for a
smoke run of the script itself on a small shape; its times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..explain import explain
from ..models import build_vmamba
from .model import compiled_contenders, time_contenders
from .timing import machine_info, write_json

log = logging.getLogger(__name__)

MODELS = ("vmamba_v0_tiny", "vmamba_v2_tiny")
BATCHES = (1, 64)
PRECISIONS = ("float32", "float16")
IMAGE_SIZE = 224
ALL_SITES_TARGET = 1.25  # every site reduced vs backend="inductor", end to end (GPU)


def _under_precision(fn: Callable, device: str, precision: str) -> Callable:
    """`fn` called under float16 autocast for "float16", unchanged for "float32"."""
    if precision == "float32":
        return fn

    def autocast_call(x):
        with torch.autocast(device_type=device, dtype=torch.float16):
            return fn(x)

    return autocast_call


def bench_run(name: str, batch: int, precision: str, image_size: int, repeats: int, device: str) -> dict[str, Any]:
    """One (model, batch, precision): the three contenders' compile times and median steps."""
    torch.manual_seed(0)
    model = build_vmamba(name).eval().to(device)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.autocast(device_type=device, dtype=torch.float16) if precision == "float16" else contextlib.nullcontext():
        sites = [s.site_id for s in explain(model, images[:1]).sites]
    fns = compiled_contenders(model, {"none": {}, "all": {"sites": sites}})
    fns = {k: _under_precision(fn, device, precision) for k, fn in fns.items()}
    start = time.perf_counter()
    timings = time_contenders(fns, images, repeats)
    ms = {k: v["median_ms"] for k, v in timings.items()}
    run = {
        "model": name, "batch": batch, "precision": precision, "image_size": image_size, "device": device,
        "sites": len(sites), "repeats": repeats, "results": timings,
        "speedup_all_vs_inductor": ms["inductor"] / ms["all"],
        "speedup_none_vs_inductor": ms["inductor"] / ms["none"],
    }
    log.info("%s batch %d %s: inductor %.2f ms, none %.2f ms, all %.2f ms (inductor/all %.3fx) in %.0f s",
             name, batch, precision, ms["inductor"], ms["none"], ms["all"], run["speedup_all_vs_inductor"],
             time.perf_counter() - start)
    torch._dynamo.reset()
    return run


def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version from nvidia-smi, None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="VMamba configs (models.MODEL_CONFIGS)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (one call of each contender per round)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default); cpu only to smoke-test this script on a small shape")
    parser.add_argument("--out", default="results/gpu/end_to_end.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs CUDA: this benchmark times whole models on a GPU; pass --device cpu only to "
                     "smoke-test the script (CPU model benchmarks: python -m vmeanba_compiler.bench.reduced_sites)")
    if args.repeats < 1 or min(args.batches) < 1 or args.image_size < 1:
        parser.error("--repeats, --batches and --image-size must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    runs = [bench_run(name, batch, precision, args.image_size, args.repeats, args.device)
            for name in args.models for batch in args.batches for precision in args.precisions]
    machine = {**machine_info(), "cuda_runtime": torch.version.cuda, "driver": _driver_version()}
    write_json(Path(args.out), {
        "benchmark": "end_to_end",
        "note": ("Medians of alternating rounds in one process; 'none' = backend='vmeanba' reducing no site, "
                 "'all' = every site reduced with the fused op; compile_s = first call."),
        "target_speedup_all_vs_inductor": ALL_SITES_TARGET,
        "runs": runs,
        "machine": machine,
    })
    for run in runs:
        ms = {k: v["median_ms"] for k, v in run["results"].items()}
        print(f"{run['model']:16s} batch {run['batch']:3d} {run['precision']:8s}  inductor {ms['inductor']:8.2f} ms  "
              f"none {ms['none']:8.2f}  all {ms['all']:8.2f}  inductor/all {run['speedup_all_vs_inductor']:.3f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
