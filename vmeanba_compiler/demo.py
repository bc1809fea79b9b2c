"""`vmeanba demo [--task segmentation]`: the main job end to end, on a bundled trained model and real data.

Loads a bundled VMamba trained on scikit-learn's digits (the classifier, or with --task
segmentation the per-pixel labeller of digit canvases), calibrates it on the calibration split,
selects the sites that fit a budget (`select_for_budget`: on accuracy, or on the mean per-image
mIoU), compiles the model with `backend="vmeanba"` and with `backend="inductor"`, and reports
sites reduced, the test accuracy (mIoU) of both and the speedup (median of interleaved repeats,
same run). As a check it also asserts that the compiled rewrite agrees with the same rewrite run
eagerly (within `MODEL_TOLERANCES`); a disagreement fails the command. Nothing in it is random,
so the same checkpoint gives the same selection and metrics every run (`vmeanba experiments`
adds the random-ranking control).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .bench.model import compiled_contenders, time_contenders
from .bench.timing import machine_info, write_json
from .budget import select_for_budget
from .calibration import calibrate
from .digits import CALIBRATION_BATCH
from .evaluation import accuracy, accuracy_vs_k, correctness, image_mean_ious, mean_iou, rewritten
from .plots import plot_accuracy_vs_k, plot_segmentations, plot_site_metrics
from .reporting import format_table, site_table
from .testing import MODEL_TOLERANCES
from .training import load_digits_task, load_segmentation_task

# The paper's operating point ("under 3% accuracy loss"). With 360 calibration images a
# tighter budget cannot be certified at 95% for any set that changes even a few predictions.
DEFAULT_BUDGET = 0.03
# Segmentation evaluates and times the compiled models on batches of this many canvases (400
# test canvases = 5 batches of one shape, so nothing recompiles).
SEGMENTATION_BATCH = 80
SHOWN_CANVASES = 6  # test canvases drawn in predictions.png


@dataclass(frozen=True)
class DemoTask:
    """One bundled task, as the demo and the experiments run it.

    metric: (fn, labelled batches) -> the reported number (accuracy, or dataset mIoU);
    score: (fn, labelled batches) -> per-sample scores the budget selector pairs;
    test: labelled test batches, all of one shape (the first one is also the timing input)."""

    name: str
    model: nn.Module
    data: Any
    metadata: dict[str, Any]
    metric_name: str
    metric: Callable[[Callable, list], float]
    score: Callable[[Callable, list], Tensor]
    test: list[tuple[Tensor, Tensor]]

    @property
    def calibration_images(self) -> list[Tensor]:
        return self.data.calibration.image_batches(CALIBRATION_BATCH)

    @property
    def calibration_labelled(self) -> list[tuple[Tensor, Tensor]]:
        return self.data.calibration.batches(len(self.data.calibration))

    def describe(self) -> str:
        data = self.data
        if self.name == "digits":
            return (f"VMamba trained on scikit-learn digits (train {len(data.train)}, calibration "
                    f"{len(data.calibration)}, test {len(data.test)} images; split seed {data.seed})")
        size = data.settings.size
        return (f"VMamba + FPN decoder labelling every pixel of {size}x{size} canvases of scikit-learn digits "
                f"(train {len(data.train)}, calibration {len(data.calibration)}, test {len(data.test)} canvases "
                f"from disjoint digit images; seed {data.seed})")


def load_task(name: str, checkpoint: Any = None) -> DemoTask:
    """The bundled (or `checkpoint`'s) model of task `name` with its data and metric."""
    if name == "digits":
        model, data, metadata = load_digits_task(checkpoint)
        return DemoTask(name, model, data, metadata, "accuracy", accuracy, correctness,
                        data.test.batches(len(data.test)))
    model, data, metadata = load_segmentation_task(checkpoint)
    return DemoTask(name, model, data, metadata, "mIoU", mean_iou, image_mean_ious,
                    data.test.batches(SEGMENTATION_BATCH))


def _outputs(fn: Callable, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(inputs) for inputs, _ in batches])


