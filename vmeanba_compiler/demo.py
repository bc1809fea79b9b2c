"""`vmeanba demo`: the main job end to end, on the bundled trained model and real data.

Loads the bundled VMamba trained on scikit-learn's digits, calibrates it on the calibration
split, selects the sites that fit an accuracy budget (`select_for_budget`), compiles the model
with `backend="vmeanba"` and with `backend="inductor"`, and reports sites reduced, test accuracy
of both and the speedup (median of interleaved repeats, same run). As a check it also asserts
that the compiled rewrite agrees with the same rewrite run eagerly (within `MODEL_TOLERANCES`);
a disagreement fails the command. Nothing in it is random, so the same checkpoint gives the same
selection and accuracies every run (`vmeanba experiments` adds the random-ranking control).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .bench.model import compiled_contenders, time_contenders
from .bench.timing import machine_info, write_json
from .budget import select_for_budget
from .calibration import calibrate
from .digits import CALIBRATION_BATCH
from .evaluation import accuracy_vs_k, rewritten
from .plots import plot_accuracy_vs_k, plot_site_metrics
from .reporting import format_table, site_table
from .testing import MODEL_TOLERANCES
from .training import load_digits_task

# The paper's operating point ("under 3% accuracy loss"). With 360 calibration images a
# tighter budget cannot be certified at 95% for any set that changes even a few predictions.
DEFAULT_BUDGET = 0.03


def main(args) -> int:
    out = Path(args.out)
    model, data, metadata = load_digits_task(args.checkpoint)
    test_images, test_labels = data.test.images, data.test.labels
    print(f"vmeanba demo: VMamba trained on scikit-learn digits (train {len(data.train)}, "
          f"calibration {len(data.calibration)}, test {len(data.test)} images; split seed {data.seed})")

    profile = calibrate(model, data.calibration.image_batches(CALIBRATION_BATCH), progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    profile.save(out / "profile.json")
    selection = select_for_budget(model, profile, data.calibration.batches(len(data.calibration)),
                                  args.max_accuracy_drop, confidence=args.confidence, progress=not args.quiet)
    options = selection.compile_options()

    with torch.no_grad():
        eager_rewrite = rewritten(model, selection.sites, **selection.rewrite_options)(test_images)
    fns = compiled_contenders(model, {"vmeanba": options})
    timings = time_contenders(fns, test_images, args.repeats)  # the first call compiles
    with torch.no_grad():
        outputs = {name: fn(test_images) for name, fn in fns.items()}
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    agree = torch.allclose(outputs["vmeanba"], eager_rewrite, rtol=rtol, atol=atol)
    acc = {name: float((o.argmax(-1) == test_labels).double().mean()) for name, o in outputs.items()}
    speedup = timings["inductor"]["median_ms"] / timings["vmeanba"]["median_ms"]

    curves = accuracy_vs_k(model, profile, data.test.batches(len(data.test)), ("impact", "ratio"),
                           progress=not args.quiet)
    plots = [plot_site_metrics(profile, out / "site_metrics.png", selection.sites),
             plot_accuracy_vs_k(curves, out / "accuracy_vs_k.png", "test split: accuracy vs sites reduced")]

    n = len(profile.site_ids)
    summary_table = format_table(
        ["", "backend='inductor'", "backend='vmeanba'"],
        [["sites reduced", f"0/{n}", f"{len(selection.sites)}/{n}"],
         ["test accuracy", f"{acc['inductor']:.2%}", f"{acc['vmeanba']:.2%}"],
         ["compile s (first call)", f"{timings['inductor']['compile_s']:.1f}", f"{timings['vmeanba']['compile_s']:.1f}"],
         [f"median ms (batch {len(data.test)}, {args.repeats} runs)",
          f"{timings['inductor']['median_ms']:.2f}", f"{timings['vmeanba']['median_ms']:.2f}"],
         ["speedup vs inductor", "1.00x", f"{speedup:.2f}x"]],
    )
    print(site_table(profile, selection.sites))
    print(f"\nbudget {args.max_accuracy_drop:.2%} (judged on the calibration split, {selection.confidence:.0%} "
          f"bound {selection.drop_bound:.2%}): {', '.join(selection.sites) or 'no site fits'}")
    print(summary_table)
    print(f"test accuracy drop {acc['inductor'] - acc['vmeanba']:.2%}; compiled rewrite vs eager rewrite: "
          f"{'agree' if agree else 'DISAGREE'} (rtol={rtol:g}, atol={atol:g})")

    result: dict[str, Any] = {
        "checkpoint": metadata,
        "selection": {"sites": list(selection.sites), "max_accuracy_drop": selection.max_accuracy_drop,
                      "calibration_drop": selection.drop, "calibration_drop_bound": selection.drop_bound},
        "test_accuracy": acc,
        "timing": timings,
        "speedup_vs_inductor": speedup,
        "compiled_matches_eager_rewrite": agree,
        "machine": machine_info(),
    }
    write_json(out / "results.json", result)
    print(f"wrote {', '.join(str(p) for p in plots)}, {out / 'profile.json'}, {out / 'results.json'}")
    return 0 if agree else 1
