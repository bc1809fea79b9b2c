"""`select_for_budget`: the largest set of sites whose accuracy drop stays within a budget.

Greedy by impact, verified by evaluation: sites are added in ranking order (lowest impact
first); after each addition the model with that set rewritten (the backend's own rewrite, run
eagerly) is evaluated on the labelled calibration data, and the search stops at the first set
that breaks the budget. The result is the longest prefix of the ranking that meets it.

"Meets the budget" is judged by an upper confidence bound on the drop, not by the drop seen on
the calibration data: that is one sample of the data the model will meet, and a set accepted
because it looked fine there does worse elsewhere (docs/RESULTS.md shows a 3% budget judged by
the observed drop picking a set that loses 3.3 points on the held-out split). The bound is the
Agresti-Min adjusted Wald interval for a difference of paired proportions (Agresti & Min,
Biometrics 2005): with n samples, b of which only the baseline classifies correctly and c only
the reduced model,

    drop  = (b - c) / n
    bound = (b' - c') / n' + z * sqrt((b' + c') - (b' - c')^2 / n') / n',
            b' = b + 1/2, c' = c + 1/2, n' = n + 2,   z = the one-sided `confidence` quantile.

Per-sample scores need not be 0/1: segmentation pairs each image's mIoU (`score=image_mean_ious`).
The bound above is the normal bound on the mean of the paired differences d_i = baseline_i -
reduced_i after two pseudo-samples are added (weight 1/2 at d = +1, 1/2 at d = -1, 1 at d = 0):

    bound = sum(d') / n' + z * sqrt(sum(d'^2) - sum(d')^2 / n') / n',

which for 0/1 scores (d in {-1, 0, 1}) is exactly Agresti-Min's, and for scores in [0, 1] is
the same adjusted Wald bound on a mean difference (the pseudo-samples keep a set that changes
nothing from being certified by a zero variance). The budget is then on the mean score: mean
per-image mIoU, not the dataset mIoU reported beside it (that one is not a mean over images).

Testing the nested sets in a fixed order and stopping at the first failure is a fixed-sequence
procedure: the chance that ANY accepted set's true drop exceeds the budget stays at most
1 - confidence without a multiplicity correction (the order comes from the label-free impact
score, fixed before any label is read). Skipping a failing site and trying the next would void
that guarantee, so the search does not. A set that changes no prediction is still charged about
z / n: the selector claims no more than n samples can show, so small calibration sets select
little under tight budgets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Optional

from torch import Tensor, nn

from .config import VMeanbaConfig
from .evaluation import SCORE_NAMES, LabelledBatches, correctness, rewrite_modes, rewritten
from .profile import Profile, parameter_hash
from .rankings import rank_sites

log = logging.getLogger("vmeanba_compiler.budget")


@dataclass(frozen=True)
class BudgetStep:
    """One candidate set (the sites accepted before plus `site_id`) and what evaluation found."""

    site_id: str
    accepted: bool
    accuracy: float
    drop: float
    drop_bound: float


@dataclass(frozen=True)
class BudgetSelection:
    """The chosen sites and their measured effect on the labelled calibration data.

    accuracy is the mean per-sample score (`score_name`: top-1 accuracy by default, the mean
    per-image mIoU for segmentation); drop is baseline_accuracy - accuracy (fractions: 0.01 is
    one point); drop_bound is the confidence bound the selection was judged by (<= max_accuracy_drop
    by construction).
    steps: every set evaluated, the accepted prefixes then (unless all fit) the first failure.
    """

    sites: tuple[str, ...]
    baseline_accuracy: float
    accuracy: float
    drop: float
    drop_bound: float
    max_accuracy_drop: float
    confidence: float
    num_samples: int
    ranking: str
    steps: tuple[BudgetStep, ...]
    rewrite_options: dict[str, Any] = field(default_factory=dict)
    score_name: str = "accuracy"

    def compile_options(self) -> dict[str, Any]:
        """`torch.compile(model, backend="vmeanba", options=...)` that rewrites these sites."""
        return {**self.rewrite_options, "sites": list(self.sites)}

    def __str__(self) -> str:
        lines = [f"{'site':24s} {self.score_name:>10s} {'drop':>8s} {'bound':>8s}  decision"]
        for s in self.steps:
            lines.append(f"{s.site_id:24s} {s.accuracy:10.2%} {s.drop:8.2%} {s.drop_bound:8.2%}  "
                         f"{'keep' if s.accepted else 'stop: over budget'}")
        lines.append(
            f"{len(self.sites)} site(s) within a {self.max_accuracy_drop:.2%} budget on {self.num_samples} "
            f"samples: {self.score_name} {self.baseline_accuracy:.2%} -> {self.accuracy:.2%} (drop {self.drop:.2%}, "
            f"{self.confidence:.0%} bound {self.drop_bound:.2%})"
        )
        return "\n".join(lines)


def paired_drop_bound(baseline_scores: Tensor, scores: Tensor, z: float) -> float:
    """Upper bound on the drop of the mean score from paired per-sample scores in [0, 1] (bool:
    correctness); Agresti-Min's for 0/1 scores (module docstring)."""
    d = baseline_scores.double() - scores.double()
    total = d.numel() + 2
    s1 = float(d.sum())  # the pseudo-samples add (1/2)(+1) + (1/2)(-1) + 1(0) = 0 to sum(d) ...
    s2 = float(d.square().sum()) + 1.0  # ... and (1/2)(1) + (1/2)(1) + 0 = 1 to sum(d^2)
    return s1 / total + z * math.sqrt(max(s2 - s1**2 / total, 0.0)) / total


