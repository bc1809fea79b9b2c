"""What a reduced site costs: the fused `vmeanba::reduced_selective_scan` against its floor.

Two measurements, both on CPU, times as medians of interleaved rounds (one call of each contender
per round, so load that comes and goes on a shared machine hits all alike; only ratios within one
run mean anything):

1. Models: the in-repo VMamba v0-tiny and v2-tiny (seeded random weights, eval mode) at 224x224,
   compiled with `backend="vmeanba"` three ways:
   - "none": no site reduced (every scan is the full op);
   - "all": every site reduced (one fused op per site);
   - "floor": every scan replaced by its D*u skip. The replacement is an opaque custom op
     (`vmeanba_bench::skip_only`) that takes the scan's arguments and returns (D*u, zeros): the
     step, B and C are still computed by the graph (they are the op's inputs, so Inductor cannot
     drop them) but nothing reads them. "all" / "floor" is what the reduced sites still cost.
2. Sites: at stage-0 shapes (batch x 4*192 channels, 4 groups, L = 56*56, D, delta_bias, softplus,
   no gate, as SS2D calls it), the fused op against the chain it replaces: means -> full op on one
   channel per group -> broadcast -> D*u (the composition of `lowering/reduced_scan.py`), run
   eagerly and compiled by Inductor (what a rewritten graph held before the fused op).

Run everything (about 6 minutes on 2 quiet cores, 20 when other jobs share them; every model is
compiled anew per batch size and thread count, since Inductor's CPU code is specialised on both):

    python -m vmeanba_compiler.bench.reduced_sites --out results/cpu/reduced_sites.json

or a part of it, merged into the file: `--only sites|models`, `--models`, `--batches`,
`--threads`, `--states` pick the rows, and `--merge` keeps the file's other rows (a row is
replaced by a new measurement of the same shape or model, batch and thread count). Every row
records when it was measured and the load average around it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..lowering.reduced_scan import reduced_scan_composed
from ..models import build_vmamba
from ..passes import canonicalize
from ..passes.graph_utils import finish_graph, replace_node
from ..passes.reduced_scan import reduced_selective_scan
from ..passes.scan_sites import find_scan_sites
from ..scan_schema import compute_dtype_for, validate_scan_args
from ..threads import torch_threads
from .model import time_contenders
from .timing import machine_info, summarize, time_call, write_json

log = logging.getLogger("vmeanba_compiler.bench")

MODELS = ("vmamba_v0_tiny", "vmamba_v2_tiny")
IMAGE_SIZE = 224
BATCHES = (1, 8)
THREADS = (1, 2)
SITE_STATES = (16, 1)  # d_state of VMamba v0 and v2
TARGETS = {"vmamba_v0_tiny": 1.3, "vmamba_v2_tiny": 1.1}  # all reduced / floor, from the issue
SITE_SPEEDUP_TARGET = 3.0
FLOOR = ("every scan node of the graph the vmeanba backend would compile is replaced by the opaque custom op "
         "vmeanba_bench::skip_only, which takes the scan's arguments and returns (D*u [* silu(z)], zero last "
         "state); the step, B and C stay in the graph as its inputs (Inductor cannot drop them) but nothing "
         "reads them; then Inductor compiles the graph. all / floor is what the reduced sites still cost.")


@torch.library.custom_op("vmeanba_bench::skip_only", mutates_args=())
def skip_only(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """The floor's stand-in for a scan: (D*u [* silu(z)], zero last state) in the op's dtypes."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    math = compute_dtype_for(u)
    y = torch.zeros(u.shape, dtype=math) if D is None else D.to(math).unsqueeze(-1) * u.to(math)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(math))
    return y.to(u.dtype), torch.zeros(shape.batch, shape.dim, shape.state, dtype=math, device=u.device)


@skip_only.register_fake
def _skip_only_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty(shape.batch, shape.dim, shape.state, dtype=compute_dtype_for(u)))


def floor_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Dynamo backend: every scan node becomes `skip_only`, then Inductor compiles the graph."""
    from torch._inductor.compile_fx import compile_fx

    gm = canonicalize(gm)
    for site in find_scan_sites(gm):
        replace_node(gm.graph, site.node, "call_function", torch.ops.vmeanba_bench.skip_only.default,
                     site.node.args, site.node.kwargs)
    finish_graph(gm)
    return compile_fx(gm, list(example_inputs))


def _site_ids(model: torch.nn.Module, images: Tensor) -> list[str]:
    from ..explain import explain

    return [s.site_id for s in explain(model, images).sites]


def _provenance(load_start: float) -> dict[str, Any]:
    """When a row was measured and the 1-minute load average before and after it: rows of one file
    may come from several runs (`--merge`), and a loaded machine skews timings."""
    return {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}}


def bench_models(repeats: int, models: Sequence[str] = MODELS, batches: Sequence[int] = BATCHES,
                 threads_list: Sequence[int] = THREADS, image_size: int = IMAGE_SIZE) -> list[dict[str, Any]]:
    runs = []
    for threads in threads_list:
        for name in models:
            torch.manual_seed(0)
            model = build_vmamba(name).eval()
            for batch in batches:
                images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
                sites = _site_ids(model, images[:1])
                torch._dynamo.reset()
                fns = {
                    "none": torch.compile(model, backend="vmeanba", dynamic=False),
                    "all": torch.compile(model, backend="vmeanba", dynamic=False, options={"sites": sites}),
                    "floor": torch.compile(model, backend=floor_backend, dynamic=False),
                }
                start, load_start = time.perf_counter(), os.getloadavg()[0]
                timings = time_contenders(fns, images, max(4, repeats // batch), threads)
                ms = {k: v["median_ms"] for k, v in timings.items()}
                run = {
                    "model": name, "image_size": image_size, "batch": batch, "threads": threads,
                    "sites": len(sites), "results": timings,
                    "all_over_floor": ms["all"] / ms["floor"], "none_over_all": ms["none"] / ms["all"],
                    "target_all_over_floor": TARGETS.get(name),
                    "meets_target": name in TARGETS and ms["all"] / ms["floor"] <= TARGETS[name],
                    **_provenance(load_start),
                }
                log.info("%s batch %d threads %d: none %.1f ms, all %.1f ms, floor %.1f ms (all/floor %.3f) "
                         "in %.0f s", name, batch, threads, ms["none"], ms["all"], ms["floor"], run["all_over_floor"],
                         time.perf_counter() - start)
                runs.append(run)
    torch._dynamo.reset()
    return runs


def _stage0_site(batch: int, state: int) -> tuple:
    """SS2D's stage-0 call for VMamba tiny at 224x224: 4 routes x 192 channels, L = 56*56."""
    gen = torch.Generator().manual_seed(0)
    groups, width, length = 4, 192, 56 * 56
    dim = groups * width
    u = torch.randn(batch, dim, length, generator=gen)
    delta = 0.5 * torch.randn(batch, dim, length, generator=gen)
    A = -torch.rand(dim, state, generator=gen) - 0.5
    B, C = (torch.randn(batch, groups, state, length, generator=gen) for _ in range(2))
    return (u, delta, A, B, C, torch.randn(dim, generator=gen), None, torch.randn(dim, generator=gen), True), groups


