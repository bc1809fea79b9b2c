"""The Mamba project's scans: `mamba_ssm.ops.selective_scan_interface`.

Matched: functions of the module named exactly `mamba_ssm.ops.selective_scan_interface`. Vision
Mamba (hustvl/Vim) bundles its own copy of mamba_ssm under the same module name, so its extra
functions are matched here too; whichever of them the installed module defines is substituted.

Plain scans, signature `(u, delta, A, B, C, D=None, z=None, delta_bias=None,
delta_softplus=False, return_last_state=False)`, the same semantics as
`vmeanba_compiler.ops.selective_scan`:
- `selective_scan_fn`, `selective_scan_ref`. Output dtypes follow the originals: out in u's
  dtype; last_state (when asked) in float32 (float64 if A is float64), as the reference's
  `A.new_zeros` state and the CUDA kernel's float32 state are.

Fused Mamba blocks (one call: causal depthwise conv1d + SiLU, x_proj, dt_proj, the scan with the
z gate, out_proj). The polyfill writes that math around one `vmeanba.selective_scan` node per
scan, so the scan becomes a site the backend can calibrate and rewrite, and the block runs
wherever PyTorch does (the originals are CUDA kernels):
- `mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
  out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
  C_proj_bias=None, delta_softplus=True)` as in mamba_ssm v1.0.0 to v2.2.2 and Vision Mamba's
  copy, and the same followed by `checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None,
  dt_rms_weight=None, b_c_dt_rms_eps=1e-6` from v2.2.3 on; the polyfill is chosen by the
  installed function's signature (`by_signature`). Returns (batch, L, d_model).
- `mamba_inner_ref`, the first signature (every version): the same block, except that it
  applies softplus to delta whatever `delta_softplus` says, as the original does.
- Vision Mamba: `mamba_inner_fn_no_out_proj` (the first signature without `out_proj_weight,
  out_proj_bias`; returns the gated scan output (batch, dim, L), the "v2" block combines its two
  directions itself), `bimamba_inner_fn` and `bimamba_inner_ref` (A_b after A: one conv and
  projection, a second scan on the time-flipped x, delta, B, C, z with A_b and the same D and
  delta_bias, the two outputs summed, then out_proj; two op nodes per call; the `_ref` one
  always applies softplus). B and C are flipped along their last axis as the originals do, which
  for a (dim, N) parameter is the state axis.

The block math, as the originals compute it: xz splits into x and z along channels; x goes
through F.conv1d with `padding = width - 1`, truncated to the first L steps (the causal
convolution), and SiLU, computed in float32 (float64 for float64 x) with autocast off and
returned in x's dtype, as the causal-conv1d kernel does; `x_proj_weight` (no bias) maps each step
to [dt | B | C] with dt the first `delta_proj_weight.shape[1]` columns, B the next N and C the
last N (N = A.shape[1]); delta = dt @ `delta_proj_weight`^T with no bias (`delta_bias` and
softplus are the scan's); B and C are taken from that projection when passed as None (plus
`B_proj_bias` / `C_proj_bias`), otherwise used as given; the scan gets u = x, z and D. The
optional RMS norms (v2.2.3+) act on B and C over N and on delta over channels, in float32,
after the projection biases and before delta_bias/softplus. The originals cast the projection
weights to the CUDA autocast dtype under CUDA autocast; autocast computes those matmuls in that
dtype anyway, so the polyfills leave it to autocast (CPU autocast alike).

Output dtypes follow the originals: the gated scan output in x's (xz's) dtype; the out_proj
result in the dtype F.linear gives it (the autocast dtype inside autocast).

Gradients are autograd's through this math. One difference from the CUDA original: its backward
passes the gradient through the RMS norms unchanged and gives their weights none (they are
"non-learnable"), whereas the polyfill differentiates through them. Without RMS-norm weights
the gradients are the same functions.

Declined (traced as the original), with the reason:
- A (or A_b) not a real floating tensor, e.g. complex A: the op has no complex state, and with
  complex A the originals read B and C as interleaved (real, imag) pairs of twice the width.
- Any other tensor argument not a real floating tensor (or None where optional): the op and
  F.linear/F.conv1d would compute something else or fail differently.
- xz not 3-D; B or C given in a form the op does not take ((dim, N), (batch, N, L) or
  (batch, G, N, L) with G dividing dim): nothing to map them to.
- An RMS-norm weight for a B or C that is given rather than input-dependent: the original only
  normalises the (batch, 1, N, L) layout of its own projection.
- `checkpoint_lvl` other than 0 or 1: the original refuses it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import scan, supported
from .family import PolyfillFactory, ScanFamily, by_signature

MODULE = "mamba_ssm.ops.selective_scan_interface"


# --- plain scans -------------------------------------------------------------------------------


def _selective_scan_polyfill(name: str, fallback: Callable) -> Callable:
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        if not supported((u, delta, A, B, C), (D, z, delta_bias)):
            return fallback(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        y, last_state = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if y.dtype != u.dtype:
            y = y.to(u.dtype)
        if not return_last_state:
            return y
        state_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        if last_state.dtype != state_dtype:
            last_state = last_state.to(state_dtype)
        return y, last_state

    return selective_scan_fn


# --- fused blocks: shared pieces ---------------------------------------------------------------


def _conv_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], math: torch.dtype) -> Tensor:
    length = x.shape[-1]
    out = F.conv1d(
        x.to(math), weight.to(math), None if bias is None else bias.to(math),
        padding=weight.shape[-1] - 1, groups=x.shape[1],
    )
    return F.silu(out[..., :length])


def _causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """silu(causal depthwise conv1d(x)) in float32 (float64 for float64 x), returned in x's dtype,
    as causal-conv1d's kernel computes it. Autocast is switched off around it because that kernel
    is not autocast-aware (F.conv1d would otherwise run in the autocast dtype)."""
    math = torch.float64 if x.dtype == torch.float64 else torch.float32
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            out = _conv_silu(x, weight, bias, math)
    else:
        out = _conv_silu(x, weight, bias, math)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _rms_norm(t: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm over axis 1 of (batch, n, L) (the state axis of B/C, the channels of delta):
    float32 math (float64 for float64) and a result in t's dtype, as mamba_ssm's Triton norm."""
    math = torch.float64 if t.dtype == torch.float64 else torch.float32
    wide = t.to(math)
    out = wide * torch.rsqrt(wide.square().mean(dim=1, keepdim=True) + eps) * weight.to(math)[:, None]
    return out.to(t.dtype)


