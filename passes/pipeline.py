"""The pass manager: an ordered list of graph passes, each `(gm, config) -> gm`.

Passes run on the Dynamo-level FX graph, before AOT autograd splits forward and backward, so a
rewrite applies to training and inference alike (FEASIBILITY.md, "Into Inductor"). The list is
empty until the VMeanba rewrite lands; the backend already runs it so the order of stages is
fixed: passes -> Inductor.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.fx

log = logging.getLogger("vmeanba_compiler.passes")

GraphPass = Callable[[torch.fx.GraphModule, "object"], torch.fx.GraphModule]

PASSES: list[tuple[str, GraphPass]] = []


def run_passes(gm: torch.fx.GraphModule, config: object) -> torch.fx.GraphModule:
    """Apply every registered pass in order, logging each one's effect on the graph size."""
    for name, graph_pass in PASSES:
        before = len(gm.graph.nodes)
        gm = graph_pass(gm, config)
        gm.graph.lint()
        gm.recompile()
        log.debug("pass %s: %d -> %d nodes", name, before, len(gm.graph.nodes))
    return gm
