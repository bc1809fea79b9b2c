"""A VMeanba-reduced scan site as ONE Triton kernel (docs/DESIGN.md section 2, fused).

`fused_reduced_scan` is the CUDA kernel of `vmeanba::reduced_selective_scan`
(`vmeanba_compiler/reduced_op.py`): it returns what the composition of `reduced_scan.py` returns
for every argument form and both modes, without its separate passes (means of u and dt, the
scan of the G group channels, the materialised broadcast, then D*u and silu(z)). Here each
program owns one (group, batch row) and walks time in chunks of BLOCK_T steps:

  1. read the chunk's u and delta for the group's channels, BLOCK_C channels at a time, and sum
     u and dt = softplus(delta + bias) over the channels (dt_mode "raw": delta, with the group's
     mean bias and the softplus applied to the mean; skip_mode "mean": z too): the group means,
     formed in registers;
  2. scan the one mean channel over the chunk for all N states (a [BLOCK_N, BLOCK_T] tile,
     `tl.associative_scan` with the affine combine, carry from the previous chunk), with A and
     fixed B/C rows averaged over the group once, before the time loop;
  3. write y for every channel of the group: the reduced output plus D*u, times silu(z), in u's
     dtype (skip_mode "mean": the reduced channel applied the averaged D and z; y is its copy). u is read again for D*u right after step 1 read it, so it comes from cache: DRAM
     sees one read of u and of delta, one of z, one write of y.
The last state, (batch, dim, N), is the group's final state written to each of its channels.

Work is split over batch x K programs only (the means need every channel of a group, the scan
every earlier step), so small batches occupy few SMs: at batch 1 the kernel is bound by the
latency of K programs, not by bandwidth. Splitting time across programs would need a chained
scan (carries handed between programs through global memory), left for when measurements ask.
The backward is the op's composition (`reduced_scan.reduced_scan_backward`) around the full
scan's Triton backward, which `cuda_dispatch.py` lets Inductor inline and fuse.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..scan_schema import ProjectionForm, compute_dtype_for, projection_strides, validate_scan_args
from .reduced_scan import check_reduction
from .triton_common import autotune_configs, chunk_states, column, launcher, softplus, step_sizes

# (BLOCK_C channels per tile of step 1/3, BLOCK_T, num_warps).
_CONFIGS = ((32, 64, 4), (64, 64, 8), (32, 128, 8), (128, 32, 8), (64, 128, 16))
_INTERPRETED = triton.Config({"BLOCK_C": 2, "BLOCK_T": 8}, num_warps=1)


@triton.jit
def _group_row_mean(ptr, s_c, s_n, c_base, width, n, n_ok, zeros, BLOCK_C: tl.constexpr):
    """Mean over the group's channels of a (channel, state) table such as A, as [BLOCK_N] in the
    dtype of `zeros` (the math dtype)."""
    total = zeros
    for c0 in range(0, width, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        rows = tl.load(ptr + (c_base + cc)[:, None] * s_c + n[None, :] * s_n,
                       mask=(cc < width)[:, None] & n_ok[None, :], other=0.0)
        total += tl.sum(rows.to(zeros.dtype), 0)
    return total / width


@triton.jit
def _group_mean(ptr, s_c, c_base, width, zeros, BLOCK_C: tl.constexpr):
    """Mean over the group's channels of a per-channel vector such as D, in the dtype of `zeros`
    (a [BLOCK_C] vector of the math dtype)."""
    total = zeros
    for c0 in range(0, width, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        total += tl.load(ptr + (c_base + cc) * s_c, mask=cc < width, other=0.0).to(zeros.dtype)
    return tl.sum(total, 0) / width


@triton.autotune(
    configs=autotune_configs(
        [triton.Config({"BLOCK_C": c, "BLOCK_T": t}, num_warps=w) for c, t, w in _CONFIGS], _INTERPRETED
    ),
    key=["batch", "dim", "N", "L", "groups"],
)
@triton.jit
def _fused_reduced_scan_kernel(
    u_ptr, su_b, su_d, su_t,
    delta_ptr, sdl_b, sdl_d, sdl_t,
    A_ptr, sA_d, sA_n,
    B_ptr, sB_b, sB_g, sB_n, sB_t, B_cpg,
    C_ptr, sC_b, sC_g, sC_n, sC_t, C_cpg,
    D_ptr, sD_d,
    z_ptr, sz_b, sz_d, sz_t,
    bias_ptr, sbias_d,
    y_ptr, last_ptr,
    batch, dim, N, L, groups,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_VARIES: tl.constexpr, C_VARIES: tl.constexpr, DT_RAW: tl.constexpr, SKIP_MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    f = last_ptr.dtype.element_ty
    group = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    width = dim // groups
    c_base = group * width
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    h = tl.zeros([BLOCK_N], dtype=f)  # the reduced channel's state, carried across chunks
    A_mean = _group_row_mean(A_ptr, sA_d, sA_n, c_base, width, n, n_ok, h, BLOCK_C)
    # Time-varying B/C: the row of the group's first channel (a reduced channel lies in one
    # B/C group); fixed B/C: rows averaged over the group like A's.
    B_row = B_ptr + b * sB_b + (c_base // B_cpg) * sB_g + n[:, None] * sB_n
    C_row = C_ptr + b * sC_b + (c_base // C_cpg) * sC_g + n[:, None] * sC_n
    if not B_VARIES:
        B_mean = _group_row_mean(B_ptr, sB_g, sB_n, c_base, width, n, n_ok, h, BLOCK_C)
    if not C_VARIES:
        C_mean = _group_row_mean(C_ptr, sC_g, sC_n, c_base, width, n, n_ok, h, BLOCK_C)
    per_channel = tl.zeros([BLOCK_C], dtype=f)
    if DT_RAW and HAS_BIAS:
        bias_mean = _group_mean(bias_ptr, sbias_d, c_base, width, per_channel, BLOCK_C)
    if SKIP_MEAN and HAS_D:
        D_mean = _group_mean(D_ptr, sD_d, c_base, width, per_channel, BLOCK_C)

    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < L
        # 1. Group means of u and of the effective step dt over the chunk.
        u_sum = tl.zeros([BLOCK_T], dtype=f)
        dt_sum = tl.zeros([BLOCK_T], dtype=f)
        z_sum = tl.zeros([BLOCK_T], dtype=f)
        for c0 in range(0, width, BLOCK_C):
            cc = c_base + c0 + tl.arange(0, BLOCK_C)
            c_ok = (c0 + tl.arange(0, BLOCK_C)) < width
            mask = c_ok[:, None] & t_ok[None, :]
            delta_row = b * sdl_b + cc[:, None] * sdl_d
            if DT_RAW:
                dt = tl.load(delta_ptr + delta_row + t[None, :] * sdl_t, mask=mask, other=0.0).to(f)
            else:
                bias = tl.zeros([BLOCK_C], dtype=f)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + cc * sbias_d, mask=c_ok, other=0.0).to(f)
                dt, _ = step_sizes(delta_ptr, delta_row, t, sdl_t, mask, bias, HAS_BIAS, SOFTPLUS)
            u = tl.load(u_ptr + b * su_b + cc[:, None] * su_d + t[None, :] * su_t, mask=mask, other=0.0)
            u_sum += tl.sum(u.to(f), 0)
            dt_sum += tl.sum(dt, 0)
            if SKIP_MEAN and HAS_Z:
                zt = tl.load(z_ptr + b * sz_b + cc[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0)
                z_sum += tl.sum(zt.to(f), 0)
        u_mean = u_sum / width
        dt_mean = dt_sum / width  # 0 past the end: masked steps carry the state through
        if DT_RAW:
            if HAS_BIAS:
                dt_mean += bias_mean
            if SOFTPLUS:
                dt_mean = softplus(dt_mean)
            dt_mean = tl.where(t_ok, dt_mean, 0.0)

        # 2. The reduced channel's scan over the chunk, all states at once: [BLOCK_N, BLOCK_T].
        step_ok = n_ok[:, None] & t_ok[None, :]
        if B_VARIES:
            B_t = tl.load(B_row + t[None, :] * sB_t, mask=step_ok, other=0.0).to(f)
        else:
            B_t = B_mean[:, None]
        if C_VARIES:
            C_t = tl.load(C_row + t[None, :] * sC_t, mask=step_ok, other=0.0).to(f)
        else:
            C_t = C_mean[:, None]
        H, _ = chunk_states(dt_mean[None, :], (dt_mean * u_mean)[None, :], A_mean, B_t, h)
        y_reduced = tl.sum(C_t * H, 0)
        h = column(H, BLOCK_T - 1)
        if SKIP_MEAN:
            if HAS_D:
                y_reduced += D_mean * u_mean
            if HAS_Z:
                z_mean = z_sum / width
                y_reduced *= z_mean * tl.sigmoid(z_mean)

        # 3. Broadcast to the group's channels with the per-channel skip and gate.
        for c0 in range(0, width, BLOCK_C):
            cc = c_base + c0 + tl.arange(0, BLOCK_C)
            c_ok = (c0 + tl.arange(0, BLOCK_C)) < width
            mask = c_ok[:, None] & t_ok[None, :]
            y = tl.zeros([BLOCK_C, BLOCK_T], dtype=f) + y_reduced[None, :]
            if HAS_D and not SKIP_MEAN:
                u = tl.load(u_ptr + b * su_b + cc[:, None] * su_d + t[None, :] * su_t, mask=mask, other=0.0)
                y += tl.load(D_ptr + cc * sD_d, mask=c_ok, other=0.0).to(f)[:, None] * u.to(f)
            if HAS_Z and not SKIP_MEAN:
                zt = tl.load(z_ptr + b * sz_b + cc[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0).to(f)
                y *= zt * tl.sigmoid(zt)
            tl.store(y_ptr + (b * dim + cc[:, None]) * L + t[None, :], y, mask=mask)

    for c0 in range(0, width, BLOCK_C):
        cc = c_base + c0 + tl.arange(0, BLOCK_C)
        c_ok = (c0 + tl.arange(0, BLOCK_C)) < width
        tl.store(last_ptr + (b * dim + cc[:, None]) * N + n[None, :],
                 tl.zeros([BLOCK_C, BLOCK_N], dtype=f) + h[None, :], mask=c_ok[:, None] & n_ok[None, :])


def fused_reduced_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    groups: int,
    dt_mode: str = "effective",
    skip_mode: str = "exact",
) -> tuple[Tensor, Tensor]:
    """(y, last_state) of `reduced_scan.reduced_scan_composed` with these modes: y (batch, dim,
    L) in u's dtype, last_state (batch, dim, N) in the math dtype, each group's values given to
    all of its channels."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_reduction(shape, groups, dt_mode, skip_mode)
    batch, dim, state, length = shape.batch, shape.dim, shape.state, shape.length
    y = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, state), dtype=compute_dtype_for(u), device=u.device)
    if batch * dim == 0:
        return y, last_state

    def optional(t: Optional[Tensor], ndim: int) -> tuple:
        return (u, *([0] * ndim)) if t is None else (t, *t.stride())

    launcher(_fused_reduced_scan_kernel)[(groups, batch)](
        u, *u.stride(), delta, *delta.stride(), A, *A.stride(),
        B, *projection_strides(B, shape.b_form, dim), C, *projection_strides(C, shape.c_form, dim),
        *optional(D, 1), *optional(z, 3), *optional(delta_bias, 1),
        y, last_state, batch, dim, state, length, groups,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        B_VARIES=shape.b_form is not ProjectionForm.FIXED, C_VARIES=shape.c_form is not ProjectionForm.FIXED,
        DT_RAW=dt_mode == "raw", SKIP_MEAN=skip_mode == "mean",
        BLOCK_N=triton.next_power_of_2(max(state, 1)),
    )
    return y, last_state
