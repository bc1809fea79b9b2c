"""Orders in which sites are offered for reduction: by impact, by variance ratio, or at random.

"impact" (docs/DESIGN.md section 3's layer-impact score, lowest first) and "ratio" (channel
variance / mean square, lowest first: the paper's observation taken literally) come from a
calibration profile; "random" is the control that tells whether either carries information.
"""

from __future__ import annotations

import random

from .profile import Profile

RANKINGS = ("impact", "ratio", "random")


def rank_sites(profile: Profile, by: str, seed: int = 0) -> list[str]:
    """The profile's site ids, the site to reduce first first; ties break by id."""
    if by not in RANKINGS:
        raise ValueError(f"unknown ranking {by!r}; choose one of {RANKINGS}")
    sites = profile.site_ids
    if by == "random":
        random.Random(seed).shuffle(sites)
        return sites
    scores = {site: profile.metric(site, by) for site in sites}
    if missing := [site for site, score in scores.items() if score is None]:
        raise ValueError(f"ranking by {by} needs the profile's {by} score, which is missing for "
                         f"{', '.join(missing)}: calibrate with impact=True")
    return sorted(sites, key=lambda site: (scores[site], site))