def main(args) -> int:
    out = Path(args.out)
    task = load_task(args.task, args.checkpoint)
    model = task.model
    print(f"vmeanba demo: {task.describe()}")

    profile = calibrate(model, task.calibration_images, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    profile.save(out / "profile.json")
    selection = select_for_budget(model, profile, task.calibration_labelled, args.max_accuracy_drop,
                                  confidence=args.confidence, score=task.score, progress=not args.quiet)
    options = selection.compile_options()

    eager_rewrite = _outputs(rewritten(model, selection.sites, **selection.rewrite_options), task.test)
    fns = compiled_contenders(model, {"vmeanba": options})
    timing_input = task.test[0][0]
    timings = time_contenders(fns, timing_input, args.repeats)  # the first call compiles
    outputs = {name: _outputs(fn, task.test) for name, fn in fns.items()}
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    agree = torch.allclose(outputs["vmeanba"], eager_rewrite, rtol=rtol, atol=atol)
    labels = torch.cat([labels for _, labels in task.test])
    metric = {name: task.metric(lambda logits: logits, [(o, labels)]) for name, o in outputs.items()}
    # the budgeted quantity itself (accuracy; mean per-image mIoU), to check the budget on held-out data
    score = {name: float(task.score(lambda logits: logits, [(o, labels)]).double().mean())
             for name, o in outputs.items()}
    speedup = timings["inductor"]["median_ms"] / timings["vmeanba"]["median_ms"]

    curves = accuracy_vs_k(model, profile, task.test, ("impact", "ratio"), metric=task.metric,
                           progress=not args.quiet)
    plots = [plot_site_metrics(profile, out / "site_metrics.png", selection.sites),
             plot_accuracy_vs_k(curves, out / "accuracy_vs_k.png", f"test split: {task.metric_name} vs sites reduced",
                                ylabel=f"{task.metric_name} (%)")]
    if task.name == "segmentation":
        shown = slice(0, SHOWN_CANVASES)
        plots.append(plot_segmentations(
            task.data.test.images[shown], labels[shown],
            {"inductor": outputs["inductor"][shown].argmax(-1),
             f"vmeanba ({len(selection.sites)} sites)": outputs["vmeanba"][shown].argmax(-1)},
            out / "predictions.png"))

    n = len(profile.site_ids)
    name = task.metric_name
    summary_table = format_table(
        ["", "backend='inductor'", "backend='vmeanba'"],
        [["sites reduced", f"0/{n}", f"{len(selection.sites)}/{n}"],
         [f"test {name}", f"{metric['inductor']:.2%}", f"{metric['vmeanba']:.2%}"],
         ["compile s (first call)", f"{timings['inductor']['compile_s']:.1f}",
          f"{timings['vmeanba']['compile_s']:.1f}"],
         [f"median ms (batch {timing_input.shape[0]}, {args.repeats} runs)",
          f"{timings['inductor']['median_ms']:.2f}", f"{timings['vmeanba']['median_ms']:.2f}"],
         ["speedup vs inductor", "1.00x", f"{speedup:.2f}x"]],
    )
    print(site_table(profile, selection.sites))
    print(f"\nbudget {args.max_accuracy_drop:.2%} of {selection.score_name} (judged on the calibration split, "
          f"{selection.confidence:.0%} bound {selection.drop_bound:.2%}): "
          f"{', '.join(selection.sites) or 'no site fits'}")
    print(summary_table)
    budgeted = "" if selection.score_name == name else \
        f" ({selection.score_name} drop {score['inductor'] - score['vmeanba']:.2%})"
    print(f"test {name} drop {metric['inductor'] - metric['vmeanba']:.2%}{budgeted}; "
          "compiled rewrite vs eager rewrite: "
          f"{'agree' if agree else 'DISAGREE'} (rtol={rtol:g}, atol={atol:g})")

    result: dict[str, Any] = {
        "task": task.name,
        "checkpoint": task.metadata,
        "selection": {"sites": list(selection.sites), "score": selection.score_name,
                      "max_accuracy_drop": selection.max_accuracy_drop,
                      "calibration_drop": selection.drop, "calibration_drop_bound": selection.drop_bound},
        f"test_{'accuracy' if task.name == 'digits' else 'miou'}": metric,
        "test_score": score,
        "timing": timings,
        "speedup_vs_inductor": speedup,
        "compiled_matches_eager_rewrite": agree,
        "machine": machine_info(),
    }
    write_json(out / "results.json", result)
    print(f"wrote {', '.join(str(p) for p in plots)}, {out / 'profile.json'}, {out / 'results.json'}")
    return 0 if agree else 1
