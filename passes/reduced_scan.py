"""What a rewritten site computes: docs/DESIGN.md section 2, mean -> reduced scan -> expand.

    T(x)      = mean of x over the channels of each group        (batch, G*d, L) -> (batch, G, L)
    y_reduced = selective_scan(T(u), T(dt), T(A), B, C, ...)     one channel per group
    y         = T^-1(y_reduced), broadcast back to every channel

Two choices are configurable (their names and defaults: vmeanba_compiler/rewrite_modes.py):
- dt_mode "effective" averages the step size actually used, softplus(delta + delta_bias);
  "raw" averages delta and delta_bias and applies softplus after the mean.
- skip_mode "exact" keeps the D*u skip and the silu(z) gate per channel (cheap elementwise work,
  outside the reduced scan); "mean" averages D and z too, so they run inside the reduced scan.
Both choices are exact when a group's channels are identical.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rewrite_modes import DEFAULT_DT_MODE, DEFAULT_SKIP_MODE, DT_MODES, SKIP_MODES

__all__ = ["DT_MODES", "SKIP_MODES", "group_mean", "reduced_selective_scan"]


def group_mean(x: Tensor, groups: int, dim: int) -> Tensor:
    """Mean over the channels of each of `groups` equal, contiguous channel groups along `dim`."""
    return x.unflatten(dim, (groups, x.shape[dim] // groups)).mean(dim + 1)


def _expand(x: Tensor, channels: int) -> Tensor:
    """T^-1: repeat each group's row for every channel of the group, along dim 1 (contiguous)."""
    return x.repeat_interleave(channels // x.shape[1], dim=1)


def _reduce_projection(p: Tensor, groups: int) -> Tensor:
    """Fixed (dim, N) rows are averaged per group; variable B/C already have one row per group."""
    return group_mean(p, groups, 0) if p.dim() == 2 else p


def reduced_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    *,
    groups: int,
    dt_mode: str = DEFAULT_DT_MODE,
    skip_mode: str = DEFAULT_SKIP_MODE,
) -> tuple[Tensor, Tensor]:
    """Same signature, shapes and dtypes as `vmeanba.selective_scan`, one scan channel per group.

    The modes are plain strings (not an object) because this function is called from FX graphs,
    whose generated code must be able to spell every argument.
    """
    if dt_mode not in DT_MODES or skip_mode not in SKIP_MODES:
        raise ValueError(f"dt_mode must be one of {DT_MODES} and skip_mode one of {SKIP_MODES}, "
                         f"got {dt_mode!r}, {skip_mode!r}")
    math = torch.float64 if u.dtype == torch.float64 else torch.float32
    channels = u.shape[1]
    if dt_mode == "effective":
        dt = delta.to(math)
        if delta_bias is not None:
            dt = dt + delta_bias.to(math)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        dt_r, bias_r, softplus_r = group_mean(dt, groups, 1), None, False
    else:
        bias_r = None if delta_bias is None else group_mean(delta_bias.to(math), groups, 0)
        dt_r, softplus_r = group_mean(delta.to(math), groups, 1), delta_softplus
    u_r = group_mean(u.to(math), groups, 1)
    A_r = group_mean(A.to(math), groups, 0)
    B_r, C_r = _reduce_projection(B, groups), _reduce_projection(C, groups)

    if skip_mode == "mean":
        D_r = None if D is None else group_mean(D.to(math), groups, 0)
        z_r = None if z is None else group_mean(z.to(math), groups, 1)
        y_r, h_r = torch.ops.vmeanba.selective_scan(u_r, dt_r, A_r, B_r, C_r, D_r, z_r, bias_r, softplus_r)
        y = _expand(y_r, channels)
    else:
        y_r, h_r = torch.ops.vmeanba.selective_scan(u_r, dt_r, A_r, B_r, C_r, None, None, bias_r, softplus_r)
        y = _expand(y_r, channels)
        if D is not None:
            y = y + D.to(math)[:, None] * u.to(math)
        if z is not None:
            y = y * F.silu(z.to(math))
    return y.to(u.dtype), _expand(h_r, channels)
