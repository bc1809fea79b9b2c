"""One contender of `vmeanba_compiler.bench.transformers_mamba`, in a process of its own.

Run by path (`python .../_transformers_mamba_worker.py '<json spec>'`), never imported: the
"inductor" contender must measure what users get today, and the scan substitution is process-wide
once vmeanba_compiler is imported, so this file imports only torch and transformers unless the spec
asks for the vmeanba backend. It asserts vmeanba_compiler stayed out of an inductor process.

Protocol (one JSON object per line on stdout; logs go to stderr): build the model, time the first
call (its compilation), print {"event": "ready", "compile_s": ..., ...}; then for every "run" line
read on stdin time one call and print {"event": "sample", "seconds": ...}; exit on "quit" or end
of input. The parent interleaves the samples of several workers, one call at a time.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Run by path, Python put this file's folder first on sys.path; its siblings (model.py, timing.py,
# ...) must not shadow top-level modules of the libraries imported here.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _build(spec: dict):
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(spec["seed"])
    config = MambaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], state_size=spec["state_size"],
        num_hidden_layers=spec["layers"], use_associative_scan=spec["associative"],
    )
    model = MambaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    input_ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq_len"]), generator=generator)
    return model, input_ids


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the C++ compiler runs): on a shared
    machine it says how much work the compilation was, where wall time also counts waiting."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _vmeanba_in_process() -> bool:
    return any(name == "vmeanba_compiler" or name.startswith("vmeanba_compiler.") for name in sys.modules)


def main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    model, input_ids = _build(spec)
    backend = spec["backend"]
    if backend == "vmeanba":
        import vmeanba_compiler

        # One-time costs outside the compilation: building or loading the project's C scan kernel
        # (cached per machine in ~/.cache/vmeanba_compiler) runs on first use of the op.
        u = torch.zeros(1, 1, 2)
        vmeanba_compiler.selective_scan(u, u, torch.zeros(1, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
        compiled = torch.compile(model, backend="vmeanba", options=spec["options"])
    elif backend == "inductor":
        if _vmeanba_in_process():
            raise AssertionError("vmeanba_compiler is imported in the inductor baseline's process")
        compiled = torch.compile(model, backend="inductor")
    else:
        raise ValueError(f"unknown backend {backend!r}")

    with torch.no_grad():
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        out = compiled(input_ids)
        compile_s, compile_cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu_start
        checksum = float(out.logits.double().sum())
        eager_checksum = float(model(input_ids).logits.double().sum()) if spec.get("check_eager") else None
        if backend == "inductor" and _vmeanba_in_process():
            raise AssertionError("vmeanba_compiler was imported while the inductor baseline compiled")
        ready = {
            "event": "ready", "backend": backend, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
            "logits_sum": checksum,
            "eager_logits_sum": eager_checksum, "vmeanba_compiler_imported": _vmeanba_in_process(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command != "run":
                raise ValueError(f"unknown command {command!r}")
            start = time.perf_counter()
            compiled(input_ids)
            print(json.dumps({"event": "sample", "seconds": time.perf_counter() - start}), flush=True)
    if backend == "inductor" and _vmeanba_in_process():
        raise AssertionError("vmeanba_compiler was imported in the inductor baseline's process")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
