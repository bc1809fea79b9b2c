"""Fast CPU selective scan: the C kernel of `selective_scan_cpu.c`, split over threads.

Channels are independent, so the channel range is cut into one contiguous block per thread
(`torch.get_num_threads()`); ctypes drops the GIL while the kernel runs, so the blocks run in
parallel. Math is float32 (float64 for float64 inputs); results are cast back to the inputs'
dtypes, and non-contiguous inputs are copied into the layout the kernel reads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .native_build import load_kernels
from ..scan_schema import ProjectionForm, ScanShape, compute_dtype_for, validate_scan_args

_pool: Optional[ThreadPoolExecutor] = None


def work_blocks(count: int) -> list[tuple[int, int]]:
    """`count` independent items (channels, or (batch, group) pairs) cut into one contiguous
    block per thread."""
    workers = max(1, min(torch.get_num_threads(), count))
    edges = [count * i // workers for i in range(workers + 1)]
    return list(zip(edges[:-1], edges[1:]))


def run_blocks(kernel: Callable, blocks: Sequence[tuple[int, int]], args_for: Callable) -> None:
    """Run `kernel(*args_for(worker, begin, end))` for every block, in parallel."""
    global _pool
    if len(blocks) == 1:
        kernel(*args_for(0, *blocks[0]))
        return
    if _pool is None or _pool._max_workers < len(blocks):
        _pool = ThreadPoolExecutor(max_workers=len(blocks), thread_name_prefix="vmeanba-scan")
    futures = [_pool.submit(kernel, *args_for(i, b, e)) for i, (b, e) in enumerate(blocks)]
    for future in futures:
        future.result()


def _kernel_layout(proj: Tensor, form: ProjectionForm, shape: ScanShape, math: torch.dtype):
    """B or C with the state axis last and contiguous, plus the kernel's (sb, sg, st, cpg)."""
    n, length = shape.state, shape.length
    if form is ProjectionForm.FIXED:  # (dim, N): same row at every batch and time
        return proj.to(math).contiguous(), (0, n, 0, 1)
    laid = proj.to(math).transpose(-1, -2).contiguous()  # (batch, [G,] L, N)
    if form is ProjectionForm.SHARED:
        return laid, (length * n, 0, n, shape.dim)
    groups = proj.shape[1]
    return laid, (groups * length * n, length * n, n, shape.dim // groups)


def _from_kernel_layout(grad: Tensor, form: ProjectionForm, dtype: torch.dtype) -> Tensor:
    if form is not ProjectionForm.FIXED:
        grad = grad.transpose(-1, -2)
    return grad.to(dtype).contiguous()


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    math = compute_dtype_for(u)
    dense = [None if t is None else t.to(math).contiguous() for t in (u, delta, A, D, z, delta_bias)]
    B_k, B_strides = _kernel_layout(B, shape.b_form, shape, math)
    C_k, C_strides = _kernel_layout(C, shape.c_form, shape, math)
    lib = load_kernels("double" if math == torch.float64 else "float")
    return shape, math, lib, dense, (B_k, B_strides), (C_k, C_strides)


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
    shape, math, lib, dense, (B_k, B_s), (C_k, C_s) = _prepare(u, delta, A, B, C, D, z, delta_bias)
    u_k, delta_k, A_k, D_k, z_k, bias_k = dense
    y = torch.empty(shape.batch, shape.dim, shape.length, dtype=math)
    last_state = torch.empty(shape.batch, shape.dim, shape.state, dtype=math)
    blocks = work_blocks(shape.dim)
    scratch = torch.empty(len(blocks), shape.length, dtype=math)
    sizes = (shape.batch, shape.dim, shape.state, shape.length)

    def args_for(worker: int, begin: int, end: int):
        return (
            u_k.data_ptr(), delta_k.data_ptr(), A_k.data_ptr(),
            B_k.data_ptr(), *B_s, C_k.data_ptr(), *C_s,
            _ptr(D_k), _ptr(z_k), _ptr(bias_k), int(delta_softplus),
            y.data_ptr(), last_state.data_ptr(), scratch[worker].data_ptr(), *sizes, begin, end,
        )

    run_blocks(lib.scan_forward, blocks, args_for)
    return y.to(u.dtype), last_state


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
    shape, math, lib, dense, (B_k, B_s), (C_k, C_s) = _prepare(u, delta, A, B, C, D, z, delta_bias)
    u_k, delta_k, A_k, D_k, z_k, bias_k = dense
    gy = grad_y.to(math).contiguous()
    g_last = None if grad_last_state is None else grad_last_state.to(math).contiguous()
    blocks = work_blocks(shape.dim)
    workers = len(blocks)
    g_u, g_delta = torch.empty_like(u_k), torch.empty_like(delta_k)
    g_A = torch.zeros_like(A_k)
    g_D = torch.zeros(shape.dim, dtype=math)
    g_bias = torch.zeros(shape.dim, dtype=math)
    g_z = None if z_k is None else torch.empty_like(z_k)
    # B and C gradients sum over the channels of a group, which span workers: one buffer each.
    g_B = B_k.new_zeros(workers, *B_k.shape)
    g_C = C_k.new_zeros(workers, *C_k.shape)
    scratch = u_k.new_empty(workers, (2 * shape.state + 1) * shape.length)
    sizes = (shape.batch, shape.dim, shape.state, shape.length)

    def args_for(worker: int, begin: int, end: int):
        return (
            gy.data_ptr(), _ptr(g_last),
            u_k.data_ptr(), delta_k.data_ptr(), A_k.data_ptr(),
            B_k.data_ptr(), *B_s, C_k.data_ptr(), *C_s,
            _ptr(D_k), _ptr(z_k), _ptr(bias_k), int(delta_softplus),
            g_u.data_ptr(), g_delta.data_ptr(), g_A.data_ptr(),
            g_B[worker].data_ptr(), g_C[worker].data_ptr(), g_D.data_ptr(), _ptr(g_z),
            g_bias.data_ptr(), scratch[worker].data_ptr(), *sizes, begin, end,
        )

    run_blocks(lib.scan_backward, blocks, args_for)

    def absent() -> Tensor:
        # A fresh zero-size tensor per missing argument: a custom op's outputs may not alias
        # each other, so one shared placeholder breaks backward when two arguments are None.
        return u.new_empty(0)

    return [
        g_u.to(u.dtype),
        g_delta.to(delta.dtype),
        g_A.to(A.dtype),
        _from_kernel_layout(g_B.sum(0), shape.b_form, B.dtype),
        _from_kernel_layout(g_C.sum(0), shape.c_form, C.dtype),
        absent() if D is None else g_D.to(D.dtype),
        absent() if z is None else g_z.to(z.dtype),
        absent() if delta_bias is None else g_bias.to(delta_bias.dtype),
    ]
