"""Accuracy and mIoU of a model, or of a model with chosen sites rewritten, on labelled batches.

`rewritten(model, sites)` is the backend itself with `inductor=False`: the very FX rewrite that
`torch.compile(backend="vmeanba", options={"sites": ...})` applies, run eagerly, so evaluating a
selection costs one Dynamo trace and no Inductor compile, and measures exactly what compiles.
`accuracy_vs_k` draws the curve behind the experiments: accuracy (or another metric, e.g.
`mean_iou`) after reducing the K first sites of each ranking.

Segmentation: a model returns channels-last logits (B, H, W, classes) and labels are label maps
(B, H, W), so `argmax(-1)` is the prediction for both tasks. mIoU is the standard one: per class,
IoU = TP / (TP + FP + FN) with the counts summed over every pixel of every image; a class absent
from both prediction and target has no IoU and is left out of the mean; every class counts,
background (class 0 of the digit canvases) included. `image_mean_ious` applies the same
definition to each image alone: one score in [0, 1] per image, what the budget selector pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .profile import Profile
from .rankings import RANKINGS, rank_sites
from .rewrite_modes import recorded_modes
from .tracing import backend_errors_unwrapped, call_with_inputs, fresh_trace

LabelledBatches = Iterable[tuple[Any, Tensor]]


def rewritten(model: nn.Module, sites: Sequence[str], **options: Any) -> Callable:
    """`model` with exactly `sites` reduced, run eagerly (no Inductor). Extra `options` (e.g.
    dt_mode, skip_mode) are backend options. Each call traces anew with a backend of its own
    (no earlier trace is reused); its compiled code is dropped when the result is released or
    garbage-collected (`tracing.IsolatedTrace`)."""
    return fresh_trace(model, "vmeanba", options={**options, "sites": list(sites), "inductor": False})


def rewrite_modes(profile: Profile) -> dict[str, Any]:
    """The dt_mode/skip_mode a profile was measured under: evaluations must rewrite the same way."""
    return recorded_modes(profile.settings)


def _predictions(fn: Callable, batches: LabelledBatches) -> tuple[Tensor, Tensor, int]:
    """argmax(fn(inputs), -1) and the labels, each concatenated over batches, and the number of
    classes (the logits' last dimension)."""
    predicted, targets, classes = [], [], 0
    with torch.no_grad(), backend_errors_unwrapped():
        for inputs, labels in batches:
            logits = call_with_inputs(fn, inputs)
            predicted.append(logits.argmax(-1))
            targets.append(labels)
            classes = logits.shape[-1]
    if not predicted:
        raise ValueError("no labelled batches given: pass a non-empty iterable of (inputs, labels) pairs")
    return torch.cat(predicted), torch.cat(targets), classes


def correctness(fn: Callable, batches: LabelledBatches) -> Tensor:
    """Bool tensor, one entry per sample: does argmax(fn(inputs)) equal the label?"""
    predicted, labels, _ = _predictions(fn, batches)
    return predicted == labels


def accuracy(fn: Callable, batches: LabelledBatches) -> float:
    """Top-1 accuracy of `fn` over all samples of `batches`."""
    return float(correctness(fn, batches).double().mean())


def confusion_matrices(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(n, C, C) pixel counts per image (dimension 0 of the label maps): [i, t, p] counts the
    pixels of image i labelled t and predicted p."""
    if predicted.shape != target.shape:
        raise ValueError(f"prediction {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    n = target.shape[0]
    image = torch.arange(n).view(n, *([1] * (target.dim() - 1))).expand_as(target)
    flat = (image * num_classes + target) * num_classes + predicted
    return torch.bincount(flat.flatten(), minlength=n * num_classes**2).view(n, num_classes, num_classes)


def class_ious(confusion: Tensor) -> Tensor:
    """IoU per class from (..., C, C) confusion counts; NaN for a class in neither the target
    nor the prediction."""
    confusion = confusion.double()
    hits = confusion.diagonal(dim1=-2, dim2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - hits  # TP + FN + FP
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(union, float("nan")))


def _image_confusions(fn: Callable, batches: LabelledBatches) -> Tensor:
    """One confusion matrix per image of `batches`, predicted by `fn`."""
    predicted, labels, classes = _predictions(fn, batches)
    if labels.dim() < 2:
        raise ValueError(f"mIoU needs label maps (B, H, W), got labels of shape {tuple(labels.shape)}")
    return confusion_matrices(predicted, labels, classes)


def mean_iou(fn: Callable, batches: LabelledBatches) -> float:
    """Dataset mIoU of `fn` (module docstring: counts over all pixels, present classes only)."""
    return float(class_ious(_image_confusions(fn, batches).sum(0)).nanmean())


def image_mean_ious(fn: Callable, batches: LabelledBatches) -> Tensor:
    """The mIoU of each image alone, float64 in [0, 1], one entry per image."""
    return class_ious(_image_confusions(fn, batches)).nanmean(-1)


# What the budget selector calls each per-sample score in its reports.
SCORE_NAMES: dict[Callable, str] = {correctness: "accuracy", image_mean_ious: "image mIoU"}


@dataclass(frozen=True)
class AccuracyCurve:
    """The metric (accuracy unless `accuracy_vs_k` was given another) after reducing the first K
    sites of a ranking, K = 0 .. number of sites.

    For "random" the values are the mean over `orders`, and `spread` holds (min, max)."""

    ranking: str
    accuracies: tuple[float, ...]
    orders: tuple[tuple[str, ...], ...]
    spread: Optional[tuple[tuple[float, float], ...]] = None


def accuracy_vs_k(
    model: nn.Module,
    profile: Profile,
    labelled_batches: LabelledBatches,
    rankings: Sequence[str] = RANKINGS,
    *,
    random_orders: int = 5,
    seed: int = 0,
    metric: Callable[[Callable, list], float] = accuracy,
    progress: bool = True,
) -> list[AccuracyCurve]:
    """One curve per ranking; each distinct set of sites is evaluated once (the empty set and
    the full set are shared by every ranking, and random orders share prefixes). `metric(fn,
    batches)` scores each set: `accuracy`, or `mean_iou` for segmentation."""
    from tqdm.auto import tqdm

    batches = list(labelled_batches)
    modes = rewrite_modes(profile)
    orders = {r: [rank_sites(profile, r, seed + i) for i in range(random_orders if r == "random" else 1)]
              for r in rankings}
    needed = {frozenset(order[:k]) for os in orders.values() for order in os for k in range(len(order) + 1)}
    cache = {}
    for subset in tqdm(sorted(needed, key=lambda s: (len(s), sorted(s))), desc="vmeanba accuracy-vs-K",
                       disable=not progress):
        fn = model if not subset else rewritten(model, sorted(subset), **modes)
        cache[subset] = metric(fn, batches)
    curves = []
    for ranking, os in orders.items():
        table = [[cache[frozenset(order[:k])] for k in range(len(order) + 1)] for order in os]
        columns = list(zip(*table))
        curves.append(AccuracyCurve(
            ranking=ranking,
            accuracies=tuple(sum(c) / len(c) for c in columns),
            orders=tuple(tuple(o) for o in os),
            spread=tuple((min(c), max(c)) for c in columns) if ranking == "random" else None,
        ))
    return curves
