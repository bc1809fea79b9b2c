"""A VMeanba-reduced scan site as Triton kernels, forward and backward (docs/DESIGN.md section 2).

`fused_reduced_scan` and `fused_reduced_scan_backward` are the CUDA kernels of
`vmeanba::reduced_selective_scan` and of its backward op (`vmeanba_compiler/reduced_op.py`):
they return what the composition of `reduced_scan.py` and its chain rule `reduced_scan_backward`
return, for every argument form and both modes, without their separate full-width passes. Each
program of either kernel owns one (group, batch row) and walks time in chunks of BLOCK_T steps;
the group's channels are visited BLOCK_C at a time, so any group width fits.

Forward, per chunk:
  1. read the chunk's u and delta for the group's channels and sum u and dt = softplus(delta +
     bias) over the channels (dt_mode "raw": delta, with the group's mean bias and the softplus
     applied to the mean; skip_mode "mean": z too): the group means, formed in registers;
  2. scan the one mean channel over the chunk for all N states (a [BLOCK_N, BLOCK_T] tile,
     `tl.associative_scan` with the affine combine, carry from the previous chunk), with A and
     fixed B/C rows averaged over the group once, before the time loop;
  3. write y for every channel of the group: the reduced output plus D*u, times silu(z), in u's
     dtype (skip_mode "mean": the reduced channel applied the averaged D and z; y is its copy).
     u is read again for D*u right after step 1 read it, so it comes from cache: DRAM sees one
     read of u and of delta, one of z, one write of y.
The last state, (batch, dim, N), is the group's final state written to each of its channels.

Backward (the reverse recurrence of `scan_triton.py` on the reduced channel, inside the chain
rule of the means, the broadcast, the skip and the gate):
  1. a forward sweep reads u and delta once and keeps, per (batch row, group), only what the
     reverse sweep needs of them: the group means of u and of the step at every step (the step
     before its softplus for "raw") and the state entering every chunk; scratch 2/width of u's
     size plus N per chunk;
  2. chunks in reverse order: the chunk's states and reduced output y_r, recomputed from that
     scratch; then
     a. the reduced output's gradient: sum over the group of gy * silu(z) ("exact"), or of gy
        with the averaged gate's derivative ("mean"), from one read of gy (and z);
     b. the adjoint lam = dLoss/dh by a reverse associative scan over [BLOCK_N, BLOCK_T], carried
        between chunks (from the summed gradient of the last state), and from it the reduced
        channel's gradients of u, dt, A, B and C as in `scan_triton.py`; the decay carrying lam
        back one step uses the next step's mean dt, read from the scratch;
     c. every channel of the group: du = du_r / width (+ g D for "exact"), d delta = d dt_r /
        width (times softplus' slope at the channel's own step for "effective"), dz per channel
        ("exact", from y_r + D u) or dz_r / width; D's and delta_bias's per-channel sums are added
        into per-(batch row, channel) rows. gy and z are read again right after step a read them
        (from cache), u and delta only where the formula needs the channel's own value.
  A's and fixed B/C's gradients are the reduced channel's divided by the width, written to each
  channel's row; time-varying B/C gradients are added atomically into their group's row (several
  reduced groups can share a B/C group). Rows per batch row are summed by the launcher, as for
  the full scan. DRAM sees u and delta read at most twice (the sweep, then step c only where the
  channel's own value enters), gy and z once, du, d delta, dz written once; no full-width
  temporary (the composition this replaces materialised the step, the pre-gate output, the
  expanded gradients and the softplus slope at full width, in separate passes).

Work is split over batch x K programs only (the means need every channel of a group, the scan
every earlier step), so small batches occupy few SMs: at batch 1 both kernels are bound by the
latency of K programs, not by bandwidth. Splitting time across programs would need a chained
scan (carries handed between programs through global memory), left for when measurements ask.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..scan_schema import compute_dtype_for, validate_scan_args
from .reduced_scan import check_reduction
from .scan_triton import (
    GradientBuffers, block_n, input_flags, max_chunks, optional_argument, projection_flags, scan_arguments,
)
from .triton_common import (
    affine_combine, autotune_configs, chunk_states, column, launcher, softplus, softplus_slope, step_sizes,
)

# (BLOCK_C channels per tile of the channel passes, BLOCK_T, num_warps).
_CONFIGS = ((32, 64, 4), (64, 64, 8), (32, 128, 8), (128, 32, 8), (64, 128, 16))
# The backward holds more [BLOCK_N, BLOCK_T] tiles at once (states, adjoint, their products), so
# narrower channel tiles: compiled for sm_90 at N = 16 these use 104-255 registers, at most 40
# bytes of spill stack ("effective"/"exact" with D, z and bias; none for "raw"/"mean").
_BACKWARD_CONFIGS = ((8, 64, 4), (16, 64, 4), (32, 64, 8), (16, 128, 8), (64, 64, 16))
_INTERPRETED = triton.Config({"BLOCK_C": 2, "BLOCK_T": 8}, num_warps=1)


def _configs(tiles: tuple[tuple[int, int, int], ...]) -> list[triton.Config]:
    return autotune_configs(
        [triton.Config({"BLOCK_C": c, "BLOCK_T": t}, num_warps=w) for c, t, w in tiles], _INTERPRETED
    )


# --- device-side pieces of both kernels ----------------------------------------------------------


@triton.jit
def _group_row_sum(ptr, s_c, s_n, c_base, width, n, n_ok, zeros, BLOCK_C: tl.constexpr):
    """Sum over the group's channels of a (channel, state) table such as A, as [BLOCK_N] in the
    dtype of `zeros` (the math dtype)."""
    total = zeros
    for c0 in range(0, width, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        rows = tl.load(ptr + (c_base + cc)[:, None] * s_c + n[None, :] * s_n,
                       mask=(cc < width)[:, None] & n_ok[None, :], other=0.0)
        total += tl.sum(rows.to(zeros.dtype), 0)
    return total


@triton.jit
def _group_row_mean(ptr, s_c, s_n, c_base, width, n, n_ok, zeros, BLOCK_C: tl.constexpr):
    return _group_row_sum(ptr, s_c, s_n, c_base, width, n, n_ok, zeros, BLOCK_C) / width


@triton.jit
def _group_mean(ptr, s_c, c_base, width, zeros, USED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean over the group's channels of a per-channel vector such as D, in the dtype of `zeros`
    (a [BLOCK_C] vector of the math dtype); 0 when not USED (absent, or kept per channel)."""
    total = zeros
    if USED:
        for c0 in range(0, width, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            total += tl.load(ptr + (c_base + cc) * s_c, mask=cc < width, other=0.0).to(zeros.dtype)
    return tl.sum(total, 0) / width


@triton.jit
def _fixed_projection_mean(ptr, s_g, s_n, c_base, width, n, n_ok, zeros, VARIES: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """Fixed B/C rows averaged over the group like A's; zeros (unused) for a time-varying B/C."""
    mean = zeros
    if not VARIES:
        mean = _group_row_mean(ptr, s_g, s_n, c_base, width, n, n_ok, zeros, BLOCK_C)
    return mean


@triton.jit
def _projection_chunk(row_ptr, s_t, t, mask, fixed_mean, VARIES: tl.constexpr):
    """B or C over one chunk, [BLOCK_N, BLOCK_T] (or [BLOCK_N, 1] for fixed rows): a time-varying
    one read at the chunk's steps from `row_ptr` (its batch row, group and states). Time-varying
    B/C needs no averaging: a reduced channel lies in one B/C group (`check_reduction`)."""
    if VARIES:
        tile = tl.load(row_ptr + t[None, :] * s_t, mask=mask, other=0.0).to(fixed_mean.dtype)
    else:
        tile = fixed_mean[:, None]
    return tile


@triton.jit
def _chunk_means(u_ptr, su_b, su_d, su_t, delta_ptr, sdl_b, sdl_d, sdl_t, bias_ptr, sbias_d,
                 z_ptr, sz_b, sz_d, sz_t, b, c_base, width, t, t_ok, bias_mean, zeros,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT_RAW: tl.constexpr, MEAN_Z: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Group means over one chunk's steps, each [BLOCK_T] in the dtype of `zeros`: (u, the step,
    z if MEAN_Z). The step is the mean effective dt, or for DT_RAW the mean delta plus the mean
    bias, before the softplus (`_reduced_step` finishes both)."""
    u_sum = zeros
    step_sum = zeros
    z_sum = zeros
    for c0 in range(0, width, BLOCK_C):
        cc = c_base + c0 + tl.arange(0, BLOCK_C)
        c_ok = (c0 + tl.arange(0, BLOCK_C)) < width
        mask = c_ok[:, None] & t_ok[None, :]
        delta_row = b * sdl_b + cc[:, None] * sdl_d
        if DT_RAW:
            step = tl.load(delta_ptr + delta_row + t[None, :] * sdl_t, mask=mask, other=0.0).to(zeros.dtype)
        else:
            bias = tl.zeros([BLOCK_C], dtype=zeros.dtype)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cc * sbias_d, mask=c_ok, other=0.0).to(zeros.dtype)
            step, _ = step_sizes(delta_ptr, delta_row, t, sdl_t, mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + b * su_b + cc[:, None] * su_d + t[None, :] * su_t, mask=mask, other=0.0)
        u_sum += tl.sum(u.to(zeros.dtype), 0)
        step_sum += tl.sum(step, 0)
        if MEAN_Z:
            zt = tl.load(z_ptr + b * sz_b + cc[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0)
            z_sum += tl.sum(zt.to(zeros.dtype), 0)
    step_mean = step_sum / width
    if DT_RAW and HAS_BIAS:
        step_mean += bias_mean
    return u_sum / width, step_mean, z_sum / width


@triton.jit
def _reduced_step(step, ok, DT_RAW: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The reduced channel's dt from `_chunk_means`' step (the softplus after the mean for
    DT_RAW); 0 where `ok` is off, so steps past the end carry the state through."""
    dt = step
    if DT_RAW and SOFTPLUS:
        dt = softplus(step)
    return tl.where(ok, dt, 0.0)


@triton.jit
def _silu_slope(z, sig):
    """d silu(z) / dz, given sig = sigmoid(z)."""
    return sig * (1.0 + z * (1.0 - sig))


# --- forward -------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(_CONFIGS), key=["batch", "dim", "N", "L", "groups"])
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
    B_fixed = _fixed_projection_mean(B_ptr, sB_g, sB_n, c_base, width, n, n_ok, h, B_VARIES, BLOCK_C)
    C_fixed = _fixed_projection_mean(C_ptr, sC_g, sC_n, c_base, width, n, n_ok, h, C_VARIES, BLOCK_C)
    B_row = B_ptr + b * sB_b + (c_base // B_cpg) * sB_g + n[:, None] * sB_n
    C_row = C_ptr + b * sC_b + (c_base // C_cpg) * sC_g + n[:, None] * sC_n
    per_channel = tl.zeros([BLOCK_C], dtype=f)
    bias_mean = _group_mean(bias_ptr, sbias_d, c_base, width, per_channel, DT_RAW and HAS_BIAS, BLOCK_C)
    D_mean = _group_mean(D_ptr, sD_d, c_base, width, per_channel, SKIP_MEAN and HAS_D, BLOCK_C)

    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < L
        # 1. Group means of u, of the step (and of z) over the chunk.
        u_mean, step, z_mean = _chunk_means(
            u_ptr, su_b, su_d, su_t, delta_ptr, sdl_b, sdl_d, sdl_t, bias_ptr, sbias_d, z_ptr, sz_b, sz_d, sz_t,
            b, c_base, width, t, t_ok, bias_mean, tl.zeros([BLOCK_T], dtype=f),
            HAS_BIAS, SOFTPLUS, DT_RAW, SKIP_MEAN and HAS_Z, BLOCK_C,
        )
        dt_mean = _reduced_step(step, t_ok, DT_RAW, SOFTPLUS)

        # 2. The reduced channel's scan over the chunk, all states at once: [BLOCK_N, BLOCK_T].
        step_ok = n_ok[:, None] & t_ok[None, :]
        B_t = _projection_chunk(B_row, sB_t, t, step_ok, B_fixed, B_VARIES)
        C_t = _projection_chunk(C_row, sC_t, t, step_ok, C_fixed, C_VARIES)
        H, _ = chunk_states(dt_mean[None, :], (dt_mean * u_mean)[None, :], A_mean, B_t, h)
        y_reduced = tl.sum(C_t * H, 0)
        h = column(H, BLOCK_T - 1)
        if SKIP_MEAN:
            if HAS_D:
                y_reduced += D_mean * u_mean
            if HAS_Z:
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


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _summed_output_grad(gy_ptr, sgy_b, sgy_d, sgy_t, z_ptr, sz_b, sz_d, sz_t, b, c_base, width, t, t_ok, zeros,
                        HAS_Z: tl.constexpr, SKIP_MEAN: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward step a, over one chunk: (sum over the group of the gradient reaching the reduced
    channel, mean of z), each [BLOCK_T]. "exact": sum of gy * silu(z) (the gate is per channel);
    "mean": sum of gy, and z's mean for the caller's averaged gate (0 without z)."""
    g_sum = zeros
    z_sum = zeros
    for c0 in range(0, width, BLOCK_C):
        cc = c_base + c0 + tl.arange(0, BLOCK_C)
        mask = ((c0 + tl.arange(0, BLOCK_C)) < width)[:, None] & t_ok[None, :]
        g = tl.load(gy_ptr + b * sgy_b + cc[:, None] * sgy_d + t[None, :] * sgy_t, mask=mask, other=0.0)
        g = g.to(zeros.dtype)
        if HAS_Z:
            zt = tl.load(z_ptr + b * sz_b + cc[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0)
            zt = zt.to(zeros.dtype)
            if SKIP_MEAN:
                z_sum += tl.sum(zt, 0)
            else:
                g = g * zt * tl.sigmoid(zt)
        g_sum += tl.sum(g, 0)
    return g_sum, z_sum / width


@triton.jit
def _channel_gradients(
    gy_ptr, sgy_b, sgy_d, sgy_t, u_ptr, su_b, su_d, su_t, delta_ptr, sdl_b, sdl_d, sdl_t,
    D_ptr, sD_d, z_ptr, sz_b, sz_d, sz_t, bias_ptr, sbias_d,
    gu_ptr, gdelta_ptr, gz_ptr, gD_ptr, gbias_ptr,
    b, dim, L, c_base, width, t, t_ok, gu_r, gdt_r, gz_r, y_r,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DT_RAW: tl.constexpr, SKIP_MEAN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Backward step c, over one chunk: the reduced channel's per-step gradients (of u, dt, z
    for "mean", its output y_r) taken back through the group mean to each of the group's
    channels, with the per-channel skip and gate ("exact") and softplus ("effective"). D's and
    delta_bias's per-channel sums over the chunk are added into their (batch row, channel) rows;
    only this program touches those, so the adds are ordered and deterministic."""
    for c0 in range(0, width, BLOCK_C):
        cc = c_base + c0 + tl.arange(0, BLOCK_C)
        c_ok = (c0 + tl.arange(0, BLOCK_C)) < width
        mask = c_ok[:, None] & t_ok[None, :]
        out = (b * dim + cc[:, None]) * L + t[None, :]  # gu, gdelta, gz: contiguous (batch, dim, L)
        tile = tl.zeros([BLOCK_C, BLOCK_T], dtype=gu_r.dtype)
        gu = tile + (gu_r / width)[None, :]
        if not SKIP_MEAN and (HAS_D or HAS_Z):
            gy = tl.load(gy_ptr + b * sgy_b + cc[:, None] * sgy_d + t[None, :] * sgy_t, mask=mask, other=0.0)
            gy = gy.to(tile.dtype)
            g = gy
            if HAS_Z:
                zt = tl.load(z_ptr + b * sz_b + cc[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0)
                zt = zt.to(tile.dtype)
                sig = tl.sigmoid(zt)
                g = gy * zt * sig
            pre = tile + y_r[None, :]  # the output before the gate
            if HAS_D:
                u = tl.load(u_ptr + b * su_b + cc[:, None] * su_d + t[None, :] * su_t, mask=mask, other=0.0)
                u = u.to(tile.dtype)
                Dc = tl.load(D_ptr + cc * sD_d, mask=c_ok, other=0.0).to(tile.dtype)
                gu += g * Dc[:, None]
                pre += Dc[:, None] * u
                tl.atomic_add(gD_ptr + b * dim + cc, tl.sum(g * u, 1), mask=c_ok, sem="relaxed")
            if HAS_Z:
                tl.store(gz_ptr + out, gy * pre * _silu_slope(zt, sig), mask=mask)
        if SKIP_MEAN and HAS_Z:
            tl.store(gz_ptr + out, tile + (gz_r / width)[None, :], mask=mask)
        tl.store(gu_ptr + out, gu, mask=mask)
        gdelta = tile + (gdt_r / width)[None, :]
        if not DT_RAW:
            if SOFTPLUS:
                bias = tl.zeros([BLOCK_C], dtype=tile.dtype)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + cc * sbias_d, mask=c_ok, other=0.0).to(tile.dtype)
                _, x = step_sizes(delta_ptr, b * sdl_b + cc[:, None] * sdl_d, t, sdl_t, mask, bias, HAS_BIAS, SOFTPLUS)
                gdelta *= softplus_slope(x)
            if HAS_BIAS:
                tl.atomic_add(gbias_ptr + b * dim + cc, tl.sum(gdelta, 1), mask=c_ok, sem="relaxed")
        tl.store(gdelta_ptr + out, gdelta, mask=mask)


# Autotuning runs a config several times: the buffers added into are zeroed between.
@triton.autotune(
    configs=_configs(_BACKWARD_CONFIGS), key=["batch", "dim", "N", "L", "groups"],
    reset_to_zero=["gB_ptr", "gC_ptr", "gD_ptr", "gbias_ptr"],
)
@triton.jit
def _fused_reduced_scan_backward_kernel(
    gy_ptr, sgy_b, sgy_d, sgy_t,
    glast_ptr, sgl_b, sgl_d, sgl_n,
    u_ptr, su_b, su_d, su_t,
    delta_ptr, sdl_b, sdl_d, sdl_t,
    A_ptr, sA_d, sA_n,
    B_ptr, sB_b, sB_g, sB_n, sB_t, B_cpg,
    C_ptr, sC_b, sC_g, sC_n, sC_t, C_cpg,
    D_ptr, sD_d,
    z_ptr, sz_b, sz_d, sz_t,
    bias_ptr, sbias_d,
    gu_ptr, gdelta_ptr, gz_ptr,
    gA_ptr, gD_ptr, gbias_ptr,
    gB_ptr, sgB_b, sgB_g, sgB_n, sgB_t,
    gC_ptr, sgC_b, sgC_g, sgC_n, sgC_t,
    means_ptr, states_ptr, max_chunks,
    batch, dim, N, L, groups,
    HAS_GLAST: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_VARIES: tl.constexpr, C_VARIES: tl.constexpr, DT_RAW: tl.constexpr,
    SKIP_MEAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    f = gA_ptr.dtype.element_ty
    group = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    width = dim // groups
    c_base = group * width
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    zeros_n = tl.zeros([BLOCK_N], dtype=f)
    zeros_t = tl.zeros([BLOCK_T], dtype=f)
    per_channel = tl.zeros([BLOCK_C], dtype=f)
    A_mean = _group_row_mean(A_ptr, sA_d, sA_n, c_base, width, n, n_ok, zeros_n, BLOCK_C)
    B_fixed = _fixed_projection_mean(B_ptr, sB_g, sB_n, c_base, width, n, n_ok, zeros_n, B_VARIES, BLOCK_C)
    C_fixed = _fixed_projection_mean(C_ptr, sC_g, sC_n, c_base, width, n, n_ok, zeros_n, C_VARIES, BLOCK_C)
    B_row = B_ptr + b * sB_b + (c_base // B_cpg) * sB_g + n[:, None] * sB_n
    C_row = C_ptr + b * sC_b + (c_base // C_cpg) * sC_g + n[:, None] * sC_n
    bias_mean = _group_mean(bias_ptr, sbias_d, c_base, width, per_channel, DT_RAW and HAS_BIAS, BLOCK_C)
    D_mean = _group_mean(D_ptr, sD_d, c_base, width, per_channel, SKIP_MEAN and HAS_D, BLOCK_C)
    row = b * groups + group
    u_means = means_ptr + row * 2 * L  # then the steps, L further
    states = states_ptr + row * max_chunks * N + n
    chunks = tl.cdiv(L, BLOCK_T)

    # 1. Forward sweep: the group means of every step and each chunk's carry-in state.
    h = zeros_n
    for k in range(0, chunks):
        tl.store(states + k * N, h, mask=n_ok)
        t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < L
        u_mean, step, _ = _chunk_means(
            u_ptr, su_b, su_d, su_t, delta_ptr, sdl_b, sdl_d, sdl_t, bias_ptr, sbias_d, z_ptr, sz_b, sz_d, sz_t,
            b, c_base, width, t, t_ok, bias_mean, zeros_t, HAS_BIAS, SOFTPLUS, DT_RAW, False, BLOCK_C,
        )
        tl.store(u_means + t, u_mean, mask=t_ok)
        tl.store(u_means + L + t, step, mask=t_ok)
        dt = _reduced_step(step, t_ok, DT_RAW, SOFTPLUS)
        B_t = _projection_chunk(B_row, sB_t, t, n_ok[:, None] & t_ok[None, :], B_fixed, B_VARIES)
        H, _ = chunk_states(dt[None, :], (dt * u_mean)[None, :], A_mean, B_t, h)
        h = column(H, BLOCK_T - 1)

    # The scratch is read back below, possibly by other threads of this program.
    tl.debug_barrier()

    # 2. Reverse sweep over chunks; lam carries dLoss/dh at the next chunk's first step.
    lam = zeros_n
    if HAS_GLAST:
        lam = _group_row_sum(glast_ptr + b * sgl_b, sgl_d, sgl_n, c_base, width, n, n_ok, zeros_n, BLOCK_C)
    gA = zeros_n
    gB_fixed = zeros_n
    gC_fixed = zeros_n
    gD_reduced = zeros_t  # "mean": the reduced channel's D gradient, per step of the chunk
    gbias_reduced = zeros_t  # "raw": the mean bias' gradient, per step
    for kk in range(0, chunks):
        k = chunks - 1 - kk
        t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < L
        step_ok = n_ok[:, None] & t_ok[None, :]
        u_mean = tl.load(u_means + t, mask=t_ok, other=0.0)
        step = tl.load(u_means + L + t, mask=t_ok, other=0.0)
        dt = _reduced_step(step, t_ok, DT_RAW, SOFTPLUS)
        # dt_{t+1}, for the decay a_{t+1} that carries lam back one step (none past the end).
        next_ok = t + 1 < L
        dt_next = _reduced_step(tl.load(u_means + L + t + 1, mask=next_ok, other=0.0), next_ok, DT_RAW, SOFTPLUS)
        B_t = _projection_chunk(B_row, sB_t, t, step_ok, B_fixed, B_VARIES)
        C_t = _projection_chunk(C_row, sC_t, t, step_ok, C_fixed, C_VARIES)
        h_in = tl.load(states + k * N, mask=n_ok, other=0.0)
        H, drive = chunk_states(dt[None, :], (dt * u_mean)[None, :], A_mean, B_t, h_in)
        y_r = tl.sum(C_t * H, 0)

        # a. The gradient reaching the reduced channel's output.
        g_r, z_mean = _summed_output_grad(gy_ptr, sgy_b, sgy_d, sgy_t, z_ptr, sz_b, sz_d, sz_t, b, c_base, width,
                                          t, t_ok, zeros_t, HAS_Z, SKIP_MEAN, BLOCK_C)
        gz_r = zeros_t
        if SKIP_MEAN and HAS_Z:  # y = (y_r + D_mean u_mean) silu(z_mean) for every channel
            sig = tl.sigmoid(z_mean)
            gz_r = g_r * (y_r + D_mean * u_mean) * _silu_slope(z_mean, sig)
            g_r = g_r * z_mean * sig

        # b. The adjoint over the chunk, all states at once, and the reduced channel's gradients.
        carry_prod, lam_scan = tl.associative_scan(
            (tl.exp(dt_next[None, :] * A_mean[:, None]), g_r[None, :] * C_t), 1, affine_combine, reverse=True
        )
        lam_t = lam_scan + carry_prod * lam[:, None]
        lam = column(lam_t, 0)
        decayed_prev = H - drive  # a_t * h_{t-1}
        gdt = tl.sum(lam_t * (A_mean[:, None] * decayed_prev + B_t * u_mean[None, :]), 0)
        gu_r = dt * tl.sum(lam_t * B_t, 0)
        gA += tl.sum(lam_t * decayed_prev * dt[None, :], 1)
        gB_t = lam_t * (dt * u_mean)[None, :]
        gC_t = g_r[None, :] * H
        if B_VARIES:
            tl.atomic_add(gB_ptr + b * sgB_b + (c_base // B_cpg) * sgB_g + n[:, None] * sgB_n + t[None, :] * sgB_t,
                          gB_t, mask=step_ok, sem="relaxed")
        else:
            gB_fixed += tl.sum(gB_t, 1)
        if C_VARIES:
            tl.atomic_add(gC_ptr + b * sgC_b + (c_base // C_cpg) * sgC_g + n[:, None] * sgC_n + t[None, :] * sgC_t,
                          gC_t, mask=step_ok, sem="relaxed")
        else:
            gC_fixed += tl.sum(gC_t, 1)
        if SKIP_MEAN and HAS_D:
            gu_r += g_r * D_mean
            gD_reduced += g_r * u_mean
        if DT_RAW and SOFTPLUS:
            gdt *= softplus_slope(step)
        gdt = tl.where(t_ok, gdt, 0.0)
        gbias_reduced += gdt

        # c. Every channel of the group.
        _channel_gradients(
            gy_ptr, sgy_b, sgy_d, sgy_t, u_ptr, su_b, su_d, su_t, delta_ptr, sdl_b, sdl_d, sdl_t,
            D_ptr, sD_d, z_ptr, sz_b, sz_d, sz_t, bias_ptr, sbias_d,
            gu_ptr, gdelta_ptr, gz_ptr, gD_ptr, gbias_ptr,
            b, dim, L, c_base, width, t, t_ok, gu_r, gdt, gz_r, y_r,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, DT_RAW, SKIP_MEAN, BLOCK_C, BLOCK_T,
        )

    # Per-(batch row, channel) rows of the per-channel parameters' gradients: the reduced
    # channel's through the group mean (1 / width each); the launcher sums them over batch rows.
    gD_channel = tl.sum(gD_reduced, 0) / width
    gbias_channel = tl.sum(gbias_reduced, 0) / width
    for c0 in range(0, width, BLOCK_C):
        cc = c_base + c0 + tl.arange(0, BLOCK_C)
        c_ok = (c0 + tl.arange(0, BLOCK_C)) < width
        cn_ok = c_ok[:, None] & n_ok[None, :]
        row_cn = (b * dim + cc[:, None]) * N + n[None, :]
        per_state = tl.zeros([BLOCK_C, BLOCK_N], dtype=f)
        tl.store(gA_ptr + row_cn, per_state + (gA / width)[None, :], mask=cn_ok)
        if not B_VARIES:
            tl.store(gB_ptr + row_cn, per_state + (gB_fixed / width)[None, :], mask=cn_ok)
        if not C_VARIES:
            tl.store(gC_ptr + row_cn, per_state + (gC_fixed / width)[None, :], mask=cn_ok)
        if SKIP_MEAN and HAS_D:
            tl.store(gD_ptr + b * dim + cc, per_channel + gD_channel, mask=c_ok)
        if DT_RAW and HAS_BIAS:
            tl.store(gbias_ptr + b * dim + cc, per_channel + gbias_channel, mask=c_ok)


# --- host side -----------------------------------------------------------------------------------


def _mode_flags(dt_mode: str, skip_mode: str) -> dict:
    return {"DT_RAW": dt_mode == "raw", "SKIP_MEAN": skip_mode == "mean"}


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
    launcher(_fused_reduced_scan_kernel)[(groups, batch)](
        *scan_arguments(shape, u, delta, A, B, C, D, z, delta_bias),
        y, last_state, batch, dim, state, length, groups,
        **input_flags(D, z, delta_bias, delta_softplus), **projection_flags(shape),
        **_mode_flags(dt_mode, skip_mode), BLOCK_N=block_n(shape),
    )
    return y, last_state


def fused_reduced_scan_backward(
    grad_y: Tensor,
    grad_last_state: Optional[Tensor],
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
) -> list[Tensor]:
    """Gradients for (u, delta, A, B, C, D, z, delta_bias) of `fused_reduced_scan` with these
    modes, as `reduced_scan.reduced_scan_backward` returns them: each in its input's dtype (u,
    delta and z contiguous), a zero-size tensor for an argument that was None."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_reduction(shape, groups, dt_mode, skip_mode)
    batch, dim, state, length = shape.batch, shape.dim, shape.state, shape.length
    math = compute_dtype_for(u)
    kernel = _fused_reduced_scan_backward_kernel
    chunks = max_chunks(kernel, length)
    grads = GradientBuffers.allocate(shape, u, delta, B, C, z, zeroed_rows=True)
    # Per (batch row, group): the means of u and of the step at every step, each chunk's carry-in.
    means = torch.empty((batch, groups, 2, length), dtype=math, device=u.device)
    states = torch.empty((batch, groups, chunks, state), dtype=math, device=u.device)
    if batch * dim > 0:
        launcher(kernel)[(groups, batch)](
            grad_y, *grad_y.stride(), *optional_argument(grad_last_state, u, 3),
            *scan_arguments(shape, u, delta, A, B, C, D, z, delta_bias),
            *grads.kernel_arguments(), means, states, chunks, batch, dim, state, length, groups,
            HAS_GLAST=grad_last_state is not None, **input_flags(D, z, delta_bias, delta_softplus),
            **projection_flags(shape), **_mode_flags(dt_mode, skip_mode), BLOCK_N=block_n(shape),
        )
    return grads.gradients(A, B, C, D, delta_bias)
