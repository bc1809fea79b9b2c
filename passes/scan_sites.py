"""Find the selective-scan sites of a Dynamo FX graph and give each a stable id.

A site id is "<module path>:<call index>": the path of the innermost module whose forward made
the call (from the node's `nn_module_stack`, written as in `model.named_modules()`), and the
number of scan calls that module's forward made before it. Both come from the user's model, not
from the graph, so ids are identical across runs, recompiles and batch sizes.

Matched: `torch.ops.vmeanba.selective_scan` nodes. Anything else is left alone.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .. import ops  # noqa: F401  (defines torch.ops.vmeanba.selective_scan)
from ..lowering.scan_args import ProjectionForm, validate_scan_args

log = logging.getLogger("vmeanba_compiler.passes")

_SCAN_OP = torch.ops.vmeanba.selective_scan
SCAN_TARGETS = (_SCAN_OP, _SCAN_OP.default)
SCAN_ARG_NAMES = tuple(a.name for a in _SCAN_OP.default._schema.arguments)

_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]\.?")
_SUBSCRIPT = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def normalize_module_path(raw: str) -> str:
    """"L['self'].stages[0]._modules['1'].op" -> "stages.0.1.op" (as in named_modules())."""
    path = _ROOT.sub("", raw)
    path = _SUBSCRIPT.sub(r".\1", path).replace("._modules.", ".")
    return path.strip(".")


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


def _meta_value(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def reduction_groups(b_form: ProjectionForm, b_groups: int, c_form: ProjectionForm, c_groups: int, dim: int) -> int:
    """Groups whose channels share B and C rows: the lcm of the grouped projections' G (1 if none)."""
    groups = 1
    for form, g in ((b_form, b_groups), (c_form, c_groups)):
        if form is ProjectionForm.GROUPED:
            groups = groups * g // math.gcd(groups, g)
    return groups


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw_path = list(stack.values())[-1][0]
    return normalize_module_path(raw_path)


def find_scan_sites(gm: torch.fx.GraphModule) -> list[ScanSite]:
    """Every `vmeanba.selective_scan` node of the graph, in graph order, with its stable id."""
    sites = []
    calls_per_module: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SCAN_TARGETS:
            continue
        bound = scan_arguments(node)
        values = {k: _meta_value(v) for k, v in bound.items()}
        # Not strict on dtypes: inside an autocast region u and delta may differ (ops.py's
        # autocast rule reconciles them when the graph runs, and the rewrite computes in float32).
        shape = validate_scan_args(
            *(values[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), strict_dtypes=False
        )
        module_path = _module_path(node)
        index = calls_per_module.get(module_path, 0)
        calls_per_module[module_path] = index + 1
        sites.append(
            ScanSite(
                site_id=f"{module_path}:{index}",
                module_path=module_path,
                call_index=index,
                dim=shape.dim,
                state=shape.state,
                groups=reduction_groups(shape.b_form, shape.b_groups, shape.c_form, shape.c_groups, shape.dim),
                b_form=shape.b_form.value,
                c_form=shape.c_form.value,
                has_D=bound["D"] is not None,
                has_z=bound["z"] is not None,
                batch=shape.batch,
                length=shape.length,
                node=node,
            )
        )
        site = sites[-1]
        log.debug("matched scan site %s: dim=%d N=%d groups=%d B=%s C=%s D=%s z=%s batch=%s L=%s", site.site_id,
                  site.dim, site.state, site.groups, site.b_form, site.c_form, site.has_D, site.has_z,
                  site.batch, site.length)
    return sites
