"""Assertions shared by the Triton interpreter cases (CPU, child process) and the GPU tests.

Each runs a Triton kernel on `device` and compares it with the float64 reference, using only
`vmeanba_compiler.testing`'s tolerances and closeness check. Kept apart from both test modules
so the same checks run under the interpreter and on a GPU. Importing it imports Triton: the
interpreter cases import it only after TRITON_INTERPRET=1 is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
from torch import Tensor

from vmeanba_compiler.lowering import scan_triton, vmeanba_triton
from vmeanba_compiler.scan_schema import compute_dtype_for
from vmeanba_compiler.lowering.scan_reference import selective_scan_reference
from vmeanba_compiler.lowering.reduced_scan import reduced_scan_reference
from vmeanba_compiler.testing import ScanInputs, assert_scan_close, vmeanba_formula

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@contextlib.contextmanager
def nan_filled_buffers() -> Iterator[None]:
    """torch.empty returns NaN-filled memory inside this block (deterministic mode's
    fill_uninitialized_memory), so a kernel that leaves an output element unwritten fails the
    closeness check instead of passing on leftover zeros."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def on_device(x: ScanInputs, device: str) -> ScanInputs:
    """x with every tensor moved to `device`."""
    moved = {name: None if t is None else t.to(device) for name, t in zip(GRAD_NAMES, x.args())}
    return dataclasses.replace(x, **moved)


def strided(x: ScanInputs) -> ScanInputs:
    """The same values with every tensor a non-contiguous view (its last two axes stored
    transposed; 1-D tensors every other element of a buffer twice as long)."""

    def view(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        if t.dim() == 1:
            return torch.stack([t, torch.full_like(t, float("nan"))], 1)[:, 0]
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    return dataclasses.replace(x, **{name: view(t) for name, t in zip(GRAD_NAMES, x.args())})


def reference_gradients(x: ScanInputs, grad_y: Tensor, grad_last: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Autograd through the float64 reference on x's values (on the CPU); None where x has None."""
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in x.args()[:-1]]
    y, last_state = selective_scan_reference(*leaves, delta_softplus=x.delta_softplus)
    outputs, grads_out = [y], [grad_y.cpu().double()]
    if grad_last is not None:
        outputs.append(last_state)
        grads_out.append(grad_last.cpu().double())
    grads = iter(torch.autograd.grad(outputs, [t for t in leaves if t is not None], grads_out))
    return [None if leaf is None else next(grads) for leaf in leaves]


def assert_forward_matches_reference(x: ScanInputs, device: str) -> None:
    with nan_filled_buffers():
        y, last_state = scan_triton.forward(*on_device(x, device).args())
    y_ref, last_ref = selective_scan_reference(*x.to(torch.float64).args())
    assert y.dtype == x.u.dtype and y.is_contiguous()
    assert_scan_close(y, y_ref, x.u.dtype, f"y of {x}")
    assert_scan_close(last_state, last_ref, compute_dtype_for(x.u), f"last_state of {x}")


def assert_backward_matches_reference(x: ScanInputs, grad_seed: int, with_last_state: bool, device: str) -> None:
    gen = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(x.u.shape, generator=gen, dtype=torch.float64).to(x.u.dtype)
    grad_last = None
    if with_last_state:
        grad_last = torch.randn(*x.u.shape[:2], x.A.shape[1], generator=gen, dtype=torch.float64)
        grad_last = grad_last.to(compute_dtype_for(x.u))
    with nan_filled_buffers():
        grads = scan_triton.backward(
            grad_y.to(device), None if grad_last is None else grad_last.to(device), *on_device(x, device).args()
        )
    expected = reference_gradients(x, grad_y, grad_last)
    for name, got, want, given in zip(GRAD_NAMES, grads, expected, x.args()):
        if given is None:
            assert got.numel() == 0, f"grad of absent {name} should be an empty placeholder"
            continue
        assert got.dtype == given.dtype and got.shape == given.shape, f"grad of {name}: {got.dtype} {got.shape}"
        assert_scan_close(got, want, x.u.dtype, f"grad of {name}, {x}")


def assert_fused_matches_reduced_site(
    x: ScanInputs, groups: int, device: str, dt_mode: str = "effective", skip_mode: str = "exact"
) -> None:
    """y against the independent float64 evaluation of docs/DESIGN.md section 2, and the last state
    against the reduced site's reference composition (`reduced_scan_reference`) in float64."""
    with nan_filled_buffers():
        y, last_state = vmeanba_triton.fused_reduced_scan(
            *on_device(x, device).args(), groups, dt_mode=dt_mode, skip_mode=skip_mode
        )
    modes = {"groups": groups, "dt_mode": dt_mode, "skip_mode": skip_mode}
    _, last_ref = reduced_scan_reference(*x.to(torch.float64).args(), **modes)
    assert y.dtype == x.u.dtype and y.is_contiguous()
    assert_scan_close(y, vmeanba_formula(x, groups, dt_mode, skip_mode), x.u.dtype, f"fused y ({modes}) of {x}")
    assert_scan_close(last_state, last_ref, compute_dtype_for(x.u), f"fused last_state ({modes}) of {x}")


def assert_fused_site_backward_matches_reference(
    x: ScanInputs, groups: int, dt_mode: str, skip_mode: str, grad_seed: int, device: str,
    with_last_state: bool = True,
) -> None:
    """The fused backward kernel (`vmeanba_triton.fused_reduced_scan_backward`) on `device` against
    autograd through the float64 reference composition (`reduced_scan_reference`), on the same
    values: the output gradient is drawn in u's dtype, the last state's in the math dtype.
    Tolerances: `TOLERANCES` of u's dtype (the kernel computes in the math dtype and rounds each
    gradient once, like the forward)."""
    gen = torch.Generator().manual_seed(grad_seed)
    math = compute_dtype_for(x.u)
    grad_y = torch.randn(x.u.shape, generator=gen, dtype=torch.float64).to(x.u.dtype)
    grad_last = torch.randn(*x.u.shape[:2], x.A.shape[1], generator=gen, dtype=torch.float64).to(math)
    with nan_filled_buffers():
        grads = vmeanba_triton.fused_reduced_scan_backward(
            grad_y.to(device), grad_last.to(device) if with_last_state else None, *on_device(x, device).args(),
            groups, dt_mode, skip_mode,
        )
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in x.args()[:-1]]
    y, last_state = reduced_scan_reference(*leaves, x.delta_softplus, groups=groups, dt_mode=dt_mode,
                                           skip_mode=skip_mode)
    outputs, seeds = [y], [grad_y.double()]
    if with_last_state:
        outputs.append(last_state)
        seeds.append(grad_last.double())
    present = [t for t in leaves if t is not None]
    expected = iter(torch.autograd.grad(outputs, present, seeds, allow_unused=True))
    for name, got, leaf, given in zip(GRAD_NAMES, grads, leaves, x.args()):
        if leaf is None:
            assert got.numel() == 0, f"grad of absent {name} should be an empty placeholder"
            continue
        want = next(expected)
        want = torch.zeros_like(leaf) if want is None else want
        assert got.dtype == given.dtype and got.shape == given.shape, f"grad of {name}: {got.dtype} {got.shape}"
        assert_scan_close(got, want, x.u.dtype, f"grad of {name} ({dt_mode}, {skip_mode}, groups={groups}), {x}")
