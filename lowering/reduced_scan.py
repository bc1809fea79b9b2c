"""A reduced scan site (docs/DESIGN.md section 2) written as a composition of the full scan.

    M(x)      = mean of x over the channels of each group        (batch, G*d, L) -> (batch, G, L)
    y_reduced = selective_scan(M(u), M(dt), M(A), B', C', ...)   one channel per group
    y         = each group's row of y_reduced given to its d channels, then D*u and silu(z)

This is the readable definition the fused kernels (`reduced_scan_cpu.c`, `vmeanba_triton.py`) are
tested against: `reduced_scan_reference` runs it on the plain reference loop. The same composition
with the fast scan op is the portable kernel of `vmeanba::reduced_selective_scan`, and
`reduced_scan_backward` (the chain rule through the means, the broadcast, the skip and the gate,
around the full scan's backward op) is the backward of every device. The scan is passed in as a
callable because the op layer sits above this one (docs/ARCHITECTURE.md).

Modes (names and defaults: `vmeanba_compiler/rewrite_modes.py`):
- dt_mode "effective" averages the step actually used, softplus(delta + delta_bias), and scans
  the mean without bias or softplus; "raw" averages delta and delta_bias and applies softplus
  after the mean.
- skip_mode "exact" keeps D*u and silu(z) per channel, outside the reduced scan; "mean" averages
  D and z too and lets the reduced scan apply them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rewrite_modes import DT_MODES, SKIP_MODES
from ..scan_schema import ProjectionForm, ScanShape, compute_dtype_for, validate_scan_args
from .scan_reference import selective_scan_reference

SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default: the identity above it

ScanFn = Callable[..., tuple[Tensor, Tensor]]
ScanBackwardFn = Callable[..., list[Tensor]]


def check_reduction(shape: ScanShape, groups: int, dt_mode: str, skip_mode: str) -> None:
    """Refuse a group count or mode the reduced scan cannot run, naming the problem and the fix.

    A reduced channel must be a whole group of channels that reads a single B/C group, so `groups`
    must divide the channel count and be a multiple of every grouped projection's group count.
    """
    if dt_mode not in DT_MODES or skip_mode not in SKIP_MODES:
        raise ValueError(f"reduced_selective_scan: dt_mode must be one of {DT_MODES} and skip_mode one of "
                         f"{SKIP_MODES}, got {dt_mode!r}, {skip_mode!r}")
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1 or shape.dim % groups:
        raise ValueError(f"reduced_selective_scan: groups={groups!r} must be a positive divisor of the "
                         f"channel count dim={shape.dim}")
    for name, form, proj_groups in (("B", shape.b_form, shape.b_groups), ("C", shape.c_form, shape.c_groups)):
        if form is ProjectionForm.GROUPED and groups % proj_groups:
            raise ValueError(
                f"reduced_selective_scan: groups={groups} must be a multiple of {name}'s group count "
                f"{proj_groups}, so each reduced channel reads one {name} group; pass groups as the lcm of "
                "B's and C's group counts (what the rewrite does)"
            )


def group_mean(x: Tensor, groups: int, dim: int) -> Tensor:
    """Mean over the channels of each of `groups` equal, contiguous channel groups along `dim`."""
    return x.unflatten(dim, (groups, x.shape[dim] // groups)).mean(dim + 1)


def group_sum(x: Tensor, groups: int, dim: int) -> Tensor:
    """Sum over the channels of each group along `dim` (the adjoint of `expand`)."""
    return x.unflatten(dim, (groups, x.shape[dim] // groups)).sum(dim + 1)


def expand(x: Tensor, channels: int, dim: int = 1) -> Tensor:
    """Each group's row given to every channel of the group along `dim`, contiguous."""
    return x.repeat_interleave(channels // x.shape[dim], dim=dim)


def _step(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool, math: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dt, delta + bias) per channel in the math dtype."""
    raw = delta.to(math)
    if delta_bias is not None:
        raw = raw + delta_bias.to(math).unsqueeze(-1)
    return (F.softplus(raw) if softplus else raw), raw


def _reduced_arguments(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode, skip_mode):
    """The one-channel-per-group scan's arguments (u, delta, A, B, C, D, z, bias, softplus)."""
    math = compute_dtype_for(u)
    if dt_mode == "effective":
        dt_r, bias_r, softplus_r = group_mean(_step(delta, delta_bias, delta_softplus, math)[0], groups, 1), None, False
    else:
        bias_r = None if delta_bias is None else group_mean(delta_bias.to(math), groups, 0)
        dt_r, softplus_r = group_mean(delta.to(math), groups, 1), delta_softplus
    mean_skip = skip_mode == "mean"
    D_r = group_mean(D.to(math), groups, 0) if mean_skip and D is not None else None
    z_r = group_mean(z.to(math), groups, 1) if mean_skip and z is not None else None
    B_r, C_r = (group_mean(p.to(math), groups, 0) if p.dim() == 2 else p.to(math) for p in (B, C))
    return (group_mean(u.to(math), groups, 1), dt_r, group_mean(A.to(math), groups, 0), B_r, C_r,
            D_r, z_r, bias_r, softplus_r)


def reduced_scan_composed(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
    groups: int, dt_mode: str, skip_mode: str, scan: ScanFn,
) -> tuple[Tensor, Tensor]:
    """(y in u's dtype, last state (batch, dim, N) in the math dtype) of a reduced site, with
    `scan` (the full op's signature) running the one-channel-per-group scan."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_reduction(shape, groups, dt_mode, skip_mode)
    math = compute_dtype_for(u)
    y_r, h_r = scan(*_reduced_arguments(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode,
                                        skip_mode))
    y = expand(y_r, shape.dim)
    if skip_mode == "exact":
        if D is not None:
            y = y + D.to(math).unsqueeze(-1) * u.to(math)
        if z is not None:
            y = y * F.silu(z.to(math))
    return y.to(u.dtype), expand(h_r, shape.dim)


def reduced_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False, *, groups: int, dt_mode: str = "effective", skip_mode: str = "exact",
) -> tuple[Tensor, Tensor]:
    """The oracle: `reduced_scan_composed` on the plain sequential reference loop."""
    return reduced_scan_composed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode, skip_mode,
                                 selective_scan_reference)


def reduced_scan_backward(
    grad_y: Tensor, grad_last_state: Optional[Tensor],
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
    groups: int, dt_mode: str, skip_mode: str, scan: ScanFn, scan_backward: ScanBackwardFn,
) -> list[Tensor]:
    """Gradients for (u, delta, A, B, C, D, z, delta_bias), each contiguous in its input's dtype (a
    zero-size tensor for an argument that was None): the chain rule through the composition,
    with `scan_backward` (the full backward op's signature) for the reduced scan. `scan` is only
    called when the gate needs the pre-gate output (skip_mode "exact" with z)."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_reduction(shape, groups, dt_mode, skip_mode)
    math, dim = compute_dtype_for(u), shape.dim
    width = dim // groups
    reduced = _reduced_arguments(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode, skip_mode)
    g = grad_y.to(math)
    g_D = g_z = g_u = None
    if skip_mode == "exact":
        u_m = u.to(math)
        if z is not None:  # y = pre * silu(z), pre = expand(y_r) + D*u
            z_m = z.to(math)
            pre = expand(scan(*reduced)[0], dim)
            if D is not None:
                pre = pre + D.to(math).unsqueeze(-1) * u_m
            sig = torch.sigmoid(z_m)
            g_z = g * pre * sig * (1 + z_m * (1 - sig))
            g = g * z_m * sig
        if D is not None:
            g_D = (g * u_m).sum((0, 2))
            g_u = g * D.to(math).unsqueeze(-1)
    g_last = None if grad_last_state is None else group_sum(grad_last_state.to(math), groups, 1).contiguous()
    g_ur, g_dtr, g_Ar, g_Br, g_Cr, g_Dr, g_zr, g_biasr = scan_backward(
        group_sum(g, groups, 1).contiguous(), g_last, *reduced
    )
    g_u = expand(g_ur, dim) / width if g_u is None else g_u + expand(g_ur, dim) / width
    g_delta = expand(g_dtr, dim) / width
    if dt_mode == "effective":
        if delta_softplus:
            raw = _step(delta, delta_bias, False, math)[1]
            g_delta = g_delta * torch.sigmoid(raw).masked_fill(raw > SOFTPLUS_THRESHOLD, 1.0)
        g_bias = g_delta.sum((0, 2))
    else:
        g_bias = None if delta_bias is None else expand(g_biasr, dim, 0) / width
    if skip_mode == "mean":
        g_D = None if D is None else expand(g_Dr, dim, 0) / width
        g_z = None if z is None else expand(g_zr, dim) / width
    g_B, g_C = (expand(gr, dim, 0) / width if p.dim() == 2 else gr for gr, p in ((g_Br, B), (g_Cr, C)))
    grads = (g_u, g_delta, expand(g_Ar, dim, 0) / width, g_B, g_C, g_D, g_z, g_bias)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return [u.new_empty(0) if t is None else gr.to(t.dtype).contiguous() for gr, t in zip(grads, inputs)]
