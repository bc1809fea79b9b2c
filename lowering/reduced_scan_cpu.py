"""Fused CPU kernel of a reduced scan site: `reduced_scan_cpu.c`, split over threads.

The work items are the (batch row, group) pairs: each reads its group's channels once and writes
them once, and items share nothing. The kernel runs them on OpenMP threads, which are torch's own
intra-op threads (`torch.get_num_threads()`; reduced_scan_cpu.c says why not a Python pool). Math
is float32 (float64 for float64 inputs); inputs in other dtypes or layouts are converted to the
contiguous math-dtype layout the kernel reads (a no-op for the float32 contiguous tensors a
compiled model passes); B and C are read in place through their strides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..scan_schema import compute_dtype_for, projection_strides, validate_scan_args
from .native_build import load_kernels
from .reduced_scan import check_reduction


def forward(
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
    dt_mode: str,
    skip_mode: str,
) -> tuple[Tensor, Tensor]:
    """(y in u's dtype, last state (batch, dim, N) in the math dtype), as
    `reduced_scan.reduced_scan_reference` returns them."""
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_reduction(shape, groups, dt_mode, skip_mode)
    math = compute_dtype_for(u)
    y = torch.empty(shape.batch, shape.dim, shape.length, dtype=math)
    last_state = torch.empty(shape.batch, shape.dim, shape.state, dtype=math)
    if y.numel() == 0 and last_state.numel() == 0:
        return y.to(u.dtype), last_state
    u_k, delta_k, A_k, D_k, z_k, bias_k = (
        None if t is None else t.to(math).contiguous() for t in (u, delta, A, D, z, delta_bias)
    )
    # B and C are read in place through their strides (only a dtype change copies them).
    B_k, C_k = B.to(math), C.to(math)
    B_s, C_s = projection_strides(B_k, shape.b_form, shape.dim), projection_strides(C_k, shape.c_form, shape.dim)
    lib = load_kernels("double" if math == torch.float64 else "float")
    flags = (int(delta_softplus), int(dt_mode == "raw"), int(skip_mode == "mean"))
    sizes = (shape.batch, shape.dim, shape.state, shape.length, groups)
    lib.reduced_scan_forward(
        u_k.data_ptr(), delta_k.data_ptr(), A_k.data_ptr(), B_k.data_ptr(), *B_s, C_k.data_ptr(), *C_s,
        *(None if t is None else t.data_ptr() for t in (D_k, z_k, bias_k)), *flags,
        y.data_ptr(), last_state.data_ptr(), *sizes, 0, shape.batch * groups,
    )
    return y.to(u.dtype), last_state
