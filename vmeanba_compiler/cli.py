"""The `vmeanba` command line: `vmeanba demo`, `vmeanba bench-scan`, `--version`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmeanba",
        description="VMeanba for torch.compile: run low-variance selective scans on the channel mean.",
    )
    parser.add_argument("--version", action="version", version=f"vmeanba-compiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="compile the bundled miniature VMamba with backend='vmeanba' and compare with eager",
        description="Compile a bundled VMamba with backend='vmeanba', check its output against eager "
        "execution within the float32 tolerance, and time both (median of repeats).",
    )
    demo.add_argument("--model", default="vmamba_mini", help="a name from vmeanba_compiler.models.MODEL_CONFIGS")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--image-size", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=20, help="timed runs per variant (median reported)")
    demo.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser(
        "bench-scan",
        help="benchmark the fast CPU selective scan against the reference and Inductor loops",
        description="Time the CPU selective scan (C kernel) against the sequential reference loop, "
        "an Inductor-compiled step loop and an Inductor-compiled associative_scan; save JSON.",
    )
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--dim", type=int, default=4 * 192, help="channels (K routes x d)")
    bench.add_argument("--state", type=int, default=16, help="N, d_state")
    bench.add_argument("--length", type=int, default=56 * 56, help="L, sequence length")
    bench.add_argument("--groups", type=int, default=4, help="B/C groups (scan routes)")
    bench.add_argument("--repeats", type=int, default=20, help="timed runs of the fast path")
    bench.add_argument("--reference-repeats", type=int, default=3, help="timed runs of the slow loops")
    bench.add_argument("--skip-inductor", action="store_true", help="leave out the Inductor contenders")
    bench.add_argument("--out", default="results/cpu/scan_bench.json", help="where to write the JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    if args.command == "bench-scan":
        from .bench.scan_cpu import main as bench_main

        return bench_main(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
