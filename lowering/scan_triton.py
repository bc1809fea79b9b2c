"""Selective scan (docs/DESIGN.md section 1) as Triton kernels: forward and backward, every argument form.

`forward` and `backward` take and return exactly what `scan_cpu.forward` / `scan_cpu.backward`
do; `vmeanba_compiler.ops` routes CUDA tensors here (see `cuda_dispatch.py`).

How the work is laid out (both kernels):
- One program per (block of BLOCK_D channels, batch row); it owns every state of its channels,
  so the output's sum over states never crosses programs. The carried states are a
  [BLOCK_D, BLOCK_N] tile (BLOCK_N = N rounded up to a power of two).
- Time runs through the program in chunks of BLOCK_T steps; within a chunk, states are a loop
  (n = 0..N-1) and each state's recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A),
  b_t = dt_t B_t u_t) is solved for the whole chunk by `tl.associative_scan` with the affine
  combine, the carry-in entering once: h_t = (a_t ... a_first) h_in + scanned b_t. So every tile
  is 2D, [BLOCK_D, BLOCK_T], and registers stay moderate for any N (a 3D [channels, states,
  time] tile spilled at N = 16 on sm_90); u, dt and the output tile are loaded or stored once
  per chunk, contiguous along time (coalesced); only L / BLOCK_T steps are sequential, which
  matters for the few-channel scans VMeanba leaves behind.
- Math in float32 (float64 for float64 inputs): every load is cast to the dtype of the
  last-state (or gradient) buffer; stores cast to the output's dtype. Arguments are read in
  place through their strides; B and C through `scan_schema.projection_strides`, one formula for
  the grouped, shared and fixed forms (the C kernel's, with the state stride made explicit).

Backward (the reverse pass of selective_scan_cpu.c, chunked):
1. a forward sweep stores every chunk's carry-in state (scratch: batch x dim x chunks x N);
2. chunks in reverse order: recompute the chunk's states from its carry-in, then the adjoint
   lam_t = dLoss/dh_t = g_t C_t + a_{t+1} lam_{t+1} by a reverse associative scan, whose carry
   is lam at the next chunk's first step (at the end: the gradient of the last state). With
   a_t h_{t-1} = h_t - b_t, so no shifted copy of the states is needed:
       dA   += sum_t lam_t dt_t (a_t h_{t-1})       d dt_t = sum_n lam_t (A a_t h_{t-1} + B_t u_t)
       du_t  = g_t D + dt_t sum_n lam_t B_t         dB_t  += lam_t dt_t u_t,    dC_t += g_t h_t
   g_t is the gradient of y_t before the gate (times z sigmoid(z) when z is given); d dt is
   multiplied by softplus' slope when delta_softplus is set.
Gradients of per-channel parameters (A, D, delta_bias, fixed B/C) are written per batch row and
summed here (deterministic); time-varying B/C gradients are summed over the channels of a group
inside the program, then added atomically, because a group's channels span programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..scan_schema import ProjectionForm, ScanShape, compute_dtype_for, projection_strides, validate_scan_args
from .triton_common import affine_combine, autotune_configs, chunk_states, column, launcher, softplus_slope, step_sizes

# (BLOCK_D, BLOCK_T, num_warps). Every tile is 2D, [BLOCK_D, BLOCK_T] (channels x time; states
# are a sequential loop), 512 elements per 4 warps: compiled for sm_90 these use 95-180
# registers and (nearly) no spill stack. BLOCK_D = 1 serves the few-channel scans VMeanba leaves
# behind; wider blocks serve full scans. tests/test_triton_kernels.py compiles every config.
_FORWARD_CONFIGS = ((4, 128, 4), (1, 512, 4), (2, 256, 4), (8, 64, 4), (2, 512, 8), (4, 256, 8))
_BACKWARD_CONFIGS = ((4, 64, 4), (1, 256, 4), (2, 128, 4), (1, 512, 8))
# Under the interpreter: 4 channels x 8 steps, so small test shapes span blocks and chunks.
_INTERPRETED = triton.Config({"BLOCK_D": 4, "BLOCK_T": 8}, num_warps=1)


def _configs(tiles: tuple[tuple[int, int, int], ...]) -> list[triton.Config]:
    return autotune_configs(
        [triton.Config({"BLOCK_D": d, "BLOCK_T": t}, num_warps=w) for d, t, w in tiles], _INTERPRETED
    )


# --- device-side pieces of these two kernels (shared ones are in triton_common) ------------------


@triton.jit
def _add_to_column(x, j, v):
    """x with v added to column j."""
    return x + tl.where(tl.arange(0, x.shape[1])[None, :] == j, v[:, None], 0.0)


@triton.jit
def _add_group_sums(row_ptr, contrib, c, c_ok, t, t_ok, sg, st, cpg, c_first, c_last):
    """Atomically add contrib [BLOCK_D, BLOCK_T], summed over the channels of each B/C group
    present in this channel block, to that group's gradient row (row_ptr: batch row and state)."""
    group = c // cpg
    for g in range(c_first // cpg, c_last // cpg + 1):
        part = tl.sum(tl.where(((group == g) & c_ok)[:, None], contrib, 0.0), 0)
        tl.atomic_add(row_ptr + g * sg + t * st, part, mask=t_ok, sem="relaxed")


# --- forward -------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(_FORWARD_CONFIGS), key=["batch", "dim", "N", "L"])
@triton.jit
def _scan_forward_kernel(
    u_ptr, su_b, su_d, su_t,
    delta_ptr, sdl_b, sdl_d, sdl_t,
    A_ptr, sA_d, sA_n,
    B_ptr, sB_b, sB_g, sB_n, sB_t, B_cpg,
    C_ptr, sC_b, sC_g, sC_n, sC_t, C_cpg,
    D_ptr, sD_d,
    z_ptr, sz_b, sz_d, sz_t,
    bias_ptr, sbias_d,
    y_ptr, last_ptr,
    batch, dim, N, L,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    f = last_ptr.dtype.element_ty
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < dim
    bias = tl.zeros([BLOCK_D], dtype=f)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c * sbias_d, mask=c_ok, other=0.0).to(f)
    if HAS_D:
        Dc = tl.load(D_ptr + c * sD_d, mask=c_ok, other=0.0).to(f)
    A_rows = A_ptr + c * sA_d
    B_rows = B_ptr + b * sB_b + (c // B_cpg)[:, None] * sB_g
    C_rows = C_ptr + b * sC_b + (c // C_cpg)[:, None] * sC_g
    u_row = b * su_b + c[:, None] * su_d
    delta_row = b * sdl_b + c[:, None] * sdl_d
    out_row = (b * dim + c[:, None]) * L

    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=f)  # carry: column n is state n
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = c_ok[:, None] & (t < L)[None, :]
        u = tl.load(u_ptr + u_row + t[None, :] * su_t, mask=mask, other=0.0).to(f)
        dt, _ = step_sizes(delta_ptr, delta_row, t, sdl_t, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=f)
        for n in range(N):
            A_n = tl.load(A_rows + n * sA_n, mask=c_ok, other=0.0).to(f)
            B_n = tl.load(B_rows + n * sB_n + t[None, :] * sB_t, mask=mask, other=0.0).to(f)
            C_n = tl.load(C_rows + n * sC_n + t[None, :] * sC_t, mask=mask, other=0.0).to(f)
            H, _ = chunk_states(dt, dtu, A_n, B_n, column(h, n))
            y += C_n * H
            h = _add_to_column(h, n, column(H, BLOCK_T - 1) - column(h, n))
        if HAS_D:
            y += Dc[:, None] * u
        if HAS_Z:
            zt = tl.load(z_ptr + b * sz_b + c[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0).to(f)
            y *= zt * tl.sigmoid(zt)
        tl.store(y_ptr + out_row + t[None, :], y, mask=mask)
    n = tl.arange(0, BLOCK_N)
    tl.store(last_ptr + (b * dim + c[:, None]) * N + n[None, :], h, mask=c_ok[:, None] & (n < N)[None, :])


# --- backward ------------------------------------------------------------------------------------


# Autotuning runs a config several times: the atomically summed B/C gradients are zeroed between.
@triton.autotune(
    configs=_configs(_BACKWARD_CONFIGS), key=["batch", "dim", "N", "L"], reset_to_zero=["gB_ptr", "gC_ptr"]
)
@triton.jit
def _scan_backward_kernel(
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
    states_ptr, max_chunks,
    batch, dim, N, L,
    HAS_GLAST: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_VARIES: tl.constexpr, C_VARIES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    f = gA_ptr.dtype.element_ty
    b = tl.program_id(1).to(tl.int64)
    c_first = tl.program_id(0) * BLOCK_D
    c_last = tl.minimum(c_first + BLOCK_D, dim) - 1
    c = c_first + tl.arange(0, BLOCK_D)
    n_all = tl.arange(0, BLOCK_N)
    c_ok = c < dim
    cn_ok = c_ok[:, None] & (n_all < N)[None, :]
    bias = tl.zeros([BLOCK_D], dtype=f)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c * sbias_d, mask=c_ok, other=0.0).to(f)
    Dc = tl.zeros([BLOCK_D], dtype=f)
    if HAS_D:
        Dc = tl.load(D_ptr + c * sD_d, mask=c_ok, other=0.0).to(f)
    A_rows = A_ptr + c * sA_d
    B_rows = B_ptr + b * sB_b + (c // B_cpg)[:, None] * sB_g
    C_rows = C_ptr + b * sC_b + (c // C_cpg)[:, None] * sC_g
    u_row = b * su_b + c[:, None] * su_d
    delta_row = b * sdl_b + c[:, None] * sdl_d
    out_row = (b * dim + c[:, None]) * L  # gu, gdelta, gz: contiguous (batch, dim, L)
    states = states_ptr + ((b * dim + c[:, None]) * max_chunks) * N + n_all[None, :]
    chunks = tl.cdiv(L, BLOCK_T)

    # 1. Forward sweep: store each chunk's carry-in states.
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=f)
    for k in range(0, chunks):
        tl.store(states + k * N, h, mask=cn_ok)
        t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = c_ok[:, None] & (t < L)[None, :]
        u = tl.load(u_ptr + u_row + t[None, :] * su_t, mask=mask, other=0.0).to(f)
        dt, _ = step_sizes(delta_ptr, delta_row, t, sdl_t, mask, bias, HAS_BIAS, SOFTPLUS)
        for n in range(N):
            A_n = tl.load(A_rows + n * sA_n, mask=c_ok, other=0.0).to(f)
            B_n = tl.load(B_rows + n * sB_n + t[None, :] * sB_t, mask=mask, other=0.0).to(f)
            H, _ = chunk_states(dt, dt * u, A_n, B_n, column(h, n))
            h = _add_to_column(h, n, column(H, BLOCK_T - 1) - column(h, n))

    # The stored states are read back below, possibly by other threads of this program.
    tl.debug_barrier()

    # 2. Reverse sweep over chunks; lam carries dLoss/dh at the next chunk's first step.
    lam = tl.zeros([BLOCK_D, BLOCK_N], dtype=f)
    if HAS_GLAST:
        lam = tl.load(glast_ptr + b * sgl_b + c[:, None] * sgl_d + n_all[None, :] * sgl_n, mask=cn_ok, other=0.0).to(f)
    gA = tl.zeros([BLOCK_D, BLOCK_N], dtype=f)
    gB_fixed = tl.zeros([BLOCK_D, BLOCK_N], dtype=f)
    gC_fixed = tl.zeros([BLOCK_D, BLOCK_N], dtype=f)
    gD = tl.zeros([BLOCK_D], dtype=f)
    gbias = tl.zeros([BLOCK_D], dtype=f)
    for kk in range(0, chunks):
        k = chunks - 1 - kk
        t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < L
        mask = c_ok[:, None] & t_ok[None, :]
        u = tl.load(u_ptr + u_row + t[None, :] * su_t, mask=mask, other=0.0).to(f)
        dt, x = step_sizes(delta_ptr, delta_row, t, sdl_t, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        # dt_{t+1}, for the decay a_{t+1} that carries lam back one step (none past the end).
        next_ok = c_ok[:, None] & (t + 1 < L)[None, :]
        dt_next, _ = step_sizes(delta_ptr, delta_row, t + 1, sdl_t, next_ok, bias, HAS_BIAS, SOFTPLUS)
        gy = tl.load(gy_ptr + b * sgy_b + c[:, None] * sgy_d + t[None, :] * sgy_t, mask=mask, other=0.0).to(f)
        g = gy
        if HAS_Z:
            zt = tl.load(z_ptr + b * sz_b + c[:, None] * sz_d + t[None, :] * sz_t, mask=mask, other=0.0).to(f)
            sig = tl.sigmoid(zt)
            g = gy * zt * sig
            y_pre = Dc[:, None] * u
        h_in = tl.load(states + k * N, mask=cn_ok, other=0.0)
        gdt = tl.zeros([BLOCK_D, BLOCK_T], dtype=f)
        lam_B = tl.zeros([BLOCK_D, BLOCK_T], dtype=f)
        for n in range(N):
            A_n = tl.load(A_rows + n * sA_n, mask=c_ok, other=0.0).to(f)
            B_n = tl.load(B_rows + n * sB_n + t[None, :] * sB_t, mask=mask, other=0.0).to(f)
            C_n = tl.load(C_rows + n * sC_n + t[None, :] * sC_t, mask=mask, other=0.0).to(f)
            H, drive = chunk_states(dt, dtu, A_n, B_n, column(h_in, n))
            carry_prod, lam_scan = tl.associative_scan(
                (tl.exp(dt_next * A_n[:, None]), g * C_n), 1, affine_combine, reverse=True
            )
            lam_t = lam_scan + carry_prod * column(lam, n)[:, None]
            lam = _add_to_column(lam, n, column(lam_t, 0) - column(lam, n))
            decayed_prev = H - drive  # a_t * h_{t-1}
            gdt += lam_t * (A_n[:, None] * decayed_prev + B_n * u)
            lam_B += lam_t * B_n
            gA = _add_to_column(gA, n, tl.sum(lam_t * decayed_prev * dt, 1))
            gB_n = lam_t * dtu
            gC_n = g * H
            if B_VARIES:
                _add_group_sums(gB_ptr + b * sgB_b + n * sgB_n, gB_n, c, c_ok, t, t_ok,
                                sgB_g, sgB_t, B_cpg, c_first, c_last)
            else:
                gB_fixed = _add_to_column(gB_fixed, n, tl.sum(gB_n, 1))
            if C_VARIES:
                _add_group_sums(gC_ptr + b * sgC_b + n * sgC_n, gC_n, c, c_ok, t, t_ok,
                                sgC_g, sgC_t, C_cpg, c_first, c_last)
            else:
                gC_fixed = _add_to_column(gC_fixed, n, tl.sum(gC_n, 1))
            if HAS_Z:
                y_pre += C_n * H
        if HAS_Z:
            tl.store(gz_ptr + out_row + t[None, :], gy * y_pre * sig * (1.0 + zt * (1.0 - sig)), mask=mask)
        if SOFTPLUS:
            gdt *= softplus_slope(x)
        gdt = tl.where(mask, gdt, 0.0)
        tl.store(gdelta_ptr + out_row + t[None, :], gdt, mask=mask)
        tl.store(gu_ptr + out_row + t[None, :], g * Dc[:, None] + dt * lam_B, mask=mask)
        gbias += tl.sum(gdt, 1)
        gD += tl.sum(g * u, 1)

    # Per-(batch row, channel) results; the launcher sums them over batch rows.
    row_cn = (b * dim + c[:, None]) * N + n_all[None, :]
    tl.store(gA_ptr + row_cn, gA, mask=cn_ok)
    tl.store(gD_ptr + b * dim + c, gD, mask=c_ok)
    tl.store(gbias_ptr + b * dim + c, gbias, mask=c_ok)
    if not B_VARIES:
        tl.store(gB_ptr + row_cn, gB_fixed, mask=cn_ok)
    if not C_VARIES:
        tl.store(gC_ptr + row_cn, gC_fixed, mask=cn_ok)


# --- host side -----------------------------------------------------------------------------------
# Shared with `vmeanba_triton.py`, whose kernels take the inputs and gradient buffers alike.


def block_n(shape: ScanShape) -> int:
    """BLOCK_N: the state count rounded up to a power of two (tiles have power-of-two sides)."""
    return triton.next_power_of_2(max(shape.state, 1))


def optional_argument(t: Optional[Tensor], stand_in: Tensor, ndim: int) -> tuple:
    """(tensor, *strides) for an optional argument; an absent one becomes `stand_in` with zero
    strides, which the kernel never reads (its HAS_* flag is off)."""
    return (stand_in, *([0] * ndim)) if t is None else (t, *t.stride())


def scan_arguments(shape: ScanShape, u, delta, A, B, C, D, z, delta_bias) -> tuple:
    """The inputs in the kernels' argument order, each followed by its strides."""
    return (
        u, *u.stride(), delta, *delta.stride(), A, *A.stride(),
        B, *projection_strides(B, shape.b_form, shape.dim),
        C, *projection_strides(C, shape.c_form, shape.dim),
        *optional_argument(D, u, 1), *optional_argument(z, u, 3), *optional_argument(delta_bias, u, 1),
    )


def input_flags(D, z, delta_bias, delta_softplus: bool) -> dict:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(delta_softplus)}


def projection_flags(shape: ScanShape) -> dict:
    """Whether B and C vary over time (grouped or shared) or are fixed rows."""
    return {"B_VARIES": shape.b_form is not ProjectionForm.FIXED, "C_VARIES": shape.c_form is not ProjectionForm.FIXED}


def max_chunks(kernel: Any, length: int) -> int:
    """Time chunks at the shortest BLOCK_T of an autotuned kernel's configs: a scratch of
    per-chunk carries must fit whichever config the autotuner runs."""
    return triton.cdiv(length, min(config.kwargs["BLOCK_T"] for config in kernel.configs))


def forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return (y in u's dtype, last state in the math dtype), as the reference does."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, state, length = shape.batch, shape.dim, shape.state, shape.length
    y = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, state), dtype=compute_dtype_for(u), device=u.device)
    if batch * dim == 0:
        return y, last_state
    launcher(_scan_forward_kernel)[lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]), batch)](
        *scan_arguments(shape, u, delta, A, B, C, D, z, delta_bias),
        y, last_state, batch, dim, state, length,
        **input_flags(D, z, delta_bias, delta_softplus), BLOCK_N=block_n(shape),
    )
    return y, last_state


