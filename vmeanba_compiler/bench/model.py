"""Model-level benchmark: `backend="vmeanba"` with a site selection vs `backend="inductor"`.

Both compile the same model in the same process and are timed on the same inputs, in
alternating rounds (one call of each per round), so load that comes and goes on a shared
machine hits both alike; the speedup is the ratio of the two medians. The first call of each
(its compilation) is timed separately.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..threads import torch_threads
from ..tracing import backend_errors_unwrapped, call_with_inputs
from .timing import machine_info, summarize, time_call

def compiled_contenders(model: nn.Module, variants: Mapping[str, Mapping[str, Any]]) -> dict[str, Callable]:
    """{"inductor": the model compiled by Inductor alone, name: compiled by the vmeanba backend
    with options, for each name, options in `variants`}; nothing compiles until first called."""
    torch._dynamo.reset()
    fns = {"inductor": torch.compile(model, backend="inductor")}
    fns.update({name: torch.compile(model, backend="vmeanba", options=dict(options))
                for name, options in variants.items()})
    return fns


def time_contenders(fns: Mapping[str, Callable], inputs: Any, repeats: int,
                    threads: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """Compile time (first call) and median of `repeats` interleaved timed calls per contender,
    all on `threads` torch threads (None: as set)."""
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad(), backend_errors_unwrapped(), torch_threads(threads):
        for name, fn in fns.items():
            start = time.perf_counter()
            call_with_inputs(fn, inputs)
            results[name] = {"compile_s": time.perf_counter() - start}
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name] += time_call(lambda: call_with_inputs(fn, inputs), 1, warmup=0)
    for name in fns:
        results[name].update(summarize(samples[name]))
    return results


def bench_model(model: nn.Module, inputs: Any, options: Mapping[str, Any], *, repeats: int = 20,
                threads: Optional[int] = None) -> dict[str, Any]:
    """Time `model` under both backends; JSON-ready, with the machine it ran on.

    options: the vmeanba backend's (e.g. {"sites": [...]} or {"profile": p, "top_k": 2});
        a Profile object is recorded by its content hash.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timings = time_contenders(compiled_contenders(model, {"vmeanba": options}), inputs, repeats, threads)
    recorded = {k: (v.content_hash() if hasattr(v, "content_hash") else v) for k, v in options.items()}
    return {
        "benchmark": "model",
        "input_shape": list(inputs.shape) if isinstance(inputs, torch.Tensor) else None,
        "options": recorded,
        "repeats": repeats,
        "threads": threads or torch.get_num_threads(),
        "results": timings,
        "speedup_vs_inductor": timings["inductor"]["median_ms"] / timings["vmeanba"]["median_ms"],
        "machine": machine_info(),
    }
