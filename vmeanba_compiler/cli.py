"""The `vmeanba` command line.

demo, train-demo, experiments: the bundled models on real data (scikit-learn's digits, shipped
checkpoints): digit classification, and with --task segmentation per-pixel labels of digit canvases.
calibrate, report, bench: the same verbs on a user's own model and data.
export: a model with the chosen sites rewritten, as an AOTInductor package that runs without Python.
bench-scan: the selective-scan kernel benchmark.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .config import VMeanbaConfig
from .demo import DEFAULT_BUDGET
from .extras import MissingExtraError, import_extra
from .training import TASKS, SegmentationTrainingSettings, TrainingSettings

_MODEL_HELP = ("model: 'module:attr' naming an nn.Module or a factory called without arguments "
               "(e.g. vmeanba_compiler.training:bundled_model)")
_CHECKPOINT_HELP = ("weights: a state_dict file (with --model), or alone a checkpoint written by "
                    "`vmeanba train-demo`; read with weights_only=True")
_DATA_HELP = ("data: 'module:attr' naming an iterable of batches or a function returning one; a batch is a "
              "Tensor, a tuple of positional inputs or a dict of keyword inputs (with --labelled: an "
              "(inputs, labels) pair), e.g. vmeanba_compiler.digits:calibration_batches")
_FORMATTER = argparse.ArgumentDefaultsHelpFormatter
# commands that need the `demo` extra (scikit-learn's digits, matplotlib's plots), checked up front
_NEEDS_EXTRA = {"demo": ("sklearn", "matplotlib"), "train-demo": ("sklearn",),
                "experiments": ("sklearn", "matplotlib"), "report": ("matplotlib",)}


def _add_model_args(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("--model", metavar="MODULE:ATTR", help=_MODEL_HELP)
    parser.add_argument("--checkpoint", metavar="PATH", help=_CHECKPOINT_HELP)
    parser.add_argument("--data", metavar="MODULE:ATTR", required=data_required, help=_DATA_HELP)
    parser.add_argument("--labelled", action="store_true",
                        help="batches are (inputs, labels) pairs, labels = class ids")


def _add_config_options(parser: argparse.ArgumentParser, names: Sequence[str], *,
                        unset_modes: bool = False) -> None:
    """Flags for `VMeanbaConfig` fields: type, choices, default and help come from the config's field
    metadata, so the command line offers exactly what the backend accepts.

    unset_modes: the rewrite modes default to None (follow the profile's recorded modes, else the
    config's defaults) instead of the config's defaults."""
    fields = VMeanbaConfig.cli_fields()
    for name in names:
        field, meta = fields[name], fields[name].metadata
        default, text = field.default, meta["help"]
        if unset_modes and name in VMeanbaConfig().rewrite_options():
            default, text = None, f"{text}. Unset: as the profile was calibrated, else {field.default!r}"
        parser.add_argument(f"--{name.replace('_', '-')}", type=meta.get("type", str), choices=meta.get("choices"),
                            default=default, help=text.replace("%", "%%"))


def _add_selection_args(parser: argparse.ArgumentParser) -> None:
    """How `bench` and `export` choose the sites to rewrite (commands._selection_options reads them)."""
    parser.add_argument("--profile", metavar="PROFILE", help="a profile JSON for --top-k/--threshold/--max-accuracy-drop")
    parser.add_argument("--sites", help="comma-separated site ids, e.g. stages.0.0.op:0,stages.1.0.op:0")
    _add_config_options(parser, ("top_k", "threshold", "metric"))
    _add_config_options(parser, ("dt_mode", "skip_mode"), unset_modes=True)
    parser.add_argument("--max-accuracy-drop", type=float,
                        help="reduce the sites select_for_budget picks for this budget (a fraction)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of --max-accuracy-drop's bound")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="digits",
                        help="digits: classify 8x8 digits; segmentation: label every pixel of 32x32 digit canvases")


def _digits_commands(sub) -> None:
    demo = sub.add_parser(
        "demo", formatter_class=_FORMATTER,
        help="calibrate, select for an accuracy (or mIoU) budget, compile and time a bundled VMamba",
        description="The main job on a bundled VMamba trained on scikit-learn's digits: calibrate on the "
        "calibration split, select the sites that fit the budget, compile with backend='vmeanba' "
        "and backend='inductor', print sites reduced, the test accuracy (segmentation: mIoU) of both and the "
        "speedup (median of interleaved repeats), and write plots, the profile and results.json into --out. "
        "With --task segmentation the budget is on the mean per-image mIoU. Fails if the compiled rewrite "
        "disagrees with the same rewrite run eagerly.",
    )
    _add_task(demo)
    demo.add_argument("--out", default="vmeanba-demo", help="folder for plots, profile.json and results.json")
    demo.add_argument("--max-accuracy-drop", type=float, default=DEFAULT_BUDGET,
                      help="budget as a fraction (0.01 = one point) of the accuracy, or with --task segmentation "
                      "of the mean per-image mIoU; the default is the paper's operating point")
    demo.add_argument("--confidence", type=float, default=0.95,
                      help="one-sided confidence of the drop bound the budget is judged by")
    demo.add_argument("--repeats", type=int, default=20, help="timed runs per backend (median reported)")
    demo.add_argument("--checkpoint", metavar="PATH", help="a `vmeanba train-demo` checkpoint of --task "
                      "(default: bundled)")
    _add_quiet(demo)

    train = sub.add_parser(
        "train-demo", formatter_class=_FORMATTER,
        help="train a bundled VMamba (digits, or --task segmentation) and write its checkpoint",
        description="Train vmamba_digits on the train split of scikit-learn's digits, or with --task segmentation "
        "vmamba_digits_seg on the train canvases (seeded, one thread), and write a checkpoint with the split "
        "and training metadata. With the default seed and epochs and the same torch version this reproduces "
        "the bundled checkpoint bit for bit: `vmeanba train-demo --out vmeanba_compiler/assets/digits_vmamba.pt`, "
        "`vmeanba train-demo --task segmentation --out vmeanba_compiler/assets/segmentation_vmamba.pt`.",
    )
    _add_task(train)
    train.add_argument("--out", help="where to write the checkpoint (default: <task>_vmamba.pt)")
    train.add_argument("--epochs", type=int, help=f"passes over the train split (default: {TrainingSettings.epochs} "
                       f"for digits, {SegmentationTrainingSettings.epochs} for segmentation)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    _add_quiet(train)

    experiments = sub.add_parser(
        "experiments", formatter_class=_FORMATTER,
        help="regenerate docs/RESULTS.md: rankings, budgets, pruning and speed on both bundled models",
        description="On the digits classifier and on the digit-canvas segmenter: accuracy (mIoU)-vs-K for three "
        "rankings (impact, variance ratio, random), the budget selector at 0.5%%, 1%% and 3%%, 40%% magnitude "
        "pruning alone / VMeanba alone / both, and the speed of backend='vmeanba' vs backend='inductor', all on "
        "the held-out test split; writes RESULTS.md and PNGs under img/ in --out.",
    )
    experiments.add_argument("--out", default="docs", help="folder for RESULTS.md (plots go to its img/)")
    experiments.add_argument("--repeats", type=int, default=20, help="timed runs per backend")
    experiments.add_argument("--threads", type=int, default=1,
                             help="torch threads for the speed section (one: steady on a shared machine)")
    experiments.add_argument("--random-orders", type=int, default=10, help="orders averaged for the random ranking")
    experiments.add_argument("--seed", type=int, default=0, help="seed of the random-ranking orders")
    experiments.add_argument("--checkpoint", metavar="PATH",
                             help="a `vmeanba train-demo` digits checkpoint (default: bundled)")
    experiments.add_argument("--segmentation-checkpoint", metavar="PATH",
                             help="a `vmeanba train-demo --task segmentation` checkpoint (default: bundled)")
    _add_quiet(experiments)


def _user_model_commands(sub) -> None:
    cal = sub.add_parser(
        "calibrate", formatter_class=_FORMATTER,
        help="calibrate a model's scan sites on sample data and save the profile JSON",
        description="Run the model on --data and record, per selective-scan site, the channel variance ratio, "
        "the reduced scan's relative error and the layer-impact score (KL of the logits, or the change of "
        "cross-entropy with --impact loss). The profile feeds backend options profile=, threshold=, top_k=.",
    )
    _add_model_args(cal, data_required=True)
    cal.add_argument("--impact", choices=("kl", "loss", "none"), default="kl",
                     help="impact score: KL of outputs, cross-entropy change (needs --labelled), or skip it")
    cal.add_argument("--max-batches", type=int, help="use at most this many batches")
    _add_config_options(cal, ("dt_mode", "skip_mode"))
    cal.add_argument("--out", default="profile.json", help="where to write the profile")
    _add_quiet(cal)

    rep = sub.add_parser(
        "report", formatter_class=_FORMATTER,
        help="print a profile's per-site table and plot it; with model and labelled data, accuracy vs K",
        description="Per-site table (variance ratio, relative error, impact, ranks) and site_metrics.png. With "
        "--model/--checkpoint and --labelled --data, also the accuracy after reducing the K first sites of "
        "each ranking (impact, ratio, random) as a table and accuracy_vs_k.png.",
    )
    rep.add_argument("profile", metavar="PROFILE", help="a profile JSON written by `vmeanba calibrate`")
    _add_model_args(rep, data_required=False)
    rep.add_argument("--out", default="vmeanba-report", help="folder for the PNGs")
    rep.add_argument("--random-orders", type=int, default=5, help="orders averaged for the random ranking")
    rep.add_argument("--seed", type=int, default=0, help="seed of the random orders")
    rep.add_argument("--markdown", action="store_true", help="print tables as markdown")
    _add_quiet(rep)

    bench = sub.add_parser(
        "bench", formatter_class=_FORMATTER,
        help="time backend='vmeanba' with a site selection against backend='inductor' on a model",
        description="Compile the model with backend='inductor' and with backend='vmeanba' and the chosen "
        "sites, time both on the same inputs (median of interleaved repeats) and write JSON with the "
        "machine it ran on. Choose sites with exactly one of --sites, --top-k, --threshold (the last two with "
        "--profile) or --max-accuracy-drop (with --profile and --labelled --data).",
    )
    _add_model_args(bench, data_required=False)
    bench.add_argument("--input-shape", help="time random inputs of this shape instead of --data, e.g. 64,1,8,8")
    _add_selection_args(bench)
    bench.add_argument("--repeats", type=int, default=20, help="timed runs per backend")
    bench.add_argument("--threads", type=int, help="torch threads while compiling and timing (default: torch's)")
    bench.add_argument("--seed", type=int, default=0, help="seed of --input-shape's random inputs")
    bench.add_argument("--out", default="results/cpu/model_bench.json", help="where to write the JSON")
    _add_quiet(bench)


def _export_command(sub) -> None:
    export = sub.add_parser(
        "export", formatter_class=_FORMATTER,
        help="export a model with the chosen sites rewritten as an AOTInductor package that runs without Python",
        description="vmeanba_compiler.export (torch.export with the backend's selection and rewrite), then an "
        "AOTInductor package whose scan calls go to the vmeanba op library's C functions. Writes --out and, next to "
        "it, libvmeanba_ops.so (load it before the package); with --runner also the C++ runner vmeanba-runner. "
        "Choose sites with exactly one of --sites, --top-k, --threshold (the last two with --profile) or "
        "--max-accuracy-drop (with --profile and --labelled --data). See docs/DEPLOY.md.",
    )
    _add_model_args(export, data_required=False)
    export.add_argument("--input-shape", help="export with random example inputs of this shape instead of --data's "
                        "first batch, e.g. 2,1,8,8")
    export.add_argument("--dynamic-batch", action="store_true",
                        help="let the package take any batch size (dimension 0 of every input; the example batch "
                        "must then be at least 2)")
    _add_selection_args(export)
    export.add_argument("--runner", action="store_true", help="also write the C++ runner next to the package")
    export.add_argument("--seed", type=int, default=0, help="seed of --input-shape's random inputs")
    export.add_argument("--out", default="model.pt2", help="where to write the package")
    _add_quiet(export)


def _scan_bench_command(sub) -> None:
    bench = sub.add_parser(
        "bench-scan", formatter_class=_FORMATTER,
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmeanba",
        description="VMeanba for torch.compile: run low-variance selective scans on the channel mean.",
    )
    parser.add_argument("--version", action="version", version=f"vmeanba-compiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _digits_commands(sub)
    _user_model_commands(sub)
    _export_command(sub)
    _scan_bench_command(sub)
    return parser


def _handler(command: str):
    if command == "demo":
        from .demo import main
    elif command == "train-demo":
        from .training import main
    elif command == "experiments":
        from .experiments import main
    elif command == "calibrate":
        from .commands import calibrate_main as main
    elif command == "report":
        from .commands import report_main as main
    elif command == "bench":
        from .commands import bench_main as main
    elif command == "export":
        from .commands import export_main as main
    else:
        from .bench.scan_cpu import main
    return main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        for module in _NEEDS_EXTRA.get(args.command, ()):
            import_extra(module, f"vmeanba {args.command}")
        return _handler(args.command)(args)
    except MissingExtraError as error:  # say which extra to install, not a traceback
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