def bench_sites(repeats: int, states: Sequence[int] = SITE_STATES, batches: Sequence[int] = BATCHES,
                threads_list: Sequence[int] = THREADS) -> list[dict[str, Any]]:
    runs = []

    def chain(*args, groups: int):
        return reduced_scan_composed(*args, groups, "effective", "exact", torch.ops.vmeanba.selective_scan)

    for threads in threads_list:
        torch._dynamo.reset()
        compiled_chain = torch.compile(chain, backend="inductor", dynamic=False)
        for state in states:
            for batch in batches:
                args, groups = _stage0_site(batch, state)
                contenders = {
                    "fused": lambda: reduced_selective_scan(*args, groups=groups),
                    "chain_eager": lambda: chain(*args, groups=groups),
                    "chain_inductor": lambda: compiled_chain(*args, groups=groups),
                }
                samples: dict[str, list[float]] = {k: [] for k in contenders}
                load_start = os.getloadavg()[0]
                with torch.no_grad(), torch_threads(threads):
                    for fn in contenders.values():
                        fn()  # warm-up (and the Inductor compile)
                    for _ in range(repeats):
                        for key, fn in contenders.items():
                            samples[key] += time_call(fn, 1, warmup=0)
                ms = {k: summarize(v) for k, v in samples.items()}
                fused = ms["fused"]["median_ms"]
                speedups = {k: ms[k]["median_ms"] / fused for k in ("chain_eager", "chain_inductor")}
                runs.append({
                    "shape": {"batch": batch, "dim": 4 * 192, "groups": groups, "state": state, "length": 56 * 56},
                    "threads": threads, "results": ms, "speedup_over": speedups,
                    "meets_target": min(speedups.values()) >= SITE_SPEEDUP_TARGET,
                    **_provenance(load_start),
                })
                log.info("site N=%d batch %d threads %d: fused %.2f ms, speedup %s", state, batch, threads, fused,
                         {k: round(v, 2) for k, v in speedups.items()})
    torch._dynamo.reset()
    return runs


def _site_key(row: dict[str, Any]) -> tuple:
    return row["shape"]["state"], row["shape"]["batch"], row["threads"]


def _model_key(row: dict[str, Any]) -> tuple:
    return row["model"], row["image_size"], row["batch"], row["threads"]


def merged_rows(old: list[dict[str, Any]], new: list[dict[str, Any]], key: Callable) -> list[dict[str, Any]]:
    """The rows of `old` that `new` does not measure again, plus `new`, sorted by key."""
    rows = {key(row): row for row in old}
    rows.update((key(row), row) for row in new)
    return [rows[k] for k in sorted(rows)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("sites", "models"), help="run one part (default: both)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="VMamba configs to time")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    parser.add_argument("--states", nargs="+", type=int, default=list(SITE_STATES), help="site state sizes")
    parser.add_argument("--repeats", type=int, default=16, help="timed model rounds at batch 1 (divided by the batch)")
    parser.add_argument("--site-repeats", type=int, default=30, help="timed rounds per site shape")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--out", default="results/cpu/reduced_sites.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing --out that this run does not measure again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.merge and out.exists() else {"sites": [], "models": []}
    sites = [] if args.only == "models" else bench_sites(args.site_repeats, args.states, args.batches, args.threads)
    models = [] if args.only == "sites" else bench_models(args.repeats, args.models, args.batches, args.threads,
                                                          args.image_size)
    write_json(out, {
        "benchmark": "reduced_sites",
        "note": ("CPU times on a shared machine: only ratios within one row are meaningful (each row's "
                 "contenders ran interleaved; rows may come from different runs, see measured_at and "
                 "load_average_1min). Models: 'none' reduces no site, 'all' reduces every site with the fused "
                 "vmeanba::reduced_selective_scan, 'floor' as below. Sites: the fused op vs means -> full op "
                 "-> broadcast -> D*u, eager and Inductor-compiled, at VMamba tiny's stage-0 shape."),
        "floor": FLOOR,
        "targets": {"all_over_floor": TARGETS, "site_speedup": SITE_SPEEDUP_TARGET},
        "sites": merged_rows(old["sites"], sites, _site_key),
        "models": merged_rows(old["models"], models, _model_key),
        "machine": machine_info(),
    })
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