def select_for_budget(
    model: nn.Module,
    profile: Profile,
    labelled_batches: LabelledBatches,
    max_accuracy_drop: float,
    *,
    ranking: str = "impact",
    confidence: float = 0.95,
    score: Callable[[Callable, list], Tensor] = correctness,
    progress: bool = True,
) -> BudgetSelection:
    """Greedy selection under an accuracy budget (module docstring: how, and why a bound).

    model: the model `profile` was calibrated on, in eval mode.
    labelled_batches: (inputs, labels) pairs, e.g. the calibration split; labels are class ids
        compared with argmax of the model's output (label maps for segmentation).
    max_accuracy_drop: a fraction (0.01 = one accuracy point), of the mean `score`.
    ranking: the order sites are offered in ("impact" or "ratio"; see `rank_sites`). For the
        guarantee it must not depend on these labels: calibrate with the default KL impact, or
        with loss_fn on other labelled data than `labelled_batches`.
    confidence: one-sided level of the bound; 0.5 judges by the observed drop plus the
        small-sample adjustment only (no guarantee).
    score: `score(fn, batches)` -> one score in [0, 1] per sample, the same samples in the same
        order for every fn: `correctness` (top-1, the default) or `image_mean_ious` (segmentation).
    """
    from tqdm.auto import tqdm

    if not 0 <= max_accuracy_drop < 1:
        raise ValueError(f"max_accuracy_drop is a fraction in [0, 1) (0.01 = one point), got {max_accuracy_drop!r}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")
    profile.check_compatible(profile.signatures, parameter_hash(model))
    # every set is evaluated (and later compiled) with the rewrite modes the profile was measured under
    modes = VMeanbaConfig(profile=profile, **rewrite_modes(profile)).rewrite_options()
    batches = list(labelled_batches)
    order = rank_sites(profile, ranking)
    z = NormalDist().inv_cdf(confidence)

    baseline = score(model, batches)
    accepted: list[str] = []
    current: Optional[Tensor] = None
    steps = []
    for site in tqdm(order, desc="vmeanba budget", disable=not progress):
        correct = score(rewritten(model, [*accepted, site], **modes), batches)
        bound = paired_drop_bound(baseline, correct, z)
        keep = bound <= max_accuracy_drop
        acc = float(correct.double().mean())
        steps.append(BudgetStep(site, keep, acc, float(baseline.double().mean()) - acc, bound))
        log.info("budget: %s after %s -> bound %.4f (%s)", site, accepted, bound, "keep" if keep else "stop")
        if not keep:
            break
        accepted.append(site)
        current = correct
    final = baseline if current is None else current
    base_acc, acc = float(baseline.double().mean()), float(final.double().mean())
    return BudgetSelection(
        sites=tuple(accepted), baseline_accuracy=base_acc, accuracy=acc, drop=base_acc - acc,
        drop_bound=paired_drop_bound(baseline, final, z) if accepted else 0.0,
        max_accuracy_drop=max_accuracy_drop, confidence=confidence, num_samples=baseline.numel(),
        ranking=ranking, steps=tuple(steps), rewrite_options=modes,
        score_name=SCORE_NAMES.get(score, score.__name__),
    )
