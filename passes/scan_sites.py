"""Find the selective-scan sites of a Dynamo FX graph and give each a stable id.

A site id is "<module path>:<call index>": the path of the innermost module whose code made the
call, written as in `model.named_modules()`, and the index of that scan call among the module's
scan calls (site_identity.py says how both survive graph breaks). Both come from the user's model,
not from the graph, so ids are identical across runs, recompiles, batch sizes and graph splits.
Two nodes share an id only when they are the same call of the same module's code (the module
called twice); if such nodes disagree on the site's sizes, that is an error, never a merge.

Matched: `torch.ops.vmeanba.selective_scan` nodes. Anything else is left alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx

from .. import ops  # noqa: F401  (defines torch.ops.vmeanba.selective_scan)
from ..scan_schema import ProjectionForm, validate_scan_args
from .graph_utils import meta_value, normalize_module_path
from .site_identity import (
    SharedGraph,
    SiteIdCollisionError,
    SiteNamer,
    TraceFrame,
    current_trace_frame,
    shared_graph,
    specialize_on_frame_module,
)

log = logging.getLogger("vmeanba_compiler.passes")

_SCAN_OP = torch.ops.vmeanba.selective_scan
SCAN_TARGETS = (_SCAN_OP, _SCAN_OP.default)
SCAN_ARG_NAMES = tuple(a.name for a in _SCAN_OP.default._schema.arguments)

__all__ = ["ScanSite", "SiteIdCollisionError", "find_scan_sites", "normalize_module_path", "scan_arguments", "scan_sites_in_frame"]


@dataclass(frozen=True)
class ScanSite:
    """One scan call in a graph, with the sizes the rewrite and the profile need."""

    site_id: str
    module_path: str
    call_index: int
    dim: int
    state: int
    groups: int  # channels are averaged within each of these groups
    b_form: str
    c_form: str
    has_D: bool
    has_z: bool
    batch: Any  # int or SymInt: informational only (a profile is shape-independent)
    length: Any
    node: torch.fx.Node = field(compare=False, repr=False)
    # set when Dynamo runs this site's compiled graph for other module instances too
    shared: Optional[SharedGraph] = field(default=None, compare=False)

    @property
    def scan_flops(self) -> float:
        """Rough FLOPs of the full scan: ~7 per state update (exp, 3 mul, add, C mul-add)."""
        return 7.0 * _as_float(self.batch) * self.dim * _as_float(self.length) * self.state


def _as_float(size: Any) -> float:
    try:
        return float(size)
    except (TypeError, ValueError):
        return float("nan")


def scan_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments bound to the op's parameter names (defaults filled in)."""
    bound = dict(zip(SCAN_ARG_NAMES, node.args))
    bound.update(node.kwargs)
    for arg in _SCAN_OP.default._schema.arguments:
        if arg.name not in bound:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def reduction_groups(b_form: ProjectionForm, b_groups: int, c_form: ProjectionForm, c_groups: int, dim: int) -> int:
    """Groups whose channels share B and C rows: the lcm of the grouped projections' G (1 if none)."""
    groups = 1
    for form, g in ((b_form, b_groups), (c_form, c_groups)):
        if form is ProjectionForm.GROUPED:
            groups = groups * g // math.gcd(groups, g)
    return groups


def _static(size: Any) -> int:
    """A channel, state or group count as a plain int. These decide the rewrite's reduction and
    must match the profile, so a symbolic one (Dynamo marks a size dynamic after seeing two values
    in one code object, e.g. modules of different widths behind a graph break) is specialised:
    `int()` of a SymInt adds a guard, and another width compiles its own graph."""
    return int(size)


def _sizes_key(site: ScanSite) -> tuple:
    return (site.dim, site.state, site.groups, site.b_form, site.c_form, site.has_D, site.has_z)


def _check_no_collision(sites: list[ScanSite]) -> None:
    """Nodes sharing an id (one module called twice) must be the same kind of scan."""
    first: dict[str, ScanSite] = {}
    for site in sites:
        seen = first.setdefault(site.site_id, site)
        if _sizes_key(seen) != _sizes_key(site):
            raise SiteIdCollisionError(
                f"scan nodes {seen.node.name} and {site.node.name} both map to site id {site.site_id!r} but "
                f"differ (dim/N/groups/B/C/D/z {_sizes_key(seen)} vs {_sizes_key(site)}); their statistics "
                "must not be merged. Give each scan its own module (or call site), or report this with "
                "the model code"
            )


def find_scan_sites(gm: torch.fx.GraphModule) -> list[ScanSite]:
    """Every `vmeanba.selective_scan` node of the graph, in graph order, with its stable id.

    Called while Dynamo compiles a graph (a backend), it names sites after their owners in the
    compiled model and makes Dynamo specialise a module frame's graph on that module instance
    (site_identity.py); on any other FX graph ids come from the nodes' `nn_module_stack`.
    """
    return scan_sites_in_frame(gm, current_trace_frame())


def scan_sites_in_frame(gm: torch.fx.GraphModule, frame: Optional[TraceFrame]) -> list[ScanSite]:
    """`find_scan_sites` for a caller that already holds the trace frame (building one walks the
    Python stack and the root's modules), e.g. the rewrite, which also needs its module paths."""
    namer = SiteNamer(frame)
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SCAN_TARGETS:
            continue
        bound = scan_arguments(node)
        values = {k: meta_value(v, constants=True) for k, v in bound.items()}
        # Not strict on dtypes: inside an autocast region u and delta may differ (ops.py's
        # autocast rule reconciles them when the graph runs, and the rewrite computes in float32).
        shape = validate_scan_args(
            *(values[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), strict_dtypes=False
        )
        owner, index = namer.name(node)
        sites.append(
            ScanSite(
                site_id=f"{owner.path}:{index}",
                module_path=owner.path,
                call_index=index,
                dim=_static(shape.dim),
                state=_static(shape.state),
                groups=_static(reduction_groups(shape.b_form, shape.b_groups, shape.c_form, shape.c_groups,
                                                shape.dim)),
                b_form=shape.b_form.value,
                c_form=shape.c_form.value,
                has_D=bound["D"] is not None,
                has_z=bound["z"] is not None,
                batch=shape.batch,
                length=shape.length,
                node=node,
                shared=shared_graph(frame, owner.path, index),
            )
        )
        site = sites[-1]
        log.debug("matched scan site %s: dim=%d N=%d groups=%d B=%s C=%s D=%s z=%s batch=%s L=%s", site.site_id,
                  site.dim, site.state, site.groups, site.b_form, site.c_form, site.has_D, site.has_z,
                  site.batch, site.length)
    _check_no_collision(sites)
    if sites and frame is not None and frame.guarded:
        specialize_on_frame_module()
    return sites
