"""Benchmark: Hugging Face transformers' MambaForCausalLM under `backend="vmeanba"` and "inductor".

    python -m vmeanba_compiler.bench.transformers_mamba --out results/cpu/transformers_mamba.json

A randomly initialised `MambaForCausalLM` (default: 4 layers, hidden 128, state 16, MambaConfig's
default vocabulary), the sequential-loop path (transformers' default), batch 1, L = 256, eval mode
under torch.no_grad() (so with the cache transformers makes by default). Contenders:
- inductor: `torch.compile(model, backend="inductor")`, what users get today: Dynamo unrolls the
  loop over L, and Inductor compiles the unrolled graph;
- vmeanba: `backend="vmeanba"`, no site selected: each mixer's scan is one `vmeanba.selective_scan`
  node (vmeanba_compiler/polyfills/transformers_mamba.py), output equal to eager;
- vmeanba_all_sites: every site rewritten (mean -> reduced scan -> expand), output changed by design.

Each contender runs in a process of its own (`_transformers_mamba_worker.py`, started by path), so
every compilation is a first one: nothing is reused from Dynamo's or Inductor's in-memory caches,
and each process gets an empty TORCHINDUCTOR_CACHE_DIR. The inductor process never imports
vmeanba_compiler (the scan substitution is process-wide once installed; the worker asserts it is
absent). Reported per contender:
- compile: wall time of the first call (tracing, compilation and one run), median over
  `--compile-runs` fresh processes, and the CPU time of that call (process and C++ compiler
  children), which is less sensitive than wall time to other jobs on a shared machine;
- run time: median of `--repeats` calls after the first, interleaved across the live processes
  one call at a time (only one process computes at any moment), so load that comes and goes hits
  every contender alike.
Imports and the one-time build of the project's C scan kernel (cached per machine) are outside the
timed first call. Inductor compiles with one worker thread (TORCHINDUCTOR_COMPILE_THREADS=1) and
the models run on `--threads` torch threads (default 1), so the numbers describe single-core work;
the machine block records where they were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .timing import machine_info, write_json

WORKER = Path(__file__).with_name("_transformers_mamba_worker.py")
CONTENDERS = ("inductor", "vmeanba", "vmeanba_all_sites")


class WorkerError(RuntimeError):
    """A contender's process failed; the message carries the end of its log."""


