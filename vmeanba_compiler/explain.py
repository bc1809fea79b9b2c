"""`explain(model, example_inputs, **options)`: what the backend would do to a model, and why.

It traces the model exactly as `backend="vmeanba"` does, runs the same site discovery and
selection, and reports every site: sizes, profile metrics, the decision with its reason, and
the estimated scan FLOPs the rewrite removes (a d-fold cut of the state updates per site).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .config import VMeanbaConfig
from .passes import canonicalize
from .passes.site_selection import unknown_site_ids_error
from .passes.vmeanba_rewrite import RewritePlan, plan_rewrite
from .tracing import backend_errors_unwrapped, call_with_inputs, fresh_trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteReport:
    site_id: str
    dim: int
    state: int
    groups: int
    length: Any
    rewrite: bool
    reason: str
    ratio: Optional[float]
    relative_error: Optional[float]
    impact: Optional[float]
    scan_flops: float
    scan_flops_removed: float


@dataclass(frozen=True)
class ExplainReport:
    sites: list[SiteReport]
    graph_count: int

    @property
    def rewritten(self) -> list[str]:
        return [s.site_id for s in self.sites if s.rewrite]

    @property
    def scan_flops_removed(self) -> float:
        return sum(s.scan_flops_removed for s in self.sites)

    @property
    def scan_flops(self) -> float:
        return sum(s.scan_flops for s in self.sites)

    def __str__(self) -> str:
        def fmt(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.3g}"

        header = f"{'site':32s} {'dim':>5s} {'N':>3s} {'G':>3s} {'L':>6s} {'ratio':>9s} {'rel.err':>9s} {'impact':>9s}  decision"
        lines = [header, "-" * len(header)]
        for s in self.sites:
            lines.append(
                f"{s.site_id:32s} {s.dim:5d} {s.state:3d} {s.groups:3d} {str(s.length):>6s} "
                f"{fmt(s.ratio):>9s} {fmt(s.relative_error):>9s} {fmt(s.impact):>9s}  "
                f"{'REWRITE' if s.rewrite else 'keep   '} ({s.reason})"
            )
        share = self.scan_flops_removed / self.scan_flops if self.scan_flops else 0.0
        lines.append(
            f"{len(self.rewritten)} of {len(self.sites)} scan sites rewritten in {self.graph_count} graph(s); "
            f"estimated scan FLOPs removed: {self.scan_flops_removed:.3g} of {self.scan_flops:.3g} ({share:.1%})"
        )
        return "\n".join(lines)


def _site_reports(plan: RewritePlan, config: VMeanbaConfig) -> list[SiteReport]:
    reports = []
    for site, decision in zip(plan.sites, plan.decisions):
        profile = config.profile
        known = profile is not None and site.site_id in profile.site_ids

        def metric(name: str) -> Optional[float]:
            return profile.metric(site.site_id, name) if known else None

        removed = site.scan_flops * (1 - site.groups / site.dim) if decision.rewrite else 0.0
        reports.append(
            SiteReport(
                site_id=site.site_id, dim=site.dim, state=site.state, groups=site.groups,
                length=site.length, rewrite=decision.rewrite, reason=decision.reason,
                ratio=metric("ratio"), relative_error=metric("relative_error"), impact=metric("impact"),
                scan_flops=site.scan_flops, scan_flops_removed=removed,
            )
        )
    return reports


def explain(model: nn.Module, example_inputs: Any, **options: Any) -> ExplainReport:
    """Report the sites of `model` and which ones `backend="vmeanba"` with `options` rewrites.

    example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments.
    Returns the report (`print(report)` shows the table) and logs it; it prints nothing. The
    model is traced anew with a backend of its own, leaving the process's other compiled code
    alone (`tracing.IsolatedTrace`).
    """
    config = VMeanbaConfig.from_options(options)
    plans: list[RewritePlan] = []

    def capture(gm: torch.fx.GraphModule, _example_inputs) -> Any:
        plans.append(plan_rewrite(canonicalize(gm, config), config))
        return gm.forward

    with fresh_trace(model, capture) as traced, torch.no_grad(), backend_errors_unwrapped():
        call_with_inputs(traced, example_inputs)
    report = ExplainReport([r for p in plans for r in _site_reports(p, config)], graph_count=len(plans))
    traced_ids = list(dict.fromkeys(
        [s.site_id for p in plans for s in p.sites]
        + [i for p in plans for s in p.sites if s.shared for i in s.shared.sibling_ids]
    ))
    unknown = [i for i in config.sites if i not in traced_ids]
    if unknown:  # each graph only refuses ids of unknown modules; here the whole model was seen
        raise unknown_site_ids_error(unknown, traced_ids)
    log.info("explain: %d of %d scan sites rewritten\n%s", len(report.rewritten), len(report.sites), report)
    return report
