"""User model code calling third-party scans (tests only).

The imports bind the functions at this module's level (`from ... import ...`), the case that
patching the defining module's attribute would miss.
"""

from __future__ import annotations

import torch
from torch import nn

from csms6s import selective_scan_fn as csms6s_selective_scan_fn
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref


class _ScanBlock(nn.Module):
    """Projects x (batch, dim, L) to the scan's inputs; the scan itself is left to subclasses."""

    def __init__(self, dim: int = 8, state: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.groups, self.state = groups, state
        self.in_proj = nn.Conv1d(dim, 2 * dim + 2 * groups * state, 1)
        self.A_log = nn.Parameter(torch.linspace(-1.0, 1.0, dim * state).reshape(dim, state))
        self.D = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.delta_bias = nn.Parameter(torch.linspace(-2.0, -0.5, dim))

    def project(self, x):
        batch, dim, length = x.shape
        gn = self.groups * self.state
        u, delta, B, C = self.in_proj(x).split([dim, dim, gn, gn], dim=1)
        B = B.reshape(batch, self.groups, self.state, length)
        C = C.reshape(batch, self.groups, self.state, length)
        return u, delta, -torch.exp(self.A_log), B, C


class MambaFnBlock(_ScanBlock):
    """Calls mamba_ssm's `selective_scan_fn` twice (one with the last state)."""

    def forward(self, x):
        u, delta, A, B, C = self.project(x)
        y, last_state = selective_scan_fn(u, delta, A, B, C, self.D, u, self.delta_bias,
                                          delta_softplus=True, return_last_state=True)
        y2 = selective_scan_fn(y, delta, A, B, C, D=self.D, delta_bias=self.delta_bias,
                               delta_softplus=True)
        return y2, last_state


class MambaRefBlock(_ScanBlock):
    """Calls mamba_ssm's `selective_scan_ref` with shared B/C and no D."""

    def forward(self, x):
        u, delta, A, B, C = self.project(x)
        return selective_scan_ref(u, delta, A, B[:, 0], C[:, 0], None, None, self.delta_bias, True)


class Csms6sBlock(_ScanBlock):
    """Calls VMamba's csms6s `selective_scan_fn` positionally, in its own argument order."""

    def __init__(self, *args, oflex: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.oflex = oflex

    def forward(self, x):
        u, delta, A, B, C = self.project(x)
        return csms6s_selective_scan_fn(u, delta, A, B, C, self.D, self.delta_bias, True, self.oflex, None)
