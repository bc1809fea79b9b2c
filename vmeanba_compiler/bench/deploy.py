"""Deployment benchmark: the exported AOTInductor package against the compiled model, same threads.

`python -m vmeanba_compiler.bench.deploy [--threads 1] [--repeats 30] [--out results/cpu/deploy_bench.json]`

One model (the in-repo v2-tiny at a small resolution, its stage-0 and stage-1 sites rewritten) is
compiled with `backend="vmeanba"` and exported with the same options by `vmeanba_compiler.export`,
then packaged (`deploy.package`). Timed on the same input with the same torch thread count:

- "compiled": the torch.compile'd model (Inductor, in this process);
- "package_python": the package loaded in this process (`torch._inductor.aoti_load_package`),
  timed call by call alternating with "compiled" (`bench.model.time_contenders`);
- "package_cpp": the package in the C++ runner (a subprocess, its own timer, `--threads` the same).

Each contender runs `repeats` timed calls in each of ROUNDS rounds; a result is the median of its
round medians, with the round medians; `max_abs_difference` compares the outputs of
the two packaged runs with the compiled model's. Build times (export, packaging) are recorded too.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..deploy import op_library, package, runner
from ..export import export
from ..models.vmamba import build_vmamba
from .model import time_contenders
from .timing import machine_info, write_json

log = logging.getLogger(__name__)

MODEL = "vmamba_v2_tiny"
SITES = ["stages.0.0.op:0", "stages.0.1.op:0", "stages.1.0.op:0", "stages.1.1.op:0"]
ROUNDS = 5


def bench_deploy(threads: int, repeats: int, image_size: int = 64, batch: int = 2) -> dict[str, Any]:
    """Time the compiled model, the package in Python and the package in the C++ runner."""
    torch.manual_seed(0)
    model = build_vmamba(MODEL).eval()
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    options = {"sites": SITES}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        program = export(model, (x,), **options)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        path = package.package(program, Path(tmp) / "model.pt2")
        package_s = time.perf_counter() - start
        op_library.load()
        loaded = torch._inductor.aoti_load_package(str(path))
        contenders = {"compiled": torch.compile(model, backend="vmeanba", options=options),
                      "package_python": loaded}
        # Rounds alternate the in-process contenders with the runner, so load that comes and goes
        # on a shared machine reaches all three alike.
        rounds, cpp_rounds = [], []
        for _ in range(ROUNDS):
            rounds.append(time_contenders(contenders, x, repeats, threads))
            cpp_rounds.append(runner.run(path, [x], threads=threads, repeats=repeats))
        results = {name: {"median_ms": statistics.median(r[name]["median_ms"] for r in rounds),
                          "round_medians_ms": [r[name]["median_ms"] for r in rounds]} for name in contenders}
        results["compiled"]["compile_s"] = rounds[0]["compiled"]["compile_s"]
        results["package_cpp"] = {"median_ms": statistics.median(ms for _, ms in cpp_rounds),
                                  "round_medians_ms": [ms for _, ms in cpp_rounds]}
        with torch.no_grad():
            reference = contenders["compiled"](x)
            results["package_python"]["max_abs_difference"] = float((loaded(x) - reference).abs().max())
        results["package_cpp"]["max_abs_difference"] = float((cpp_rounds[0][0][0] - reference).abs().max())
    compiled = results["compiled"]["median_ms"]
    for name in ("package_python", "package_cpp"):
        results[name]["time_vs_compiled"] = results[name]["median_ms"] / compiled
    return {"model": MODEL, "input_shape": list(x.shape), "options": options, "threads": threads,
            "repeats": repeats, "export_s": export_s, "package_s": package_s, "results": results}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every contender (one: steady on a shared machine)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per contender and round")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", default="results/cpu/deploy_bench.json")
    args = parser.parse_args(argv)
    run = bench_deploy(args.threads, args.repeats, args.image_size)
    write_json(Path(args.out), {"benchmark": "deploy", "machine": machine_info(), **run})
    for name, result in run["results"].items():
        ratio = result.get("time_vs_compiled")
        print(f"{name:15s} median {result['median_ms']:8.3f} ms" + (f"  ({ratio:.2f}x the compiled model's time)"
                                                                    if ratio else ""))
    print(f"{run['model']} {run['input_shape']}, sites {', '.join(run['options']['sites'])}, "
          f"{args.threads} thread(s); saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
