"""The VMeanba rewrite: each selected scan site becomes mean -> reduced scan -> expand.

Accepted pattern: a `vmeanba.selective_scan` node (found by scan_sites.py). The node is replaced
by a call to `reduced_selective_scan` with the same arguments plus the site's group count and
the configured modes; the call has the op's exact output structure (y, last_state), so every
user of the old node is rewired unchanged. Unselected sites are not touched at all. All
decisions are made first (select_sites raises before anything changes); mutation comes second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.fx

from .graph_utils import finish_graph, replace_node
from .reduced_scan import reduced_selective_scan
from .scan_sites import ScanSite, scan_sites_in_frame
from .site_identity import current_trace_frame
from .site_selection import SiteDecision, select_sites

log = logging.getLogger("vmeanba_compiler.passes")

# Node meta key set on each reduced-scan node: the site ids it computes (its own, then those of
# module instances sharing its graph), so a check can read what a compilation actually rewrote.
REWRITTEN_SITES_META = "vmeanba_rewritten_sites"


@dataclass(frozen=True)
class RewritePlan:
    sites: list[ScanSite]
    decisions: list[SiteDecision]

    @property
    def rewritten(self) -> list[ScanSite]:
        return [s for s, d in zip(self.sites, self.decisions) if d.rewrite]


def plan_rewrite(gm: torch.fx.GraphModule, config) -> RewritePlan:
    """Find the graph's sites and decide each one; changes nothing to the graph.

    Inside a Dynamo backend the graph may be one part of the model (graph breaks), so a named site
    is only refused here when its module is not in the model; `explain` checks full ids over all
    graphs."""
    frame = current_trace_frame()
    sites = scan_sites_in_frame(gm, frame)
    owners = None if frame is None or frame.root is None else set(frame.paths.values())
    return RewritePlan(sites, select_sites(sites, config, owners))


def _replace(gm: torch.fx.GraphModule, site: ScanSite, config) -> None:
    node = site.node
    kwargs = {**node.kwargs, "groups": site.groups, "dt_mode": config.dt_mode, "skip_mode": config.skip_mode}
    reduced = replace_node(gm.graph, node, "call_function", reduced_selective_scan, node.args, kwargs)
    reduced.meta[REWRITTEN_SITES_META] = (site.site_id, *(site.shared.sibling_ids if site.shared else ()))


def vmeanba_rewrite(gm: torch.fx.GraphModule, config) -> torch.fx.GraphModule:
    plan = plan_rewrite(gm, config)
    for site, decision in zip(plan.sites, plan.decisions):
        log.debug("site %s: %s (%s)", site.site_id, "rewrite" if decision.rewrite else "keep", decision.reason)
    for site in plan.rewritten:
        _replace(gm, site, config)
    if plan.rewritten:
        finish_graph(gm)
    if plan.sites:
        log.info(
            "vmeanba: rewrote %d of %d scan sites: %s",
            len(plan.rewritten), len(plan.sites), ", ".join(s.site_id for s in plan.rewritten) or "none",
        )
    return gm
