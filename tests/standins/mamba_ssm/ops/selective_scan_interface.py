"""Stand-in for `mamba_ssm.ops.selective_scan_interface` (tests only).

Same names, signatures and semantics as the Mamba project's module: `selective_scan_fn` (there a
CUDA kernel behind an autograd.Function) and `selective_scan_ref` (a pure-torch loop over L).
Both are written here as independent einsum loops in the style of Mamba's reference, so they are
an oracle for `vmeanba.selective_scan` that shares no code with it. `CALLS` counts the eager
executions of each function, so a test can tell whether the original ran.

The fused block functions are here too, as pure-torch math written from the published signatures
(the originals are CUDA kernels behind autograd.Functions and cannot run on CPU):

- state-spaces/mamba: `mamba_inner_fn` with the signature of v2.2.3 and later (`checkpoint_lvl`
  and the B/C/dt RMS-norm weights), `mamba_inner_fn_1x` with the older one (v1.0.0 to v2.2.2, and
  the copy Vision Mamba bundles: the same parameters without those five; it is not a published
  name, a test installs it as `mamba_inner_fn` when it needs that signature), and
  `mamba_inner_ref`.
- hustvl/Vim (Vision Mamba) ships its own copy of this package under the same module name
  (mamba-1p1p1/mamba_ssm), adding `bimamba_inner_fn`, `bimamba_inner_ref` and
  `mamba_inner_fn_no_out_proj`. One module name cannot be two modules, so this stand-in holds
  both sets.

What they compute, as the originals do: xz splits into x and z along channels; x goes through a
causal depthwise conv1d (zero history, output of length L) and SiLU, computed in float32 and
returned in x's dtype as the causal-conv1d kernel does; `x_proj_weight` maps each time step to
[dt (rank) | B (N) | C (N)] (C is the last N columns); delta = `delta_proj_weight` @ dt, without
bias (`delta_bias` is added inside the scan); B and C are taken from that projection when passed
as None (plus `B_proj_bias` / `C_proj_bias`), otherwise used as given; the scan gates with
silu(z) and adds D*u; `out_proj` is a linear map with bias over channels, giving (batch, L,
d_model). Quirks kept on purpose: the `*_ref` functions always apply softplus to delta whatever
`delta_softplus` says, and the bidirectional functions flip B and C along their last axis, which
is the state axis N, not time, when B or C is given as a (dim, N) parameter.
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


# --- the fused block functions ---------------------------------------------------------------------


def _causal_conv1d_silu(x, weight, bias):
    """silu(causal depthwise conv1d): output step t sees x[t - w + 1 .. t], zeros before the start.

    Written as a sum over the w taps, each a shifted copy of x; accumulates in float32 (float64
    for float64 input) and returns x's dtype, as the causal-conv1d kernel does. Elementwise only,
    so autocast leaves it alone, as it leaves the kernel alone.
    """
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dim, one, width = weight.shape
    if one != 1:
        raise ValueError(f"conv1d weight must be (dim, 1, width), got {tuple(weight.shape)}")
    length = x.shape[-1]
    xs = x.to(acc_dtype)
    w = weight.to(acc_dtype)
    acc = torch.zeros_like(xs)
    for tap in range(width):
        lag = width - 1 - tap  # how far back this tap looks
        shifted = F.pad(xs, (lag, 0))[..., :length]
        acc = acc + w[:, 0, tap, None] * shifted
    if bias is not None:
        acc = acc + bias.to(acc_dtype)[:, None]
    return F.silu(acc).to(x.dtype)


def _rms_rows(rows, weight, eps):
    """RMS norm of each row of a 2-D tensor, in float32, result in the rows' dtype (as mamba_ssm's
    `rms_norm_forward`)."""
    r = rows.float()
    r = r * torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return r.to(rows.dtype)


def _from_x_dbl(cols, bias, A, batch, length, grouped):
    """B or C taken from the x_proj output rows ((b l), n): (b, n, l), or (b, 1, n, l) when
    `grouped` (the fused function's layout); complex A: (b, n/2, 2l), real/imag interleaved."""
    if bias is not None:
        cols = cols + bias.to(dtype=cols.dtype)
    per_step = cols.reshape(batch, length, cols.shape[-1])
    if A.is_complex():
        pairs = per_step.reshape(batch, length, -1, 2)  # (b, l, n, two)
        out = pairs.permute(0, 2, 1, 3).reshape(batch, pairs.shape[2], 2 * length)
    else:
        out = per_step.permute(0, 2, 1)
    out = out.contiguous()
    return out.unsqueeze(1) if grouped else out


def _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C,
                  B_proj_bias, C_proj_bias, grouped):
    """(x after conv + silu, z, delta, B, C, variable_B, variable_C) as the fused functions build them."""
    batch, _, length = xz.shape
    x, z = xz.chunk(2, dim=1)
    x = _causal_conv1d_silu(x, conv1d_weight, conv1d_bias)
    dim = x.shape[1]
    rows = x.permute(0, 2, 1).reshape(batch * length, dim)  # (b l) d
    x_dbl = F.linear(rows, x_proj_weight)
    rank = delta_proj_weight.shape[1]
    n = A.shape[-1] * (2 if A.is_complex() else 1)
    delta = (delta_proj_weight @ x_dbl[:, :rank].t()).reshape(dim, batch, length).permute(1, 0, 2)
    variable_B, variable_C = B is None, C is None
    if variable_B:
        B = _from_x_dbl(x_dbl[:, rank:rank + n], B_proj_bias, A, batch, length, grouped)
    if variable_C:
        C = _from_x_dbl(x_dbl[:, x_dbl.shape[1] - n:], C_proj_bias, A, batch, length, grouped)
    return x, z, delta, B, C


