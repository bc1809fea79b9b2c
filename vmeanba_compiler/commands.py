"""`vmeanba calibrate`, `vmeanba report`, `vmeanba bench` and `vmeanba export`: the library's verbs on a
user's own model and data (specs and checkpoints as `vmeanba_compiler.loading` reads them)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .bench.model import bench_model
from .bench.timing import write_json
from .budget import select_for_budget
from .calibration import calibrate
from .config import VMeanbaConfig
from .evaluation import accuracy_vs_k
from .loading import load_batches, load_model
from .plots import plot_accuracy_vs_k, plot_site_metrics
from .profile import Profile, ProfileMismatchError
from .reporting import curve_table, format_table, site_table
from .rewrite_modes import recorded_modes


def _check_labelled(batches: list[Any], spec: str) -> None:
    first = batches[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[1], torch.Tensor)):
        raise SystemExit(f"--labelled: every batch of --data {spec!r} must be an (inputs, labels) pair, "
                         f"got {type(first).__name__}")


def calibrate_main(args) -> int:
    model = load_model(args.model, args.checkpoint)
    batches = load_batches(args.data)
    if args.labelled:
        _check_labelled(batches, args.data)
    elif args.impact == "loss":
        raise SystemExit("--impact loss needs labels: pass --labelled data of (inputs, labels) pairs")
    loss_fn = F.cross_entropy if args.impact == "loss" else None
    if args.labelled and loss_fn is None:
        batches = [inputs for inputs, _ in batches]
    profile = calibrate(model, batches, loss_fn=loss_fn, impact=args.impact != "none",
                        max_batches=args.max_batches, config=VMeanbaConfig(dt_mode=args.dt_mode,
                                                                           skip_mode=args.skip_mode),
                        progress=not args.quiet)
    path = profile.save(args.out)
    print(site_table(profile))
    print(f"wrote {path} ({len(profile.site_ids)} sites, {profile.num_batches} batches, "
          f"{profile.num_samples} samples)")
    return 0


def report_main(args) -> int:
    profile = Profile.load(args.profile)
    out = Path(args.out)
    print(site_table(profile, markdown=args.markdown))
    written = [plot_site_metrics(profile, out / "site_metrics.png")]
    if args.data is not None:
        batches = load_batches(args.data)
        _check_labelled(batches, args.data)
        model = load_model(args.model, args.checkpoint)
        has_impact = all(profile.metric(site, "impact") is not None for site in profile.site_ids)
        rankings = ["impact", "ratio", "random"] if has_impact else ["ratio", "random"]
        curves = accuracy_vs_k(model, profile, batches, rankings, random_orders=args.random_orders,
                               seed=args.seed, progress=not args.quiet)
        print()
        print(curve_table(curves, markdown=args.markdown))
        written.append(plot_accuracy_vs_k(curves, out / "accuracy_vs_k.png"))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _example_inputs(args) -> Any:
    if args.data is not None:
        first = load_batches(args.data)[0]
        return first[0] if args.labelled else first
    if args.input_shape is None:
        raise SystemExit("give --data module:function (its first batch is used) or --input-shape, e.g. 64,1,8,8")
    shape = [int(x) for x in args.input_shape.split(",")]
    return torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))


def _selection_options(args, model) -> dict[str, Any]:
    """The backend options of the sites chosen by --sites, --top-k, --threshold or --max-accuracy-drop."""
    chosen = [flag for flag, value in (("--sites", args.sites), ("--top-k", args.top_k),
                                       ("--threshold", args.threshold),
                                       ("--max-accuracy-drop", args.max_accuracy_drop)) if value is not None]
    if len(chosen) != 1:
        raise SystemExit(f"choose the sites with exactly one of --sites, --top-k, --threshold, --max-accuracy-drop "
                         f"(got {', '.join(chosen) or 'none'})")
    explicit = {name: getattr(args, name) for name in VMeanbaConfig().rewrite_options()
                if getattr(args, name) is not None}
    if args.sites is not None:
        return {**explicit, "sites": [s for s in args.sites.split(",") if s]}
    if args.profile is None:
        raise SystemExit(f"{chosen[0]} selects from calibration data: pass --profile PROFILE.json")
    profile = Profile.load(args.profile)
    modes = {**recorded_modes(profile.settings), **explicit}
    try:  # refuse modes other than the profile's before any work
        VMeanbaConfig(profile=profile, **modes)
    except ProfileMismatchError as error:
        raise SystemExit(f"vmeanba {args.command}: {error}") from None
    if args.top_k is not None:
        return {"profile": profile, "top_k": args.top_k, **modes}
    if args.threshold is not None:
        return {"profile": profile, "threshold": args.threshold, "metric": args.metric, **modes}
    if args.data is None or not args.labelled:
        raise SystemExit("--max-accuracy-drop measures accuracy: pass --labelled --data of (inputs, labels) pairs")
    batches = load_batches(args.data)
    _check_labelled(batches, args.data)
    selection = select_for_budget(model, profile, batches, args.max_accuracy_drop, confidence=args.confidence,
                                  progress=not args.quiet)
    print(selection)
    return selection.compile_options()


def bench_main(args) -> int:
    model = load_model(args.model, args.checkpoint)
    options = _selection_options(args, model)
    result = bench_model(model, _example_inputs(args), options, repeats=args.repeats, threads=args.threads)
    write_json(Path(args.out), result)
    timings = result["results"]
    print(format_table(
        ["backend", "compile s", "median ms", "speedup"],
        [[name, f"{t['compile_s']:.1f}", f"{t['median_ms']:.3f}",
          f"{timings['inductor']['median_ms'] / t['median_ms']:.2f}x"] for name, t in timings.items()],
    ))
    print(f"median of {args.repeats} interleaved runs on {result['threads']} thread(s); wrote {args.out}")
    return 0


def _export_arguments(inputs: Any, dynamic_batch: bool) -> tuple[tuple, dict, Any]:
    """(args, kwargs, dynamic_shapes) for `export` from one batch of inputs; with `dynamic_batch`,
    dimension 0 of every tensor input is one dynamic size."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})
    if not dynamic_batch:
        return args, kwargs, None
    batch = torch.export.Dim("batch")

    def spec(value: Any) -> Any:
        return {0: batch} if isinstance(value, torch.Tensor) else None

    dynamic = {name: spec(value) for name, value in kwargs.items()} if kwargs else tuple(map(spec, args))
    return args, kwargs, dynamic


def export_main(args) -> int:
    from .deploy import op_library, package, runner
    from .export import export

    model = load_model(args.model, args.checkpoint)
    options = _selection_options(args, model)
    positional, keywords, dynamic_shapes = _export_arguments(_example_inputs(args), args.dynamic_batch)
    program = export(model, positional, keywords, dynamic_shapes=dynamic_shapes, **options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [package.package(program, out)]
    written.append(Path(shutil.copy2(op_library.build(), out.parent / op_library.LIBRARY_FILE)))
    if args.runner:
        written.append(Path(shutil.copy2(runner.build(), out.parent / runner.RUNNER_FILE)))
    print(f"wrote {', '.join(map(str, written))}")
    print(f"run it: {out.parent / runner.RUNNER_FILE} {out} inputs.pt outputs.pt "
          f"--op-library {out.parent / op_library.LIBRARY_FILE}  (inputs.pt: torch.save([x], 'inputs.pt'))")
    return 0
