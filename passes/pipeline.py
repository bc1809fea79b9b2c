"""The pass manager: ordered graph passes, each `(gm, config) -> gm`.

A pass that changes the graph finishes it itself (graph_utils.finish_graph: lint, recompile), so
it can also be run alone; the manager does not repeat that.

Passes run on the Dynamo-level FX graph, before AOT autograd splits forward and backward, so a
rewrite applies to training and inference alike. Two stages:

1. canonicalisation (`CANONICALIZE`): scans written in other forms become
   `vmeanba.selective_scan` nodes (lower_associative_scan.py). Every consumer of site ids (the
   backend, `calibrate`, `explain`) runs this stage, so all of them see the same sites.
2. the VMeanba rewrite (vmeanba_rewrite.py): site discovery, selection, mean -> reduced scan ->
   expand. Then the backend hands the graph to Inductor.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch.fx

from .lower_associative_scan import lower_associative_scan
from .vmeanba_rewrite import vmeanba_rewrite

log = logging.getLogger("vmeanba_compiler.passes")

GraphPass = Callable[[torch.fx.GraphModule, "object"], torch.fx.GraphModule]

CANONICALIZE: list[tuple[str, GraphPass]] = [("lower_associative_scan", lower_associative_scan)]
PASSES: list[tuple[str, GraphPass]] = [*CANONICALIZE, ("vmeanba_rewrite", vmeanba_rewrite)]


def _apply(gm: torch.fx.GraphModule, config: object, passes: Sequence[tuple[str, GraphPass]]) -> torch.fx.GraphModule:
    for name, graph_pass in passes:
        before = len(gm.graph.nodes)
        gm = graph_pass(gm, config)
        log.debug("pass %s: %d -> %d nodes", name, before, len(gm.graph.nodes))
    return gm


def canonicalize(gm: torch.fx.GraphModule, config: object = None) -> torch.fx.GraphModule:
    """Stage 1 only: turn every recognised scan into a `vmeanba.selective_scan` node."""
    return _apply(gm, config, CANONICALIZE)


def run_passes(gm: torch.fx.GraphModule, config: object) -> torch.fx.GraphModule:
    """Every pass in order, logging each one's effect on the graph size."""
    return _apply(gm, config, PASSES)
