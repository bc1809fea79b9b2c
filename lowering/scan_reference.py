"""The plain sequential selective scan: the oracle every other implementation is tested against.

It is written to be read next to docs/DESIGN.md section 1, one time step at a time, and is slow on
purpose (a Python loop over L). Math runs in float32, or float64 when `u` is float64.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..scan_schema import compute_dtype_for, per_channel, validate_scan_args


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (y, h_L): y of shape (batch, dim, L) in u's dtype, h_L (batch, dim, N) in the math dtype."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    math = compute_dtype_for(u)
    u_, dt, A_ = u.to(math), delta.to(math), A.to(math)
    if delta_bias is not None:
        dt = dt + delta_bias.to(math)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B_ = per_channel(B.to(math), shape, shape.b_form)  # (batch|1, dim, N, L|1)
    C_ = per_channel(C.to(math), shape, shape.c_form)

    h = u_.new_zeros(shape.batch, shape.dim, shape.state)
    ys = []
    for t in range(shape.length):
        dt_t = dt[:, :, t, None]  # (batch, dim, 1)
        B_t = B_[..., min(t, B_.shape[-1] - 1)]  # fixed B has no time axis
        C_t = C_[..., min(t, C_.shape[-1] - 1)]
        h = torch.exp(dt_t * A_) * h + dt_t * B_t * u_[:, :, t, None]
        ys.append((C_t * h).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(math)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(math))
    return y.to(u.dtype), h
