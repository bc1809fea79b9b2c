"""Tables for the terminal and for markdown: one formatter, so the CLI and docs/RESULTS.md agree."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .evaluation import AccuracyCurve
from .profile import Profile
from .rankings import rank_sites


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """Columns padded to their widest cell (text left, numbers right); `markdown` adds pipes and
    the header rule GitHub renders. Cells are printed with str()."""
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"table row {row} has {len(row)} cells for {len(headers)} headers")
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:
        separator = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2)
                                   for w, num in zip(widths, numeric)) + "|"
    else:
        separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), separator, *(line(r) for r in cells)])


def _is_numeric(text: str) -> bool:
    """Numbers, percentages ("12.5%"), ratios ("1.05x") and "-" (missing) align right."""
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return text == "-"
    return True


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def site_table(profile: Profile, selected: Optional[Sequence[str]] = None, *, markdown: bool = False) -> str:
    """One row per site: variance ratio, relative error of the reduced scan, impact, and the
    rank of each site under both rankings (1 = reduced first); with `selected`, a column saying
    whether the site is among them."""
    by_impact = _ranks(profile, "impact")
    by_ratio = _ranks(profile, "ratio")
    rows = [
        [s, _fmt(profile.metric(s, "ratio")), _fmt(profile.metric(s, "relative_error")),
         _fmt(profile.metric(s, "impact")), by_impact.get(s, "-"), by_ratio[s],
         *(["yes" if s in selected else "no"] if selected is not None else [])]
        for s in profile.site_ids
    ]
    headers = ["site", "var/meansq", "rel. error", "impact", "impact rank", "ratio rank"]
    return format_table(headers + (["selected"] if selected is not None else []), rows, markdown=markdown)


def _ranks(profile: Profile, by: str) -> dict[str, int]:
    try:
        return {site: i + 1 for i, site in enumerate(rank_sites(profile, by))}
    except ValueError:  # impact not measured
        return {}


def curve_table(curves: Sequence[AccuracyCurve], *, markdown: bool = False) -> str:
    """Accuracy after reducing K sites, one column per ranking (random: mean [min-max])."""
    headers = ["K", *(c.ranking if c.spread is None else f"{c.ranking} (mean [min-max] of {len(c.orders)})"
                      for c in curves)]
    rows = []
    for k in range(len(curves[0].accuracies)):
        row: list[Any] = [k]
        for c in curves:
            cell = f"{c.accuracies[k]:.2%}"
            if c.spread is not None:
                low, high = c.spread[k]
                cell += f" [{low:.2%}-{high:.2%}]"
            row.append(cell)
        rows.append(row)
    return format_table(headers, rows, markdown=markdown)
