"""For tests that compile: a `vmeanba` backend that counts its compilations, and a model with
exactly one scan site.

Dynamo calls the backend once per graph it compiles, so the number of calls for one compiled
function is 1 + its number of recompiles. The graphs are kept (after the VMeanba passes ran on
them) so tests can also check what the rewrite did and which sizes stayed symbolic.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import nn

import vmeanba_compiler as vc
from vmeanba_compiler.backend import vmeanba_backend


class CountingBackend:
    """`torch.compile(model, backend=CountingBackend(**options))` ~ `backend="vmeanba", options=options`."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        self.graphs.append(gm)
        return vmeanba_backend(gm, example_inputs, options=self.options)

    @property
    def compiles(self) -> int:
        return len(self.graphs)


class _Scan(nn.Module):
    def __init__(self, delta_softplus: bool, return_last_state: bool) -> None:
        super().__init__()
        self.delta_softplus, self.return_last_state = delta_softplus, return_last_state

    def forward(self, *args: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return vc.selective_scan(*args, delta_softplus=self.delta_softplus, return_last_state=self.return_last_state)


class OneScan(nn.Module):
    """forward(u, delta, A, B, C, D, z, delta_bias) = the scan, at site id "scan:0"."""

    SITE = "scan:0"

    def __init__(self, delta_softplus: bool, return_last_state: bool = False) -> None:
        super().__init__()
        self.scan = _Scan(delta_softplus, return_last_state)

    def forward(self, *args: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.scan(*args)
