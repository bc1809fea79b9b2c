"""Stand-in for `mamba_ssm.ops.selective_scan_interface` (tests only).

Same names, signatures and semantics as the Mamba project's module: `selective_scan_fn` (there a
CUDA kernel behind an autograd.Function) and `selective_scan_ref` (a pure-torch loop over L).
Both are written here as independent einsum loops in the style of Mamba's reference, so they are
an oracle for `vmeanba.selective_scan` that shares no code with it. `CALLS` counts the eager
executions of each function, so a test can tell whether the original ran.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

CALLS: collections.Counter = collections.Counter()


def _scan_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    is_variable_B = B.dim() >= 3
    is_variable_C = C.dim() >= 3
    if A.is_complex():
        # Mamba's convention: a variable B/C holds (real, imag) pairs along its last axis.
        if is_variable_B:
            B = torch.view_as_complex(B.float().unflatten(-1, (length, 2)).contiguous())
        if is_variable_C:
            C = torch.view_as_complex(C.float().unflatten(-1, (length, 2)).contiguous())
    else:
        B = B.float()
        C = C.float()
    x = A.new_zeros((batch, dim, A.shape[1]))
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if not is_variable_B:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if is_variable_C and C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    ys = []
    for i in range(length):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if not is_variable_C:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        if y.is_complex():
            y = y.real * 2
        ys.append(y)
    last_state = x
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, last_state)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Stand-in for Mamba's CUDA selective scan: returns out, or (out, last_state)."""
    CALLS["selective_scan_fn"] += 1
    return _scan_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Stand-in for Mamba's pure-torch reference: returns out, or (out, last_state)."""
    CALLS["selective_scan_ref"] += 1
    return _scan_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