def _out_proj(y, weight, bias):
    return F.linear(y.permute(0, 2, 1), weight, bias)  # (b, l, d_model)


def _cast_weights_for_cuda_autocast(*weights):
    """The fused originals cast their projection weights to the CUDA autocast dtype when CUDA
    autocast is on (never on a CPU machine)."""
    if not torch.is_autocast_enabled("cuda"):
        return weights
    dtype = torch.get_autocast_dtype("cuda")
    return tuple(None if w is None else w.to(dtype=dtype) for w in weights)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                   out_proj_weight, out_proj_bias,
                   A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                   C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None,
                   c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6):
    """Stand-in for mamba_ssm >= 2.2.3's fused Mamba block: returns (batch, L, d_model).

    The RMS norms (when their weights are given) act on B and C over the state axis and on delta
    over channels, after B_proj_bias / C_proj_bias and before delta_bias / softplus; B and C must
    then be the input-dependent ones. `checkpoint_lvl` only chooses what the original recomputes
    in its backward; it must be 0 or 1.
    """
    CALLS["mamba_inner_fn"] += 1
    assert checkpoint_lvl in (0, 1)
    x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias = _cast_weights_for_cuda_autocast(
        x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias
    )
    x, z, delta, B, C = _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                      A, B, C, B_proj_bias, C_proj_bias, grouped=True)
    batch, dim, length = x.shape
    for name, weight in (("B", b_rms_weight), ("C", c_rms_weight)):
        if weight is None:
            continue
        proj = B if name == "B" else C
        if proj.dim() != 4 or proj.shape[1] != 1:
            raise ValueError(f"{name} RMS norm needs {name} of shape (batch, 1, N, L), got {tuple(proj.shape)}")
        rows = proj[:, 0].permute(0, 2, 1).reshape(batch * length, -1)
        normed = _rms_rows(rows, weight, b_c_dt_rms_eps).reshape(batch, length, -1).permute(0, 2, 1)
        if name == "B":
            B = normed.unsqueeze(1)
        else:
            C = normed.unsqueeze(1)
    if dt_rms_weight is not None:
        rows = delta.permute(0, 2, 1).reshape(batch * length, dim)
        delta = _rms_rows(rows, dt_rms_weight, b_c_dt_rms_eps).reshape(batch, length, dim).permute(0, 2, 1)
    y = _scan_loop(x, delta, A, B, C, D, z, delta_bias, delta_softplus, False)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def mamba_inner_fn_1x(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                      out_proj_weight, out_proj_bias,
                      A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                      C_proj_bias=None, delta_softplus=True):
    """Stand-in for `mamba_inner_fn` as published in mamba_ssm v1.0.0 to v2.2.2 and in Vision
    Mamba's bundled copy (tests install it under that name): the same block, no RMS norms."""
    CALLS["mamba_inner_fn"] += 1
    x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias = _cast_weights_for_cuda_autocast(
        x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias
    )
    x, z, delta, B, C = _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                      A, B, C, B_proj_bias, C_proj_bias, grouped=True)
    y = _scan_loop(x, delta, A, B, C, D, z, delta_bias, delta_softplus, False)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                    out_proj_weight, out_proj_bias,
                    A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                    C_proj_bias=None, delta_softplus=True):
    """Stand-in for mamba_ssm's `mamba_inner_ref` (every version): the block written with
    `causal_conv1d_fn` and `selective_scan_fn`. Like the original, it applies softplus to delta
    whatever `delta_softplus` says, and never casts weights for autocast."""
    CALLS["mamba_inner_ref"] += 1
    x, z, delta, B, C = _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                      A, B, C, B_proj_bias, C_proj_bias, grouped=False)
    y = _scan_loop(x, delta, A, B, C, D, z, delta_bias, True, False)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                               A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                               C_proj_bias=None, delta_softplus=True):
    """Stand-in for Vision Mamba's `mamba_inner_fn_no_out_proj`: the block up to the gated scan
    output, (batch, dim, L) in xz's dtype. Its "v2" block calls it twice (once on xz flipped in
    time, with the backward direction's own weights) and combines the two itself."""
    CALLS["mamba_inner_fn_no_out_proj"] += 1
    x_proj_weight, delta_proj_weight = _cast_weights_for_cuda_autocast(x_proj_weight, delta_proj_weight)
    x, z, delta, B, C = _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                      A, B, C, B_proj_bias, C_proj_bias, grouped=True)
    return _scan_loop(x, delta, A, B, C, D, z, delta_bias, delta_softplus, False)


