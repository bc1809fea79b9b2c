"""FX graph helpers shared by every pass (and by calibration, which instruments the same nodes).

One definition each of: the value Dynamo recorded for a node, the module path a node was traced
in, replacing a scan node by another call with the same outputs, and finishing a changed graph
(lint + recompile, run once per pass by the pass manager, pipeline.py).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch.fx
from torch.fx import Node

_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]\.?")
_SUBSCRIPT = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")

__all__ = ["finish_graph", "innermost_module", "meta_value", "module_path", "normalize_module_path", "replace_node"]


def meta_value(arg: Any, *, constants: bool = False) -> Any:
    """The value Dynamo recorded for a node (meta "example_value", else "val": a FakeTensor, a SymInt...).

    An argument that is not a node is a constant: returned as it is with `constants=True` (reading a
    call's arguments), else None (asking whether something is a traced tensor)."""
    if isinstance(arg, Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg if constants else None


def normalize_module_path(raw: str) -> str:
    """"L['self'].stages[0]._modules['1'].op" -> "stages.0.1.op" (as in named_modules())."""
    path = _ROOT.sub("", raw)
    path = _SUBSCRIPT.sub(r".\1", path).replace("._modules.", ".")
    return path.strip(".")


def innermost_module(node: Node) -> Optional[tuple[str, str]]:
    """(nn_module_stack key, source expression) of the innermost module a node was traced in, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, (source, _) = list(stack.items())[-1]
    return key, source


def module_path(node: Node) -> str:
    """The innermost module's path relative to the traced frame ("" outside any module)."""
    innermost = innermost_module(node)
    return normalize_module_path(innermost[1]) if innermost else ""


def replace_node(graph: torch.fx.Graph, node: Node, op: str, target: Any, args: tuple, kwargs: dict) -> Node:
    """Insert `op(target, *args, **kwargs)` where `node` is, with its meta, rewire every user, erase `node`.

    The new call must return what `node` returned (same structure), so users need no change.
    `op` is "call_function" or "call_module"."""
    with graph.inserting_before(node):
        new = graph.create_node(op, target, tuple(args), dict(kwargs))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def finish_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Check a changed graph and regenerate the module's code from it."""
    gm.graph.lint()
    gm.recompile()
    return gm