def _projected(cols: Tensor, bias: Optional[Tensor]) -> Tensor:
    """B or C from its x_proj columns (batch, L, N): (batch, N, L), the op's shared form."""
    if bias is not None:
        cols = cols + bias.to(dtype=cols.dtype)
    return cols.transpose(1, 2)


def _block_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C,
                  B_proj_bias, C_proj_bias):
    """(u, z, delta, B, C) of the block's scan: conv + silu, x_proj split, dt_proj (no bias)."""
    x, z = xz.chunk(2, dim=1)
    u = _causal_conv1d_silu(x, conv1d_weight, conv1d_bias)
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)  # (batch, L, rank + 2N)
    rank = delta_proj_weight.shape[1]
    state = A.shape[1]
    delta = delta_proj_weight @ x_dbl[..., :rank].transpose(1, 2)  # (batch, dim, L)
    if B is None:
        B = _projected(x_dbl[..., rank:rank + state], B_proj_bias)
    if C is None:
        C = _projected(x_dbl[..., x_dbl.shape[-1] - state:], C_proj_bias)
    return u, z, delta, B, C


def _op_takes(proj: Optional[Tensor], batch, dim, state, length) -> bool:
    """Whether a given B or C is in one of the op's forms (None: input-dependent, always fine)."""
    if proj is None:
        return True
    if proj.dim() == 2:
        return proj.shape[0] == dim and proj.shape[1] == state
    if proj.dim() == 3:
        return proj.shape[0] == batch and proj.shape[1] == state and proj.shape[2] == length
    if proj.dim() == 4:
        return (proj.shape[0] == batch and proj.shape[2] == state and proj.shape[3] == length
                and proj.shape[1] >= 1 and dim % proj.shape[1] == 0)
    return False


def _block_supported(xz, A_list, required, optional, B, C) -> bool:
    """Whether the op represents a fused block's call: the declines of the module docstring that
    every fused block shares (A_list: A, plus A_b for the bidirectional ones)."""
    if not supported((xz, *A_list, *required), (B, C, *optional)):
        return False
    if xz.dim() != 3 or any(a.dim() != 2 for a in A_list):
        return False
    batch, channels, length = xz.shape
    dim, state = channels // 2, A_list[0].shape[1]
    return _op_takes(B, batch, dim, state, length) and _op_takes(C, batch, dim, state, length)


def _gated_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> Tensor:
    """The scan, given contiguous u, delta, B, C and z: the originals make them contiguous too,
    and the op's backward returns contiguous gradients while its fake kernel gives each the
    layout of its input, which Inductor checks (a transposed input fails that check)."""
    u, delta, B, C, z = (t.contiguous() for t in (u, delta, B, C, z))
    y, _ = scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return y if y.dtype == u.dtype else y.to(u.dtype)


def _bidirectional_scan(u, delta, A, A_b, B, C, D, z, delta_bias, delta_softplus) -> Tensor:
    """Vim's two directions: the second scans the time-flipped inputs with A_b; summed."""
    forward = _gated_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    backward = _gated_scan(u.flip([-1]), delta.flip([-1]), A_b, B.flip([-1]), C.flip([-1]), D,
                           z.flip([-1]), delta_bias, delta_softplus)
    return forward + backward.flip([-1])


