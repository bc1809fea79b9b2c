"""The `vmeanba::reduced_selective_scan` operator: one VMeanba-reduced scan site as one node.

A rewritten site (docs/DESIGN.md section 2) is group means of u and the step, a scan of one
channel per group, the broadcast back, the D*u skip and the silu(z) gate. As separate graph
pieces these read and write full-width tensors several times, which costs more than the reduced
scan itself; as one op each device runs it fused:

- CPU: `lowering/reduced_scan_cpu.c`, one pass over u, delta (and z) per (batch row, group);
- CUDA: `lowering/vmeanba_triton.py`'s fused kernels (forward and backward), launched directly in
  eager mode and inlined into Inductor's generated code under torch.compile
  (`lowering/cuda_dispatch.py`);
- other devices: the composition of `lowering/reduced_scan.py` around the full scan op.

The op takes the full op's arguments plus `groups`, `dt_mode` and `skip_mode` (keyword-only,
plain ints and strings so FX graphs can spell them) and returns what the full op returns: y in
u's dtype, shaped and laid out like u, and the last state (batch, dim, N) in the math dtype. The
backward is an op of its own: on CUDA the fused Triton backward kernel; on other devices the chain
rule of `lowering/reduced_scan.py` around the full scan's backward op. An autocast rule
reconciles u and delta of different dtypes the way the full op's does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .lowering import cuda_dispatch, reduced_scan_cpu
from .lowering.reduced_scan import check_reduction, reduced_scan_backward, reduced_scan_composed
from .ops import AUTOCAST_KEYS, autocast_rule
from .rewrite_modes import DEFAULT_DT_MODE, DEFAULT_SKIP_MODE
from .scan_schema import compute_dtype_for, validate_scan_args

_TENSOR_ARGS = 8  # u, delta, A, B, C, D, z, delta_bias


@torch.library.custom_op("vmeanba::reduced_selective_scan", mutates_args=())
def _reduced_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    *,
    groups: int,
    dt_mode: str = DEFAULT_DT_MODE,
    skip_mode: str = DEFAULT_SKIP_MODE,
) -> tuple[Tensor, Tensor]:
    """Portable kernel (any device): the composition around the full scan op."""
    return reduced_scan_composed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode, skip_mode,
                                 torch.ops.vmeanba.selective_scan)


@_reduced_selective_scan.register_kernel("cpu")
def _reduced_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, groups,
                 dt_mode=DEFAULT_DT_MODE, skip_mode=DEFAULT_SKIP_MODE):
    return reduced_scan_cpu.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode, skip_mode)


@_reduced_selective_scan.register_fake
def _reduced_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, groups,
                  dt_mode=DEFAULT_DT_MODE, skip_mode=DEFAULT_SKIP_MODE):
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_reduction(shape, groups, dt_mode, skip_mode)
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    return y, u.new_empty(shape.batch, shape.dim, shape.state, dtype=compute_dtype_for(u))


@torch.library.custom_op("vmeanba::reduced_selective_scan_backward", mutates_args=())
def _reduced_backward(
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
    dt_mode: str,
    skip_mode: str,
) -> list[Tensor]:
    """Gradients for (u, delta, A, B, C, D, z, delta_bias), contiguous, in the inputs' dtypes (a
    zero-size tensor for an argument that was None). Portable kernel (CPU and other devices): the
    chain rule around the full scan's ops."""
    return _backward_composition(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 groups, dt_mode, skip_mode)


def _backward_composition(*args) -> list[Tensor]:
    """The backward op's arguments -> `lowering.reduced_scan.reduced_scan_backward` on the scan ops."""
    return reduced_scan_backward(*args, torch.ops.vmeanba.selective_scan, torch.ops.vmeanba.selective_scan_backward)


@_reduced_backward.register_fake
def _reduced_backward_fake(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups,
                           dt_mode, skip_mode):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty(0)
            for t in (u, delta, A, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs[:_TENSOR_ARGS])
    ctx.delta_softplus = inputs[_TENSOR_ARGS]
    ctx.modes = (keyword_only_inputs["groups"], keyword_only_inputs.get("dt_mode", DEFAULT_DT_MODE),
                 keyword_only_inputs.get("skip_mode", DEFAULT_SKIP_MODE))


def _backward(ctx, grad_y, grad_last_state):
    saved = ctx.saved_tensors
    grads = torch.ops.vmeanba.reduced_selective_scan_backward(
        grad_y.contiguous(), grad_last_state, *saved, ctx.delta_softplus, *ctx.modes
    )
    needs = ctx.needs_input_grad[:_TENSOR_ARGS]
    return (*(g if (t is not None and need) else None for g, t, need in zip(grads, saved, needs)), None)


_reduced_selective_scan.register_autograd(_backward, setup_context=_setup_context)

# CUDA: the fused Triton kernels, forward and backward, inlined into Inductor's code under torch.compile.
_reduced_selective_scan.register_kernel("cuda")(cuda_dispatch.reduced_forward)
_reduced_selective_scan.register_torch_dispatch(FunctionalTensorMode, cuda_dispatch.inline_reduced_forward)
_reduced_backward.register_kernel("cuda")(cuda_dispatch.reduced_backward)
_reduced_backward.register_torch_dispatch(FunctionalTensorMode, cuda_dispatch.inline_reduced_backward)

_autocast_library = torch.library.Library("vmeanba", "IMPL")
for _device_type, _dispatch_key in AUTOCAST_KEYS:
    _autocast_library.impl("reduced_selective_scan",
                           autocast_rule(_device_type, torch.ops.vmeanba.reduced_selective_scan), _dispatch_key)
