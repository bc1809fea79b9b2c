"""Kernel-level selective scan on CUDA: full scan vs VMeanba-reduced vs fused reduced site.

Run on a GPU machine (it refuses to run without CUDA: CPU numbers would mean nothing here):

    python -m vmeanba_compiler.bench.scan_kernels --out results/gpu/scan_kernels.json

Every shape is VMamba's call (`bench.scan_cpu.make_inputs`): K = 4 routes of d channels,
grouped B/C, D, delta_bias, softplus. Contenders, all on the same CUDA tensors:
- full: `torch.ops.vmeanba.selective_scan`, the Triton scan over all K*d channels;
- reduced: the composition of `lowering/reduced_scan.py` (dt_mode "effective", skip_mode
  "exact"), what a rewritten site ran before it became one op: torch means, the Triton scan
  over K channels, repeat_interleave, D*u;
- fused: `fused_reduced_scan`, the same site as one Triton kernel (what
  `torch.ops.vmeanba.reduced_selective_scan` runs on CUDA);
- associative_scan: the recurrence as torch's `associative_scan(combine_mode="pointwise")`
  compiled by Inductor, materialising exp(dt*A) and dt*B*u over L (batch 1 by default: every
  shape is a separate compilation, and batch 32 does not fit in memory at large shapes);
- reference: the sequential reference loop, batch 1 and L <= 196 only.
For the fused kernel also: bytes it must move at least (every input read once, y and the last
state written once), the bandwidth that achieves as a fraction of the device's peak, and its
time against reading u and delta once (two torch.sum calls).

Backward (record key "backward"), for the same site and an output gradient of y's shape:
- composed: `reduced_scan.reduced_scan_backward` on the scan ops, what the reduced op's CUDA
  backward ran before it had its own kernel (torch means and chain rule around the full scan's
  Triton backward on K channels);
- fused: `fused_reduced_scan_backward`, the reduced op's CUDA backward now;
with the fused kernel's minimum traffic (inputs and the output gradient read once, the
gradients written once) and the bandwidth that achieves.

Peak bandwidth is reported two ways: the vendor datasheet figure for the device (table below,
None for devices not in it), and a measured device-to-device copy of 1 GiB, the practical peak.
Times are medians over CUDA-event-timed calls, with L2 flushed before each call.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..lowering.scan_reference import selective_scan_reference
from ..lowering.reduced_scan import reduced_scan_backward, reduced_scan_composed
from .scan_cpu import ScanBenchShape, associative_scan_formulation, make_inputs
from .timing import machine_info, summarize, time_cuda, write_json

# Datasheet DRAM bandwidth in GB/s, matched in this order against torch.cuda.get_device_name()
# ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BANDWIDTH_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
)

BATCHES = (1, 32)
DIMS = (4 * 96, 4 * 192, 4 * 384)
STATES = (1, 16)
LENGTHS = (3136, 784, 196, 49)
REFERENCE_MAX_LENGTH = 196


def datasheet_peak_gbps(device_name: str) -> Optional[float]:
    return next((gbps for key, gbps in PEAK_BANDWIDTH_GBPS if key in device_name), None)


def copy_peak_gbps(size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy: the practical peak."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = summarize(time_cuda(lambda: dst.copy_(src), repeats, flush_l2=False))["median_ms"] / 1e3
    return 2 * size_bytes / seconds / 1e9


def _pointwise_associative_scan(u, delta, A, B, C, D, delta_bias):
    return associative_scan_formulation(u, delta, A, B, C, D, delta_bias, combine_mode="pointwise")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_backward(args: tuple, groups: int, repeats: int) -> dict[str, Any]:
    """The site's backward: composed vs fused, on the site's CUDA arguments `args`."""
    from ..lowering import vmeanba_triton

    grad_y = torch.randn_like(args[0])
    contenders: dict[str, Callable[[], Any]] = {
        "composed": lambda: reduced_scan_backward(grad_y, None, *args, groups, "effective", "exact",
                                                  torch.ops.vmeanba.selective_scan,
                                                  torch.ops.vmeanba.selective_scan_backward),
        "fused": lambda: vmeanba_triton.fused_reduced_scan_backward(grad_y, None, *args, groups),
    }
    results_ms = {name: summarize(time_cuda(fn, repeats)) for name, fn in contenders.items()}
    fused, composed = contenders["fused"](), contenders["composed"]()
    moved = _nbytes(grad_y, *(t for t in args if isinstance(t, torch.Tensor)), *fused)
    median = {name: r["median_ms"] for name, r in results_ms.items()}
    return {
        "results_ms": results_ms,
        "best_config": str(getattr(vmeanba_triton._fused_reduced_scan_backward_kernel, "best_config", None)),
        "composed_over_fused": median["composed"] / median["fused"],
        "fused_min_bytes_moved": moved,
        "fused_achieved_GBps": moved / (median["fused"] / 1e3) / 1e9,
        "max_abs_diff_vs_composed": max(float((f - c).abs().max()) for f, c in zip(fused, composed) if f.numel()),
    }


def measure_shape(
    shape: ScanBenchShape, repeats: int, associative_scan: bool, peaks: dict[str, Optional[float]]
) -> dict[str, Any]:
    """Time every contender on one shape; return the JSON-ready record."""
    from ..lowering import scan_triton, vmeanba_triton

    x = {name: t.cuda() for name, t in make_inputs(shape).items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], True)
    contenders: dict[str, Callable[[], Any]] = {
        "full": lambda: torch.ops.vmeanba.selective_scan(*args),
        "reduced": lambda: reduced_scan_composed(*args, shape.groups, "effective", "exact",
                                                 torch.ops.vmeanba.selective_scan),
        "fused": lambda: vmeanba_triton.fused_reduced_scan(*args, shape.groups),
        "read_u_delta_once": lambda: (x["u"].sum(), x["delta"].sum()),
    }
    if associative_scan:
        compiled = torch.compile(_pointwise_associative_scan, dynamic=False)
        loop_args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["delta_bias"])
        contenders["associative_scan"] = lambda: compiled(*loop_args)
    if shape.batch == 1 and shape.length <= REFERENCE_MAX_LENGTH:
        contenders["reference"] = lambda: selective_scan_reference(*args)

    # The configs the autotuners picked for this shape, to tune the config lists from.
    tuned = {"full": scan_triton._scan_forward_kernel, "fused": vmeanba_triton._fused_reduced_scan_kernel}
    results_ms, best_configs = {}, {}
    for name, fn in contenders.items():
        results_ms[name] = summarize(time_cuda(fn, repeats if name != "reference" else 3))
        if name in tuned:
            best_configs[name] = str(getattr(tuned[name], "best_config", None))

    y_fused, last_fused = contenders["fused"]()
    y_reduced, _ = contenders["reduced"]()
    fused_s = results_ms["fused"]["median_ms"] / 1e3
    moved = _nbytes(*(t for t in args if isinstance(t, torch.Tensor)), y_fused, last_fused)
    achieved = moved / fused_s / 1e9
    median = {name: r["median_ms"] for name, r in results_ms.items()}
    return {
        "shape": asdict(shape),
        "results_ms": results_ms,
        "best_configs": best_configs,
        "speedups": {
            "full_over_reduced": median["full"] / median["reduced"],
            "full_over_fused": median["full"] / median["fused"],
            "reduced_over_fused": median["reduced"] / median["fused"],
            **({"associative_scan_over_full": median["associative_scan"] / median["full"]} if associative_scan else {}),
        },
        "fused": {
            "min_bytes_moved": moved,
            "achieved_GBps": achieved,
            "fraction_of_datasheet_peak": None if peaks["datasheet_GBps"] is None else achieved / peaks["datasheet_GBps"],
            "fraction_of_copy_peak": achieved / peaks["copy_GBps"],
            "over_read_u_delta_once": median["fused"] / median["read_u_delta_once"],
            "max_abs_diff_vs_reduced": float((y_fused - y_reduced).abs().max()),
        },
        "backward": measure_backward(args, shape.groups, repeats),
    }


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/gpu/scan_kernels.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=_ints, default=BATCHES, help="comma-separated, e.g. 1,32")
    parser.add_argument("--dims", type=_ints, default=DIMS, help="channels K*d, e.g. 384,768,1536")
    parser.add_argument("--states", type=_ints, default=STATES)
    parser.add_argument("--lengths", type=_ints, default=LENGTHS)
    parser.add_argument("--associative-scan", choices=("none", "batch1", "all"), default="batch1",
                        help="which shapes also time the compiled associative_scan (one compilation each)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA: this benchmark times the Triton kernels on a GPU (CPU numbers would be "
                     "meaningless); run `vmeanba bench-scan` for the CPU kernel")

    name = torch.cuda.get_device_name()
    peaks = {"device": name, "datasheet_GBps": datasheet_peak_gbps(name), "copy_GBps": copy_peak_gbps()}
    records = []
    base = ScanBenchShape()
    for batch, dim, state, length in itertools.product(args.batches, args.dims, args.states, args.lengths):
        shape = replace(base, batch=batch, dim=dim, state=state, length=length)
        with_assoc = args.associative_scan == "all" or (args.associative_scan == "batch1" and batch == 1)
        record = measure_shape(shape, args.repeats, with_assoc, peaks)
        records.append(record)
        r, fused = record["results_ms"], record["fused"]
        print(f"B={batch:2d} dim={dim:4d} N={state:2d} L={length:4d}  full {r['full']['median_ms']:8.3f} ms  "
              f"reduced {r['reduced']['median_ms']:7.3f}  fused {r['fused']['median_ms']:7.3f}  "
              f"full/fused {record['speedups']['full_over_fused']:7.1f}x  fused {fused['achieved_GBps']:7.1f} GB/s "
              f"({fused['fraction_of_copy_peak']:.0%} of copy peak)  backward: composed "
              f"{record['backward']['results_ms']['composed']['median_ms']:7.3f}  fused "
              f"{record['backward']['results_ms']['fused']['median_ms']:7.3f}", flush=True)
        torch._dynamo.reset()

    write_json(Path(args.out), {
        "benchmark": "scan_kernels",
        "machine": machine_info(),
        "peak_bandwidth": {**peaks, "datasheet_source": "vendor datasheet (PEAK_BANDWIDTH_GBPS)",
                           "copy_method": "device-to-device copy of 1 GiB, (read + write bytes) / time"},
        "timing": {"repeats": args.repeats, "statistic": "median",
                   "method": "CUDA events around each call, 256 MiB written before each call to flush L2"},
        "records": records,
    })
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