def _out_proj(y: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(y.transpose(1, 2), weight, bias)  # (batch, L, d_model)


# --- fused blocks: one polyfill per published signature ----------------------------------------


def _mamba_inner_fn_polyfill(name: str, fallback: Callable) -> Callable:
    """mamba_ssm >= 2.2.3."""

    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                       out_proj_weight, out_proj_bias,
                       A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                       C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None,
                       c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6):
        ok = (
            checkpoint_lvl in (0, 1)
            and (b_rms_weight is None or B is None)
            and (c_rms_weight is None or C is None)
            and _block_supported(
                xz, (A,), (conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight),
                (conv1d_bias, out_proj_bias, D, delta_bias, B_proj_bias, C_proj_bias,
                 b_rms_weight, c_rms_weight, dt_rms_weight),
                B, C,
            )
        )
        if not ok:
            return fallback(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                            out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
                            C_proj_bias, delta_softplus, checkpoint_lvl, b_rms_weight, c_rms_weight,
                            dt_rms_weight, b_c_dt_rms_eps)
        u, z, delta, B, C = _block_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                          delta_proj_weight, A, B, C, B_proj_bias, C_proj_bias)
        if b_rms_weight is not None:
            B = _rms_norm(B, b_rms_weight, b_c_dt_rms_eps)
        if c_rms_weight is not None:
            C = _rms_norm(C, c_rms_weight, b_c_dt_rms_eps)
        if dt_rms_weight is not None:
            delta = _rms_norm(delta, dt_rms_weight, b_c_dt_rms_eps)
        y = _gated_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return _out_proj(y, out_proj_weight, out_proj_bias)

    return mamba_inner_fn


def _block_polyfill(force_softplus: bool) -> PolyfillFactory:
    """`mamba_inner_fn` of mamba_ssm v1.0.0-v2.2.2 and Vim (force_softplus=False), and
    `mamba_inner_ref` of every version (force_softplus=True): the same signature."""

    def factory(name: str, fallback: Callable) -> Callable:
        def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                           out_proj_weight, out_proj_bias,
                           A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                           C_proj_bias=None, delta_softplus=True):
            if not _block_supported(
                xz, (A,), (conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight),
                (conv1d_bias, out_proj_bias, D, delta_bias, B_proj_bias, C_proj_bias), B, C,
            ):
                return fallback(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
                                C_proj_bias, delta_softplus)
            u, z, delta, B, C = _block_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                              delta_proj_weight, A, B, C, B_proj_bias, C_proj_bias)
            y = _gated_scan(u, delta, A, B, C, D, z, delta_bias, True if force_softplus else delta_softplus)
            return _out_proj(y, out_proj_weight, out_proj_bias)

        return mamba_inner_fn

    return factory


def _no_out_proj_polyfill(name: str, fallback: Callable) -> Callable:
    """Vim's `mamba_inner_fn_no_out_proj`."""

    def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                   A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                                   C_proj_bias=None, delta_softplus=True):
        if not _block_supported(
            xz, (A,), (conv1d_weight, x_proj_weight, delta_proj_weight),
            (conv1d_bias, D, delta_bias, B_proj_bias, C_proj_bias), B, C,
        ):
            return fallback(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C,
                            D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)
        u, z, delta, B, C = _block_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                          delta_proj_weight, A, B, C, B_proj_bias, C_proj_bias)
        return _gated_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    return mamba_inner_fn_no_out_proj


def _bimamba_polyfill(force_softplus: bool) -> PolyfillFactory:
    """Vim's `bimamba_inner_fn` (force_softplus=False) and `bimamba_inner_ref` (True)."""

    def factory(name: str, fallback: Callable) -> Callable:
        def bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                             out_proj_weight, out_proj_bias,
                             A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                             C_proj_bias=None, delta_softplus=True):
            if not _block_supported(
                xz, (A, A_b), (conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight),
                (conv1d_bias, out_proj_bias, D, delta_bias, B_proj_bias, C_proj_bias), B, C,
            ):
                return fallback(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                out_proj_weight, out_proj_bias, A, A_b, B, C, D, delta_bias,
                                B_proj_bias, C_proj_bias, delta_softplus)
            u, z, delta, B, C = _block_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                              delta_proj_weight, A, B, C, B_proj_bias, C_proj_bias)
            y = _bidirectional_scan(u, delta, A, A_b, B, C, D, z, delta_bias,
                                    True if force_softplus else delta_softplus)
            return _out_proj(y, out_proj_weight, out_proj_bias)

        return bimamba_inner_fn

    return factory


_FACTORIES: dict[str, PolyfillFactory] = {
    "selective_scan_fn": _selective_scan_polyfill,
    "selective_scan_ref": _selective_scan_polyfill,
    "mamba_inner_fn": by_signature(_mamba_inner_fn_polyfill, _block_polyfill(force_softplus=False)),
    "mamba_inner_ref": _block_polyfill(force_softplus=True),
    "mamba_inner_fn_no_out_proj": _no_out_proj_polyfill,
    "bimamba_inner_fn": _bimamba_polyfill(force_softplus=False),
    "bimamba_inner_ref": _bimamba_polyfill(force_softplus=True),
}


def _make_polyfill(name: str, fallback: Callable) -> Callable:
    return _FACTORIES[name.rpartition(".")[2]](name, fallback)


MAMBA_SSM = ScanFamily(
    name="mamba_ssm",
    matches=lambda module_name: module_name == MODULE,
    functions=tuple(_FACTORIES),
    make_polyfill=_make_polyfill,
)
