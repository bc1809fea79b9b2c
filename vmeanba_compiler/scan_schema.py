"""The selective-scan op's argument schema: validation and canonical layout of its arguments.

Every implementation (reference, CPU kernel, Triton) and every graph pass that reads a scan node
accepts exactly the argument forms of docs/DESIGN.md section 1. This module is the one place that
checks them, so an error always names the argument, the shape it had and the shape that was
expected, whichever implementation is called. It is the bottom layer of the package (see
docs/ARCHITECTURE.md): it imports nothing of the project.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ProjectionForm(enum.Enum):
    """How B or C is laid out; see docs/DESIGN.md section 1."""

    GROUPED = "grouped"  # (batch, G, N, L): group g serves channels g*dim/G ... (g+1)*dim/G - 1
    SHARED = "shared"  # (batch, N, L): one group for all channels
    FIXED = "fixed"  # (dim, N): a constant row per channel


@dataclass(frozen=True)
class ScanShape:
    """Sizes of one selective-scan call, read off validated arguments."""

    batch: int
    dim: int
    state: int  # N, d_state
    length: int  # L
    b_form: ProjectionForm
    b_groups: int  # G for B (dim for FIXED, 1 for SHARED)
    c_form: ProjectionForm
    c_groups: int


def compute_dtype_for(u: torch.Tensor) -> torch.dtype:
    """float64 inputs compute in float64 (gradcheck); every other dtype computes in float32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _fail(name: str, tensor: torch.Tensor, expected: str) -> None:
    raise ValueError(
        f"selective_scan: argument {name!r} has shape {tuple(tensor.shape)} but expected {expected}"
    )


def _projection_form(
    name: str, t: torch.Tensor, batch: int, dim: int, state: int, length: int
) -> tuple[ProjectionForm, int]:
    expected = (
        f"(batch={batch}, G, N={state}, L={length}) with dim={dim} divisible by G, "
        f"or (batch={batch}, N={state}, L={length}), or (dim={dim}, N={state})"
    )
    if t.dim() == 4:
        groups = t.shape[1]
        if (t.shape[0], t.shape[2], t.shape[3]) != (batch, state, length) or groups < 1 or dim % groups:
            _fail(name, t, expected)
        return ProjectionForm.GROUPED, groups
    if t.dim() == 3:
        if tuple(t.shape) != (batch, state, length):
            _fail(name, t, expected)
        return ProjectionForm.SHARED, 1
    if t.dim() == 2:
        if tuple(t.shape) != (dim, state):
            _fail(name, t, expected)
        return ProjectionForm.FIXED, dim
    _fail(name, t, expected)
    raise AssertionError("unreachable")


def validate_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    *,
    strict_dtypes: bool = True,
) -> ScanShape:
    """Check every argument against docs/DESIGN.md section 1 and return the call's sizes.

    Raises ValueError (shape), TypeError (dtype) or RuntimeError (device) naming the argument.
    strict_dtypes=False accepts a `delta` whose dtype differs from `u`'s: graph passes read calls
    Dynamo recorded inside autocast regions, where the op's autocast rule reconciles the two.
    Sizes are only compared, never converted to int, so symbolic (SymInt) sizes stay symbolic.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: argument {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"selective_scan: argument {name!r} has dtype {t.dtype}; expected one of "
                "float16, bfloat16, float32, float64 (cast it with .float())"
            )
        if t.device != u.device:
            raise RuntimeError(
                f"selective_scan: argument {name!r} is on {t.device} but 'u' is on {u.device}; "
                "move all arguments to one device"
            )
    if u.dim() != 3:
        _fail("u", u, "(batch, dim, L)")
    batch, dim, length = u.shape
    if tuple(delta.shape) != (batch, dim, length):
        _fail("delta", delta, f"(batch={batch}, dim={dim}, L={length}), the shape of 'u'")
    if strict_dtypes and delta.dtype != u.dtype:
        raise TypeError(
            f"selective_scan: 'delta' has dtype {delta.dtype} but 'u' has {u.dtype}; pass both in one dtype"
        )
    if A.dim() != 2 or A.shape[0] != dim:
        _fail("A", A, f"(dim={dim}, N)")
    state = A.shape[1]
    b_form, b_groups = _projection_form("B", B, batch, dim, state, length)
    c_form, c_groups = _projection_form("C", C, batch, dim, state, length)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            _fail(name, t, f"(dim={dim},)")
    if z is not None and tuple(z.shape) != (batch, dim, length):
        _fail("z", z, f"(batch={batch}, dim={dim}, L={length}), the shape of 'u'")
    return ScanShape(batch, dim, state, length, b_form, b_groups, c_form, c_groups)


def per_channel(proj: torch.Tensor, shape: ScanShape, form: ProjectionForm) -> torch.Tensor:
    """View B or C as (batch or 1, dim, N, L or 1): the row each channel reads (broadcastable)."""
    if form is ProjectionForm.GROUPED:
        return proj.repeat_interleave(shape.dim // proj.shape[1], dim=1)
    if form is ProjectionForm.SHARED:
        return proj.unsqueeze(1)
    return proj[None, :, :, None]


def projection_strides(proj: torch.Tensor, form: ProjectionForm, dim: int) -> tuple[int, int, int, int, int]:
    """Where B or C element (batch b, channel c, state n, time t) lives, for kernels that read
    the tensor in place: offset b*sb + (c // cpg)*sg + n*sn + t*st. Returns (sb, sg, sn, st, cpg).

    One formula covers the three forms: shared B/C has no group stride (cpg = dim), fixed B/C has
    no batch or time stride (one row per channel, cpg = 1). Strides are the tensor's own, so
    transposed or sliced views need no copy.
    """
    if form is ProjectionForm.GROUPED:
        sb, sg, sn, st = proj.stride()
        return sb, sg, sn, st, dim // proj.shape[1]
    if form is ProjectionForm.SHARED:
        sb, sn, st = proj.stride()
        return sb, 0, sn, st, dim
    sg, sn = proj.stride()
    return 0, sg, sn, 0, 1