class Worker:
    """One contender's process: compiled on start, then timed one call at a time."""

    def __init__(self, name: str, spec: dict[str, Any], log_dir: Path, timeout_s: float) -> None:
        self.name = name
        self._cache_dir = tempfile.mkdtemp(prefix=f"inductor-{name}-", dir=log_dir)
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=log_dir)[1])
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": self._cache_dir, "TORCHINDUCTOR_COMPILE_THREADS": "1",
               "OMP_NUM_THREADS": str(spec["threads"])}
        self._log = self.log_path.open("w")
        self._proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, env=env,
        )
        self._timeout_s = timeout_s
        # A thread reads the worker's stdout, so waiting for a message can time out.
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self._read("ready")

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith('{"event"'):  # other libraries may print to stdout: skip their lines
                self._lines.put(line)
        self._lines.put(None)

    def _read(self, event: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=self._timeout_s)
        except queue.Empty:
            line, why = None, f"no {event!r} within {self._timeout_s:.0f} s"
        else:
            why = f"worker ended without {event!r}"
        if line is not None:
            message = json.loads(line)
            if message["event"] == event:
                return message
            why = f"expected {event!r}, got {message}"
        self._proc.kill()
        self._proc.wait()
        self._log.close()
        tail = self.log_path.read_text()[-4000:]
        raise WorkerError(f"{self.name}: {why} (exit {self._proc.returncode}); log {self.log_path}:\n{tail}")

    def sample(self) -> float:
        assert self._proc.stdin is not None
        self._proc.stdin.write("run\n")
        self._proc.stdin.flush()
        return float(self._read("sample")["seconds"])

    def close(self) -> None:
        """Ask the worker to exit; raise if it failed."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        if self._proc.returncode not in (0, None):
            raise WorkerError(f"{self.name}: worker exited with {self._proc.returncode}; log {self.log_path}")


def _specs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    base = {
        "seed": args.seed, "vocab_size": args.vocab_size, "hidden_size": args.hidden, "state_size": args.state,
        "layers": args.layers, "associative": False, "batch": args.batch, "seq_len": args.seq_len,
        "threads": args.threads, "options": {}, "check_eager": True,
    }
    sites = [f"backbone.layers.{i}.mixer:0" for i in range(args.layers)]
    return {
        "inductor": {**base, "backend": "inductor"},
        "vmeanba": {**base, "backend": "vmeanba"},
        "vmeanba_all_sites": {**base, "backend": "vmeanba", "options": {"sites": sites}},
    }


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every contender; JSON-ready."""
    specs = _specs(args)
    compile_runs = {name: args.compile_runs for name in CONTENDERS}
    compile_runs["inductor"] = args.inductor_compile_runs
    ready: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vmeanba-bench-") as tmp:
        log_dir = Path(tmp)
        live: dict[str, Worker] = {}
        try:
            for name in CONTENDERS:  # one compiles at a time; the first stays alive for the run times
                _log(f"{name}: compiling (fresh process 1 of {compile_runs[name]})")
                live[name] = Worker(name, specs[name], log_dir, args.timeout)
                ready[name].append(live[name].ready)
                _log(f"{name}: first call {live[name].ready['compile_s']:.1f} s")
            if live["inductor"].ready["vmeanba_compiler_imported"]:
                raise AssertionError("vmeanba_compiler was imported in the inductor baseline's process")
            _log(f"run times: {args.repeats} interleaved rounds")
            for _ in range(args.repeats):
                for name, worker in live.items():
                    samples[name].append(worker.sample())
        finally:
            for worker in live.values():
                worker.close()
        for name in CONTENDERS:
            for index in range(1, compile_runs[name]):
                _log(f"{name}: compiling (fresh process {index + 1} of {compile_runs[name]})")
                worker = Worker(name, specs[name], log_dir, args.timeout)
                worker.close()
                ready[name].append(worker.ready)
                _log(f"{name}: first call {worker.ready['compile_s']:.1f} s")
    results = {}
    for name in CONTENDERS:
        compile_s = [r["compile_s"] for r in ready[name]]
        results[name] = {
            "options": specs[name]["options"],
            "compile_s_median": statistics.median(compile_s),
            "compile_s": compile_s,
            "compile_cpu_s_median": statistics.median(r["compile_cpu_s"] for r in ready[name]),
            "compile_cpu_s": [r["compile_cpu_s"] for r in ready[name]],
            "run_ms_median": statistics.median(samples[name]) * 1e3,
            "run_ms": [s * 1e3 for s in samples[name]],
            # Sanity: the sum of the logits of the first call against the same model run eagerly
            # (equal up to rounding for inductor and vmeanba; vmeanba_all_sites changes the model).
            "logits_sum": ready[name][0]["logits_sum"],
            "eager_logits_sum": ready[name][0]["eager_logits_sum"],
            "logits_sum_rel_diff_vs_eager": abs(ready[name][0]["logits_sum"] - ready[name][0]["eager_logits_sum"])
            / max(abs(ready[name][0]["eager_logits_sum"]), 1e-30),
            "vmeanba_compiler_imported": ready[name][0]["vmeanba_compiler_imported"],
        }
    inductor = results["inductor"]
    ratios = {
        name: {
            "compile_speedup_vs_inductor": inductor["compile_s_median"] / results[name]["compile_s_median"],
            "compile_cpu_speedup_vs_inductor": inductor["compile_cpu_s_median"] / results[name]["compile_cpu_s_median"],
            "run_speedup_vs_inductor": inductor["run_ms_median"] / results[name]["run_ms_median"],
        }
        for name in ("vmeanba", "vmeanba_all_sites")
    }
    targets = {
        "compile_at_least_10x_faster": ratios["vmeanba"]["compile_speedup_vs_inductor"] >= 10.0,
        "run_time_no_slower": results["vmeanba"]["run_ms_median"] <= inductor["run_ms_median"],
    }
    return {
        "benchmark": "transformers_mamba",
        "model": {
            "class": "transformers.MambaForCausalLM", "init": f"random, torch.manual_seed({args.seed})",
            "layers": args.layers, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "state_size": args.state, "vocab_size": args.vocab_size, "path": "sequential loop",
            "mode": "eval, torch.no_grad()",
        },
        "input": {"batch": args.batch, "seq_len": args.seq_len},
        "threads": args.threads,
        "compile_runs": compile_runs,
        "repeats": args.repeats,
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "versions": {"torch": ready["inductor"][0]["torch"], "transformers": ready["inductor"][0]["transformers"]},
        "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/cpu/transformers_mamba.json")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=50280, help="MambaConfig's default")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every contender")
    parser.add_argument("--compile-runs", type=int, default=3, help="fresh processes per vmeanba contender")
    parser.add_argument("--inductor-compile-runs", type=int, default=2,
                        help="fresh processes for the inductor baseline (minutes each)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timed calls per contender")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds a worker may take to report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("compile_runs", "inductor_compile_runs", "repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    payload = run(args)
    write_json(Path(args.out), payload)
    for name, r in payload["results"].items():
        print(f"{name:18s} compile {r['compile_s_median']:8.1f} s (CPU {r['compile_cpu_s_median']:8.1f} s)  "
              f"run {r['run_ms_median']:8.2f} ms")
    for name, r in payload["ratios"].items():
        print(f"{name:18s} vs inductor: compile {r['compile_speedup_vs_inductor']:.1f}x faster, "
              f"run {r['run_speedup_vs_inductor']:.2f}x")
    print(f"targets: {payload['targets']}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
