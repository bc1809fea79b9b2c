"""`vmeanba bench-scan`: the fast CPU selective scan against the loops it replaces.

Contenders, all on the same inputs (grouped B/C, D, delta_bias, softplus, as VMamba calls it):
- fast: `torch.ops.vmeanba.selective_scan` on CPU (the C kernel);
- reference: the plain sequential loop over L (`selective_scan_reference`);
- inductor_step_loop: the same loop with its per-step update compiled by Inductor;
- inductor_associative_scan: the recurrence as `associative_scan` (generic combine) compiled
  by Inductor, materialising exp(dt*A) and dt*B*u over L.
Also the C kernel's backward, as a multiple of its forward. (Autograd through the reference loop
is left out: its per-step indexing makes backward cost O(L^2) memory traffic, which says nothing
about the scan.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan

from ..lowering import scan_cpu
from ..lowering.scan_reference import selective_scan_reference
from .timing import machine_info, summarize, time_call, write_json


@dataclass(frozen=True)
class ScanBenchShape:
    batch: int = 1
    dim: int = 4 * 192
    state: int = 16
    length: int = 56 * 56
    groups: int = 4


def make_inputs(shape: ScanBenchShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """VMamba-like scan inputs: grouped B/C (one group per scan route), softplus step sizes."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, length, k = shape.batch, shape.dim, shape.state, shape.length, shape.groups
    return {
        "u": torch.randn(b, d, length, generator=g),
        "delta": torch.randn(b, d, length, generator=g) * 0.5 - 2.0,
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(b, k, n, length, generator=g),
        "C": torch.randn(b, k, n, length, generator=g),
        "D": torch.ones(d),
        "delta_bias": torch.rand(d, generator=g) * 0.1,
    }


def _step(h, dt_t, A, B_t, C_t, u_t):
    h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t
    return h, (h * C_t).sum(-1)


def _inductor_step_loop(step: Callable) -> Callable:
    def run(u, delta, A, B, C, D, delta_bias):
        dt = F.softplus(delta + delta_bias[:, None])
        channels_per_group = u.shape[1] // B.shape[1]
        B_c = B.repeat_interleave(channels_per_group, 1)
        C_c = C.repeat_interleave(channels_per_group, 1)
        h = u.new_zeros(*u.shape[:2], A.shape[1])
        ys = []
        for t in range(u.shape[-1]):
            h, y_t = step(h, dt[..., t], A, B_c[..., t], C_c[..., t], u[..., t])
            ys.append(y_t)
        return torch.stack(ys, -1) + D[:, None] * u

    return run


def _combine(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def associative_scan_formulation(u, delta, A, B, C, D, delta_bias, combine_mode: str = "generic"):
    """The scan as torch's `associative_scan` over (exp(dt*A), dt*B*u), materialised over L:
    what Inductor offers without a scan kernel. `combine_mode="pointwise"` needs CUDA."""
    dt = F.softplus(delta + delta_bias[:, None])  # (b, d, L)
    channels_per_group = u.shape[1] // B.shape[1]
    B_c = B.repeat_interleave(channels_per_group, 1).transpose(-1, -2)  # (b, d, L, N)
    C_c = C.repeat_interleave(channels_per_group, 1).transpose(-1, -2)
    decay = torch.exp(dt[..., None] * A[:, None, :])
    drive = (dt * u)[..., None] * B_c
    _, h = associative_scan(_combine, (decay, drive), dim=2, combine_mode=combine_mode)
    return (h * C_c).sum(-1) + D[:, None] * u


def run_scan_benchmark(
    shape: ScanBenchShape, repeats: int, reference_repeats: int, with_inductor: bool = True
) -> dict[str, Any]:
    """Time every contender; return the JSON-ready result with ratios to the fast path."""
    x = make_inputs(shape)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    kwargs = {"delta_bias": x["delta_bias"], "delta_softplus": True}
    results: dict[str, Any] = {}

    results["fast"] = summarize(
        time_call(lambda: torch.ops.vmeanba.selective_scan(*args, **kwargs), repeats)
    )
    results["reference"] = summarize(
        time_call(lambda: selective_scan_reference(*args, **kwargs), reference_repeats, warmup=0)
    )
    loop_args = (*args, x["delta_bias"])
    if with_inductor:
        step_loop = _inductor_step_loop(torch.compile(_step, backend="inductor", dynamic=False))
        results["inductor_step_loop"] = summarize(
            time_call(lambda: step_loop(*loop_args), reference_repeats)
        )
        compiled_scan = torch.compile(associative_scan_formulation, backend="inductor", dynamic=False)
        results["inductor_associative_scan"] = summarize(
            time_call(lambda: compiled_scan(*loop_args), reference_repeats)
        )

    grad_y = torch.randn(shape.batch, shape.dim, shape.length)
    results["fast_backward"] = summarize(
        time_call(lambda: scan_cpu.backward(grad_y, None, *args, None, x["delta_bias"], True), repeats)
    )

    fast = results["fast"]["median_ms"]
    ratios = {
        f"{name}_over_fast": results[name]["median_ms"] / fast
        for name in ("reference", "inductor_step_loop", "inductor_associative_scan")
        if name in results
    }
    ratios["fast_backward_over_fast"] = results["fast_backward"]["median_ms"] / fast
    return {
        "benchmark": "selective_scan_cpu",
        "machine": machine_info(),
        "shape": asdict(shape),
        "repeats": {"fast": repeats, "others": reference_repeats},
        "results_ms": results,
        "ratios": ratios,
        "target": {"reference_over_fast_at_least": 20.0, "met": ratios["reference_over_fast"] >= 20.0},
    }


def main(args) -> int:
    shape = ScanBenchShape(args.batch, args.dim, args.state, args.length, args.groups)
    payload = run_scan_benchmark(shape, args.repeats, args.reference_repeats, not args.skip_inductor)
    write_json(Path(args.out), payload)
    print(f"selective scan, CPU, shape {payload['shape']}, {payload['machine']['torch_threads']} threads")
    for name, r in payload["results_ms"].items():
        print(f"  {name:28s} {r['median_ms']:10.2f} ms (median of {len(r['samples_ms'])})")
    for name, ratio in payload["ratios"].items():
        print(f"  {name:48s} {ratio:8.1f}x")
    print(f"saved {args.out}")
    return 0
