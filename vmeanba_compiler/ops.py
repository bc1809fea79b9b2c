"""The `vmeanba::selective_scan` operator and its public Python entry point.

The scan is a `torch.library` custom op with a fake kernel, so Dynamo records it as one graph node
(no graph break, no unrolled loop over L) and the VMeanba pass can find and rewrite it. Its backward
is a second custom op, so AOT autograd never decomposes the scan into per-step work either.

Device kernels live in `vmeanba_compiler.lowering`: the portable default runs the readable
reference (any device); CPU tensors take the compiled fast path; CUDA tensors take the Triton
kernels, launched directly in eager mode and inlined into Inductor's generated code under
torch.compile (`lowering/cuda_dispatch.py` explains the two registrations at the end of this file).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .lowering import cuda_dispatch, scan_cpu
from .scan_schema import FLOAT_DTYPES, compute_dtype_for, validate_scan_args
from .lowering.scan_reference import selective_scan_reference

_GRAD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@torch.library.custom_op("vmeanba::selective_scan", mutates_args=())
def _selective_scan(
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
    """Portable kernel (any device): the sequential reference. Returns (y, last_state)."""
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan.register_kernel("cpu")
def _selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    return scan_cpu.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan.register_fake
def _selective_scan_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    shape = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    last_state = u.new_empty(shape.batch, shape.dim, shape.state, dtype=compute_dtype_for(u))
    return y, last_state


@torch.library.custom_op("vmeanba::selective_scan_backward", mutates_args=())
def _selective_scan_backward(
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
    """Portable backward: autograd through the reference. Returns gradients in `_GRAD_INPUTS` order
    (a zero-size tensor stands for an argument that was None)."""
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        y, last_state = selective_scan_reference(*leaves, delta_softplus=delta_softplus)
        outputs, grads_out = [y], [grad_y]
        if grad_last_state is not None:
            outputs.append(last_state)
            grads_out.append(grad_last_state)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(outputs, present, grads_out, allow_unused=True))
    result = []
    for leaf in leaves:
        if leaf is None:
            result.append(u.new_empty(0))
            continue
        g = next(grads)
        result.append(torch.zeros_like(leaf, memory_format=torch.contiguous_format) if g is None else g.contiguous())
    return result


@_selective_scan_backward.register_kernel("cpu")
def _selective_scan_backward_cpu(
    grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
):
    return scan_cpu.backward(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan_backward.register_fake
def _selective_scan_backward_fake(
    grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
):
    # Contiguous whatever the inputs' layout, as every kernel returns them: a transposed u or B
    # must not make Inductor expect a transposed gradient.
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty(0)
            for t in inputs]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad_y, grad_last_state):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = torch.ops.vmeanba.selective_scan_backward(
        grad_y.contiguous(),
        grad_last_state,
        u, delta, A, B, C, D, z, delta_bias,
        ctx.delta_softplus,
    )
    saved = (u, delta, A, B, C, D, z, delta_bias)
    needs = ctx.needs_input_grad[: len(saved)]
    return (*(g if (t is not None and need) else None for g, t, need in zip(grads, saved, needs)), None)


_selective_scan.register_autograd(_backward, setup_context=_setup_context)


# --- CUDA tensors: the Triton kernels (imported on first use; CPU and other devices unaffected) --
_selective_scan.register_kernel("cuda")(cuda_dispatch.forward)
_selective_scan.register_torch_dispatch(FunctionalTensorMode, cuda_dispatch.inline_forward)
_selective_scan_backward.register_kernel("cuda")(cuda_dispatch.backward)
_selective_scan_backward.register_torch_dispatch(FunctionalTensorMode, cuda_dispatch.inline_backward)


def autocast_rule(device_type: str, op: Callable) -> Callable:
    """The kernel of `op` (this op, or the reduced-site op of `reduced_op.py`, whose first two
    arguments are also u and delta and whose first result is y) for `device_type`'s autocast
    dispatch key.

    Why a rule at all: a custom op is not autocast-aware, and autocast can hand the scan `u` and
    `delta` in different dtypes (one made by a matmul or conv in the low-precision dtype, the other
    by a float32-policy op), which the op refuses outside autocast. The rule never casts down: it
    runs the op with autocast off, so the math stays float32 (float64 for float64 `u`) and `y` comes
    back in `u`'s dtype, exactly as outside autocast. Only where `u` and `delta` differ are both
    upcast to the math dtype first (exact) and `y` cast back to `u`'s dtype.
    """

    def kernel(u, delta, *args, **kwargs):
        # (the dispatcher leaves out trailing arguments that have their default values)
        with torch.autocast(device_type, enabled=False):
            mixed = u.dtype != delta.dtype and u.dtype in FLOAT_DTYPES and delta.dtype in FLOAT_DTYPES
            if not mixed:
                return op(u, delta, *args, **kwargs)
            math = compute_dtype_for(u)
            y, last_state = op(u.to(math), delta.to(math), *args, **kwargs)
            return y.to(u.dtype), last_state

    return kernel


AUTOCAST_KEYS = (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA"))
_autocast_library = torch.library.Library("vmeanba", "IMPL")
for _device_type, _dispatch_key in AUTOCAST_KEYS:
    _autocast_library.impl("selective_scan", autocast_rule(_device_type, torch.ops.vmeanba.selective_scan),
                           _dispatch_key)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Selective scan (Mamba S6), a drop-in for `mamba_ssm`'s `selective_scan_fn`.

    Shapes (docs/DESIGN.md section 1): u, delta, z (batch, dim, L); A (dim, N); B and C grouped
    (batch, G, N, L), shared (batch, N, L) or fixed (dim, N); D and delta_bias (dim,).
    Returns y (batch, dim, L) in u's dtype, and the last state (batch, dim, N, float32) when
    `return_last_state` is true. Math is float32 (float64 for float64 inputs).
    """
    y, last_state = torch.ops.vmeanba.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus
    )
    return (y, last_state) if return_last_state else y
