"""How the scan ops reach the Triton kernels for CUDA tensors.

`vmeanba::selective_scan` and its backward op (registered in `vmeanba_compiler/ops.py`) and
`vmeanba::reduced_selective_scan` and its backward op (`vmeanba_compiler/reduced_op.py`, kernels
in `vmeanba_triton.py`) each get two registrations, because eager calls and compiled graphs need
different things:

- `register_kernel("cuda")` (`forward`, `backward`, `reduced_forward`, `reduced_backward` here):
  an eager call on CUDA tensors launches the Triton kernels directly.
- a rule for `FunctionalTensorMode` (`inline_forward`, `inline_backward`, ...): when AOT autograd
  functionalises a graph for Inductor, a call on CUDA tensors is traced *into* the launcher,
  whose kernel launches are then recorded through `torch.library.wrap_triton`. Inductor sees
  user-defined Triton kernels instead of an opaque op and inlines them into its generated
  module (next to its own fused kernels, autotuned over the same configs). This is the
  mechanism `torch.library.triton_op` uses; `triton_op` itself would have to define the op,
  replacing the project's device-generic definition and its CPU kernel.

Calls on any other device fall through the rule to the default handling, so the op stays one
node and CPU graphs (and the C kernel behind them) are unchanged. `torch.export`, which keeps
custom Triton ops undecomposed for serialisation, is respected the same way `triton_op` does.
Triton is imported on the first CUDA call, so importing the package needs neither a GPU nor a
Triton driver.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor


def _kernels():
    from . import scan_triton

    return scan_triton


def _reduced_kernels():
    from . import vmeanba_triton

    return vmeanba_triton


def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The op's CUDA kernel: `scan_triton.forward`."""
    return _kernels().forward(*args, **kwargs)


def backward(*args: Any, **kwargs: Any) -> list[Tensor]:
    """The backward op's CUDA kernel: `scan_triton.backward`."""
    return _kernels().backward(*args, **kwargs)


def _decomposition_disabled() -> bool:
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return custom_triton_ops_decomposition_disabled()


def reduced_forward(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False, *, groups: int, dt_mode: str = "effective", skip_mode: str = "exact",
) -> tuple[Tensor, Tensor]:
    """The reduced-site op's CUDA kernel: `vmeanba_triton.fused_reduced_scan`."""
    return _reduced_kernels().fused_reduced_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode=dt_mode, skip_mode=skip_mode
    )


def reduced_backward(
    grad_y: Tensor, grad_last_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
    groups: int, dt_mode: str, skip_mode: str,
) -> list[Tensor]:
    """The reduced-site backward op's CUDA kernel: `vmeanba_triton.fused_reduced_scan_backward`."""
    return _reduced_kernels().fused_reduced_scan_backward(
        grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups, dt_mode, skip_mode
    )


def inline_on_cuda(launch: Callable[..., Any]) -> Callable:
    """A FunctionalTensorMode rule that traces CUDA calls into `launch` (which takes the op's
    arguments): its Triton launches are recorded, and torch ops it calls (the buffers it
    allocates, the sums over batch rows of the backward's per-row gradients) are functionalised
    like any other."""

    def rule(mode, op, types, args, kwargs):
        # args[0] is u (forward) or grad_y (backward): the op's device.
        if args[0].device.type != "cuda" or _decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from .triton_common import recording_launches

        with mode, recording_launches():
            return launch(*args, **(kwargs or {}))

    rule.__doc__ = f"FunctionalTensorMode rule: trace CUDA calls into `{launch.__name__}`."
    return rule


inline_forward = inline_on_cuda(forward)
inline_backward = inline_on_cuda(backward)
inline_reduced_forward = inline_on_cuda(reduced_forward)
inline_reduced_backward = inline_on_cuda(reduced_backward)