def _projection_grad(proj: Tensor, form: ProjectionForm, shape: ScanShape, math: torch.dtype):
    """Buffer for B's or C's gradient and its strides in the kernel's (sb, sg, sn, st) terms:
    time-varying forms accumulate atomically into a zeroed copy of the tensor's shape; fixed
    forms get one (dim, N) row set per batch row, summed afterwards."""
    if form is ProjectionForm.FIXED:
        rows = torch.empty((shape.batch, shape.dim, shape.state), dtype=math, device=proj.device)
        return rows, (shape.dim * shape.state, shape.state, 1, 0)
    grad = torch.zeros(proj.shape, dtype=math, device=proj.device)
    return grad, projection_strides(grad, form, shape.dim)[:4]


@dataclasses.dataclass
class GradientBuffers:
    """What a backward kernel writes: gradients of u, delta and z per element in their dtypes;
    per (batch row, channel) rows of A's, D's and delta_bias's gradients in the math dtype; B's
    and C's buffers (`_projection_grad`). `gradients` reduces them to the op's results."""

    shape: ScanShape
    u: Tensor
    delta: Tensor
    z: Optional[Tensor]
    A_rows: Tensor
    D_rows: Tensor
    bias_rows: Tensor
    B: tuple[Tensor, tuple[int, ...]]
    C: tuple[Tensor, tuple[int, ...]]

    @classmethod
    def allocate(cls, shape: ScanShape, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor],
                 zeroed_rows: bool = False) -> "GradientBuffers":
        """zeroed_rows: D's and delta_bias's rows start at zero, for a kernel that adds into them."""
        batch, dim, length = shape.batch, shape.dim, shape.length
        math, device = compute_dtype_for(u), u.device
        rows = torch.zeros if zeroed_rows else torch.empty
        return cls(
            shape,
            torch.empty((batch, dim, length), dtype=u.dtype, device=device),
            torch.empty((batch, dim, length), dtype=delta.dtype, device=device),
            None if z is None else torch.empty((batch, dim, length), dtype=z.dtype, device=device),
            torch.empty((batch, dim, shape.state), dtype=math, device=device),
            rows((batch, dim), dtype=math, device=device),
            rows((batch, dim), dtype=math, device=device),
            _projection_grad(B, shape.b_form, shape, math),
            _projection_grad(C, shape.c_form, shape, math),
        )

    def kernel_arguments(self) -> tuple:
        """The buffers in the backward kernels' argument order (gu .. gC with strides)."""
        return (self.u, self.delta, self.u if self.z is None else self.z, self.A_rows, self.D_rows, self.bias_rows,
                self.B[0], *self.B[1], self.C[0], *self.C[1])

    def gradients(self, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor]
                  ) -> list[Tensor]:
        """Gradients for (u, delta, A, B, C, D, z, delta_bias), each in its input's dtype; a
        zero-size tensor stands for an argument that was None."""

        def fixed_summed(grad: Tensor, form: ProjectionForm) -> Tensor:
            return grad.sum(0) if form is ProjectionForm.FIXED else grad

        def absent() -> Tensor:
            # One fresh placeholder per missing argument: a custom op's outputs may not alias.
            return self.u.new_empty(0)

        return [
            self.u,
            self.delta,
            self.A_rows.sum(0).to(A.dtype),
            fixed_summed(self.B[0], self.shape.b_form).to(B.dtype),
            fixed_summed(self.C[0], self.shape.c_form).to(C.dtype),
            absent() if D is None else self.D_rows.sum(0).to(D.dtype),
            absent() if self.z is None else self.z,
            absent() if delta_bias is None else self.bias_rows.sum(0).to(delta_bias.dtype),
        ]


def backward(
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
) -> list[Tensor]:
    """Gradients for (u, delta, A, B, C, D, z, delta_bias), each in its input's dtype; a
    zero-size tensor stands for an argument that was None."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    batch, dim = shape.batch, shape.dim
    kernel = _scan_backward_kernel
    chunks = max_chunks(kernel, shape.length)
    grads = GradientBuffers.allocate(shape, u, delta, B, C, z)
    states = torch.empty((batch, dim, chunks, shape.state), dtype=compute_dtype_for(u), device=u.device)
    if batch * dim > 0:
        launcher(kernel)[lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]), batch)](
            grad_y, *grad_y.stride(), *optional_argument(grad_last_state, u, 3),
            *scan_arguments(shape, u, delta, A, B, C, D, z, delta_bias),
            *grads.kernel_arguments(), states, chunks, batch, dim, shape.state, shape.length,
            HAS_GLAST=grad_last_state is not None, **input_flags(D, z, delta_bias, delta_softplus),
            **projection_flags(shape), BLOCK_N=block_n(shape),
        )
    return grads.gradients(A, B, C, D, delta_bias)
