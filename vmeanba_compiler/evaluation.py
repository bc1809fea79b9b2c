"""Accuracy of a model, or of a model with chosen sites rewritten, on labelled batches.

`rewritten(model, sites)` is the backend itself with `inductor=False`: the very FX rewrite that
`torch.compile(backend="vmeanba", options={"sites": ...})` applies, run eagerly, so evaluating a
selection costs one Dynamo trace and no Inductor compile, and measures exactly what compiles.
`accuracy_vs_k` draws the curve behind the experiments: accuracy after reducing the K first
sites of each ranking.
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


def correctness(fn: Callable, batches: LabelledBatches) -> Tensor:
    """Bool tensor, one entry per sample: does argmax(fn(inputs)) equal the label?"""
    hits = []
    with torch.no_grad(), backend_errors_unwrapped():
        for inputs, labels in batches:
            hits.append(call_with_inputs(fn, inputs).argmax(-1) == labels)
    if not hits:
        raise ValueError("no labelled batches given: pass a non-empty iterable of (inputs, labels) pairs")
    return torch.cat(hits)


def accuracy(fn: Callable, batches: LabelledBatches) -> float:
    """Top-1 accuracy of `fn` over all samples of `batches`."""
    return float(correctness(fn, batches).double().mean())


@dataclass(frozen=True)
class AccuracyCurve:
    """Accuracy after reducing the first K sites of a ranking, K = 0 .. number of sites.

    For "random" the accuracies are the mean over `orders`, and `spread` holds (min, max)."""

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
    progress: bool = True,
) -> list[AccuracyCurve]:
    """One curve per ranking; each distinct set of sites is evaluated once (the empty set and
    the full set are shared by every ranking, and random orders share prefixes)."""
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
        cache[subset] = accuracy(fn, batches)
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
