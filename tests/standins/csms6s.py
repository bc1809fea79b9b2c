"""Stand-in for VMamba's `csms6s` module (classification/models/csms6s.py; tests only).

`selective_scan_fn` has the official signature and argument order: no z, `delta_bias` right after
`D`, `delta_softplus` defaulting to True, then `oflex` and `backend`. Without the CUDA extensions
the official function runs `selective_scan_torch`, a pure-torch loop over L that requires grouped
B and C (batch, K, N, L), computes in float32 and returns the float32 result when `oflex` is true,
else the result cast back to u's dtype. That fallback is reproduced here. `CALLS` counts eager
executions.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

CALLS: collections.Counter = collections.Counter()


def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True,
                         *args, **kwargs):
    dtype_in = u.dtype
    batch, groups, state, length = B.shape
    kc_dim = u.shape[1]
    c_dim = kc_dim // groups
    assert u.shape == (batch, kc_dim, length)
    assert delta.shape == (batch, kc_dim, length)
    assert A.shape == (kc_dim, state)
    assert C.shape == B.shape
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    B = B.view(batch, groups, 1, state, length).repeat(1, 1, c_dim, 1, 1).view(batch, kc_dim, state, length)
    C = C.view(batch, groups, 1, state, length).repeat(1, 1, c_dim, 1, 1).view(batch, kc_dim, state, length)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((batch, kc_dim, state))
    ys = []
    for i in range(length):
        x = deltaA[:, :, i, :] * x + deltaB_u[:, :, i, :]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D.unsqueeze(-1)
    return out if oflex else out.to(dtype=dtype_in)


def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True,
                      backend=None):
    """Official signature; this stand-in always takes the pure-torch fallback."""
    CALLS["selective_scan_fn"] += 1
    return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus, oflex, backend)
