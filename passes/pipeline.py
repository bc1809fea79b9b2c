"""The pass manager: an ordered list of graph passes, each `(gm, config) -> gm`.

Passes run on the Dynamo-level FX graph, before AOT autograd splits forward and backward, so a
rewrite applies to training and inference alike (FEASIBILITY.md, "Into Inductor"). Order:
site discovery and selection, then the rewrite (vmeanba_rewrite.py), then Inductor.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.fx

from .vmeanba_rewrite import vmeanba_rewrite

log = logging.getLogger("vmeanba_compiler.passes")

GraphPass = Callable[[torch.fx.GraphModule, "object"], torch.fx.GraphModule]

PASSES: list[tuple[str, GraphPass]] = [("vmeanba_rewrite", vmeanba_rewrite)]


def run_passes(gm: torch.fx.GraphModule, config: object) -> torch.fx.GraphModule:
    """Apply every registered pass in order, logging each one's effect on the graph size."""
    for name, graph_pass in PASSES:
        before = len(gm.graph.nodes)
        gm = graph_pass(gm, config)
        gm.graph.lint()
        gm.recompile()
        log.debug("pass %s: %d -> %d nodes", name, before, len(gm.graph.nodes))
    return gm
