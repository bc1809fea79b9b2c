"""How `vmeanba::selective_scan` and its backward op reach the Triton kernels for CUDA tensors.

Each op gets two registrations (made in `vmeanba_compiler/ops.py`), because eager calls and
compiled graphs need different things:

- `register_kernel("cuda")` (`forward`, `backward` here): an eager call on CUDA tensors
  launches the kernels of `scan_triton.py` directly.
- a rule for `FunctionalTensorMode` (`inline_forward`, `inline_backward`): when AOT autograd
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

from typing import Any, Callable

from torch import Tensor


def _kernels():
    from . import scan_triton

    return scan_triton


def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The op's CUDA kernel: `scan_triton.forward`."""
    return _kernels().forward(*args, **kwargs)


def backward(*args: Any, **kwargs: Any) -> list[Tensor]:
    """The backward op's CUDA kernel: `scan_triton.backward`."""
    return _kernels().backward(*args, **kwargs)


def _decomposition_disabled() -> bool:
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return custom_triton_ops_decomposition_disabled()


def _inline_on_cuda(launcher_name: str) -> Callable:
    def rule(mode, op, types, args, kwargs):
        # args[0] is u (forward) or grad_y (backward): the op's device.
        if args[0].device.type != "cuda" or _decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from .triton_common import recording_launches

        with mode, recording_launches():
            return getattr(_kernels(), launcher_name)(*args, **(kwargs or {}))

    rule.__doc__ = f"FunctionalTensorMode rule: trace CUDA calls into `scan_triton.{launcher_name}`."
    return rule


inline_forward = _inline_on_cuda("forward")
inline_backward = _inline_on_cuda("backward")