def _bidirectional(x, z, delta, A, A_b, B, C, D, delta_bias, softplus):
    forward = _scan_loop(x, delta, A, B, C, D, z, delta_bias, softplus, False)
    backward = _scan_loop(x.flip([-1]), delta.flip([-1]), A_b, B.flip([-1]), C.flip([-1]), D,
                          z.flip([-1]), delta_bias, softplus, False)
    return forward + backward.flip([-1])


def bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                     out_proj_weight, out_proj_bias,
                     A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                     C_proj_bias=None, delta_softplus=True):
    """Stand-in for Vision Mamba's `bimamba_inner_fn` (its "v1" block): one conv and projection,
    two scans sharing everything but A (A_b for the backward direction, run on the time-flipped
    inputs), their outputs summed (not averaged), then out_proj."""
    CALLS["bimamba_inner_fn"] += 1
    x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias = _cast_weights_for_cuda_autocast(
        x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias
    )
    x, z, delta, B, C = _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                      A, B, C, B_proj_bias, C_proj_bias, grouped=True)
    assert not A_b.is_complex(), "A should not be complex!!"
    y = _bidirectional(x, z, delta, A, A_b, B, C, D, delta_bias, delta_softplus)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def bimamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                      out_proj_weight, out_proj_bias,
                      A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                      C_proj_bias=None, delta_softplus=True):
    """Stand-in for Vision Mamba's `bimamba_inner_ref`: as `bimamba_inner_fn`, with softplus
    always applied (the original ignores `delta_softplus` here too)."""
    CALLS["bimamba_inner_ref"] += 1
    x, z, delta, B, C = _inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                      A, B, C, B_proj_bias, C_proj_bias, grouped=False)
    y = _bidirectional(x, z, delta, A, A_b, B, C, D, delta_bias, True)
    return _out_proj(y, out_proj_weight, out_proj_bias)
