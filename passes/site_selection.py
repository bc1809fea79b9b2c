"""Decide which scan sites to rewrite: explicit ids, a threshold on a profile metric, or top-K.

Selection ("is it worth it?") is kept apart from matching ("is it legal?", scan_sites.py): it
only reads the traced sites and the configuration and returns one decision per site, with the
reason in words, which `explain` prints and the rewrite pass acts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Optional, Sequence

from ..profile import SiteSignature
from .scan_sites import ScanSite


@dataclass(frozen=True)
class SiteDecision:
    site_id: str
    rewrite: bool
    reason: str


def site_signature(site: ScanSite) -> SiteSignature:
    """What a profile must agree on with a traced site (not batch or L: profiles are shape-free)."""
    return SiteSignature(
        dim=site.dim, state=site.state, groups=site.groups, b_form=site.b_form,
        c_form=site.c_form, has_D=site.has_D, has_z=site.has_z,
    )


def unknown_site_ids_error(unknown: Sequence[str], known: Sequence[str]) -> ValueError:
    return ValueError(
        f"vmeanba option 'sites' names unknown site id(s) {', '.join(map(repr, unknown))}; "
        f"the traced model has: {', '.join(known) or '(no scan sites)'}"
    )


def _owner(site_id: str) -> str:
    return site_id.rpartition(":")[0]


def select_sites(
    sites: Sequence[ScanSite], config, model_owners: Optional[Collection[str]] = None
) -> list[SiteDecision]:
    """One decision per traced site, in graph order; raises on ids or profiles that do not fit.

    model_owners: when the graph is one part of a model that graph breaks split (a Dynamo
    backend sees one graph at a time), the module paths of the whole model; a named site is then
    refused only if its module is not one of them (its scan may sit in another graph; ids owned
    by a code location cannot be checked this way). None means the graph is the whole model:
    every named site must be in it.

    A site whose compiled graph Dynamo also runs for other module instances (`ScanSite.shared`)
    must be decided like the same call in those instances; otherwise the selection is refused.
    """
    profile = config.profile
    if profile is not None:
        profile.check_compatible({s.site_id: site_signature(s) for s in sites}, partial=True)
    traced = [s.site_id for s in sites]
    runs_here = traced + [i for s in sites if s.shared for i in s.shared.sibling_ids]
    if config.sites:
        unknown = [i for i in config.sites if i not in runs_here]
        if model_owners is not None:
            # Owners written as code locations ("<file.function>") belong to frames without a
            # module and cannot be checked against the model's modules.
            owners = set(model_owners) | {_owner(i) for i in traced}
            unknown = [i for i in unknown if _owner(i) not in owners and not i.startswith("<")]
        if unknown:
            raise unknown_site_ids_error(unknown, traced)
    decide = _decider(config)
    decisions = []
    for site in sites:
        decision = decide(site.site_id)
        if site.shared:
            _check_alike(decision, [decide(i) for i in site.shared.sibling_ids if _decidable(i, config)])
        decisions.append(decision)
    return decisions


def _decidable(site_id: str, config) -> bool:
    """Named sites are decided by name; a profile-driven selection only knows calibrated sites."""
    return bool(config.sites) or config.profile is None or site_id in config.profile.stats


def _decider(config) -> Callable[[str], SiteDecision]:
    """The decision for one site id under the configuration's selection."""
    if config.sites:
        return lambda i: SiteDecision(i, i in config.sites,
                                      "named in sites" if i in config.sites else "not named in sites")
    if config.threshold is not None:
        def below_threshold(site_id: str) -> SiteDecision:
            value = config.profile.metric(site_id, config.metric)
            below = value <= config.threshold
            relation = "<=" if below else ">"
            return SiteDecision(site_id, below,
                                f"{config.metric} {value:.4g} {relation} threshold {config.threshold:.4g}")
        return below_threshold
    if config.top_k is not None:
        chosen = _lowest_impact(config.profile, config.top_k)
        return lambda i: SiteDecision(
            i, i in chosen,
            f"impact rank {chosen[i]} of top_k={config.top_k}" if i in chosen
            else f"impact not among the {config.top_k} lowest",
        )
    return lambda i: SiteDecision(i, False, "no sites, threshold or top_k given")


def _check_alike(decision: SiteDecision, siblings: list[SiteDecision]) -> None:
    differing = [d for d in siblings if d.rewrite != decision.rewrite]
    if differing:
        rewritten = [d.site_id for d in [decision, *siblings] if d.rewrite]
        kept = [d.site_id for d in [decision, *siblings] if not d.rewrite]
        raise ValueError(
            f"the selection rewrites {', '.join(rewritten)} but keeps {', '.join(kept)}, and these sites run "
            "one compiled graph: a graph break in their module's code leaves a resume function that no "
            "longer uses `self`, so Dynamo compiles it once for every instance. Select all of them or "
            "none, or move the graph break (or use `self` after it) so each instance gets its own graph"
        )


def _lowest_impact(profile, k: int) -> dict[str, int]:
    """The k profile sites of lowest impact score (ties by id), mapped to their 1-based rank."""
    scores: dict[str, Optional[float]] = {i: profile.metric(i, "impact") for i in profile.site_ids}
    missing = [i for i, score in scores.items() if score is None]
    if missing:
        raise ValueError(
            "vmeanba option 'top_k' ranks sites by layer impact, but the profile has no impact "
            f"score for {', '.join(missing)}; calibrate with impact=True"
        )
    ranked = sorted(scores, key=lambda i: (scores[i], i))[:k]
    return {site_id: rank + 1 for rank, site_id in enumerate(ranked)}
