"""Test helpers shared by this project's tests and by users checking their own scan kernels.

Two things live here, so every test compares the same way and draws the same inputs:

- `TOLERANCES` and `assert_scan_close`: the one per-dtype tolerance table and the one closeness
  check (STYLE.md items 6 and 8). A failure is always an AssertionError that says how far off the
  result is and where; it is never turned into a warning.
- `scan_inputs`: a hypothesis strategy for selective-scan arguments in every form VMEANBA.md
  section 1 allows. hypothesis is imported only when the strategy is built, so the closeness
  helpers work without it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["MODEL_TOLERANCES", "TOLERANCES", "ScanInputs", "assert_scan_close", "scan_inputs"]

# (rtol, atol) for comparing a fast implementation's output against the reference, keyed by the
# dtype of the value compared (y: u's dtype; last_state: the math dtype, float32 or float64).
#
# Why these numbers: every implementation computes in float32 (float64 for float64 inputs), so
# the only error in float32 results is float32 rounding accumulated over the L-step recurrence and
# the N-term output sum (a few hundred roundings for the shapes we test, plus the fast path's
# vectorised exp, a few ulp), and cancellation in C.h makes part of it absolute, hence atol.
# float16/bfloat16 outputs are computed in float32 and rounded once at the end, so their error is
# half an ulp of the output dtype (rtol = eps covers it with a factor 2) plus the float32 error,
# which an atol of eps dwarfs for outputs of order one. float64 differs from a float64 reference
# only by reassociation and libm vs. libmvec exp.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (torch.finfo(torch.float16).eps, torch.finfo(torch.float16).eps),  # ~9.8e-4
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, torch.finfo(torch.bfloat16).eps),  # ~7.8e-3
}


# (rtol, atol) for a whole model compiled with backend="vmeanba" against eager execution of the
# same (possibly rewritten) computation. Wider than TOLERANCES: Inductor fuses and reorders the
# surrounding work (LayerNorm and matmul reductions, fused elementwise chains), and for
# bfloat16/float16 it keeps fused intermediates in float32 where eager rounds after every op, so
# differences of a few output ulps accumulate through the network's depth.
MODEL_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def _format_index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))


def assert_scan_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, (rtol, atol) from
    `TOLERANCES[dtype]`.

    `dtype` names the precision the result was produced in (not necessarily either tensor's
    dtype: the expected value is usually a float64 oracle). Both tensors are compared in float64,
    so a float16 result can be checked against a float64 reference directly. NaN never matches
    anything (a NaN in a result is a bug, e.g. a read of memory the kernel never wrote); equal
    infinities match. On failure raises AssertionError naming `what`, the number of mismatches,
    the worst element (index, values, errors) and the largest absolute and relative errors.
    """
    if dtype not in TOLERANCES:
        raise KeyError(f"assert_scan_close: no tolerance for {dtype}; known: {list(TOLERANCES)}")
    rtol, atol = TOLERANCES[dtype]
    label = f"{what}: " if what else ""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{label}shape {tuple(actual.shape)} differs from the expected {tuple(expected.shape)}"
        )
    if actual.numel() == 0:
        return
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    bad = ~((diff <= allowed) | (a == e))  # NaN compares false, so it is always bad
    if not bool(bad.any()):
        return
    # Rank mismatches by how many times over the allowance they are; NaN ranks worst.
    excess = torch.where(bad, (diff / allowed).nan_to_num(nan=math.inf), torch.zeros_like(diff))
    abs_err = diff.flatten()
    rel_err = (diff / e.abs()).flatten()
    worst = int(excess.flatten().argmax())
    max_abs = int(abs_err.nan_to_num(nan=math.inf).argmax())
    max_rel = int(rel_err.nan_to_num(nan=math.inf).argmax())
    shape = tuple(a.shape)
    flat_a, flat_e = a.flatten(), e.flatten()
    raise AssertionError(
        f"{label}{int(bad.sum())} of {a.numel()} elements differ beyond rtol={rtol:g}, "
        f"atol={atol:g} ({dtype}).\n"
        f"  worst at {_format_index(worst, shape)}: actual {flat_a[worst].item()!r}, "
        f"expected {flat_e[worst].item()!r} (abs err {abs_err[worst].item():.3g}, "
        f"rel err {rel_err[worst].item():.3g})\n"
        f"  max abs err {abs_err[max_abs].item():.3g} at {_format_index(max_abs, shape)}; "
        f"max rel err {rel_err[max_rel].item():.3g} at {_format_index(max_rel, shape)}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ScanInputs:
    """One call's arguments to the selective scan (VMEANBA.md section 1).

    `args()` gives them positionally in the op's order (`torch.ops.vmeanba.selective_scan(*args)`,
    the reference, `scan_cpu.forward`); `kwargs()` by name for `vmeanba_compiler.selective_scan`.
    `seed` is the torch.Generator seed the values were drawn with (for reading failures; it is
    not an argument).
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor] = None
    z: Optional[Tensor] = None
    delta_bias: Optional[Tensor] = None
    delta_softplus: bool = False
    seed: Optional[int] = None

    _TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def args(self) -> tuple[Any, ...]:
        """(u, delta, A, B, C, D, z, delta_bias, delta_softplus)."""
        return (*(getattr(self, name) for name in self._TENSORS), self.delta_softplus)

    def kwargs(self) -> dict[str, Any]:
        """The same arguments by name (without return_last_state)."""
        return {**{name: getattr(self, name) for name in self._TENSORS}, "delta_softplus": self.delta_softplus}

    def to(self, dtype: torch.dtype) -> "ScanInputs":
        """Every tensor cast to `dtype`: the float64 copy is the oracle's input, computed from the
        very values the lower-precision call saw."""
        cast = {
            name: (None if t is None else t.to(dtype))
            for name, t in ((n, getattr(self, n)) for n in self._TENSORS)
        }
        return dataclasses.replace(self, **cast)

    def __repr__(self) -> str:
        def describe(t: Optional[Tensor]) -> str:
            return "None" if t is None else f"{tuple(t.shape)}"

        parts = ", ".join(f"{name}={describe(getattr(self, name))}" for name in self._TENSORS)
        return (
            f"ScanInputs({parts}, delta_softplus={self.delta_softplus}, "
            f"dtype={self.u.dtype}, seed={self.seed})"
        )


_FORMS = ("grouped", "shared", "fixed")
_DEFAULT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _import_hypothesis():
    try:
        from hypothesis import strategies
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "vmeanba_compiler.testing.scan_inputs needs hypothesis: "
            "pip install 'vmeanba-compiler[test]'"
        ) from exc
    return strategies


def _projection(form: str, groups: int, batch: int, dim: int, state: int, length: int, gen) -> Tensor:
    shape = {
        "grouped": (batch, groups, state, length),
        "shared": (batch, state, length),
        "fixed": (dim, state),
    }[form]
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def scan_inputs(
    max_batch: int = 2,
    max_dim: int = 16,
    max_state: int = 8,
    max_length: int = 40,
    dtypes: Sequence[torch.dtype] = _DEFAULT_DTYPES,
    forms: Sequence[str] = _FORMS,
):
    """A hypothesis strategy of `ScanInputs` covering the argument forms of VMEANBA.md section 1.

    Drawn independently: batch, dim = groups * channels_per_group, the form of B and of C (each
    with its own group count, a divisor of dim, when grouped), N, L, dtype, and whether D, z and
    delta_bias are given and delta_softplus is set. Values come from a torch.Generator seeded by
    a drawn integer, so every example replays exactly (the global RNG is never touched):
    u, B, C, D, z ~ randn; A = -exp(0.5 * randn) (negative: a decaying state); the raw delta is
    0.5 * randn with softplus, 0.5 * rand + 0.01 without, and delta_bias keeps dt positive
    without softplus, so dt stays moderate and the recurrence neither explodes nor vanishes.
    Values are drawn in float64 and cast to the drawn dtype.
    """
    st = _import_hypothesis()
    unknown = set(forms) - set(_FORMS)
    if unknown or not forms:
        raise ValueError(f"scan_inputs: forms must be a non-empty subset of {_FORMS}, got {forms}")

    @st.composite
    def draw_inputs(draw) -> ScanInputs:
        batch = draw(st.integers(1, max_batch))
        groups = draw(st.integers(1, max(1, min(4, max_dim))))
        per_group = draw(st.integers(1, max(1, max_dim // groups)))
        dim = groups * per_group
        divisors = [g for g in range(1, dim + 1) if dim % g == 0]
        state = draw(st.integers(1, max_state))
        length = draw(st.integers(1, max_length))
        dtype = draw(st.sampled_from(tuple(dtypes)))
        b_form, c_form = draw(st.sampled_from(tuple(forms))), draw(st.sampled_from(tuple(forms)))
        b_groups = groups if b_form != "grouped" else draw(st.sampled_from(divisors))
        c_groups = groups if c_form != "grouped" else draw(st.sampled_from(divisors))
        softplus = draw(st.booleans())
        has_d, has_z, has_bias = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        seed = draw(st.integers(0, 2**32 - 1))

        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        u = torch.randn(batch, dim, length, generator=gen, dtype=f64)
        if softplus:
            delta = 0.5 * torch.randn(batch, dim, length, generator=gen, dtype=f64)
        else:
            delta = 0.5 * torch.rand(batch, dim, length, generator=gen, dtype=f64) + 0.01
        A = -torch.exp(0.5 * torch.randn(dim, state, generator=gen, dtype=f64))
        B = _projection(b_form, b_groups, batch, dim, state, length, gen)
        C = _projection(c_form, c_groups, batch, dim, state, length, gen)
        D = torch.randn(dim, generator=gen, dtype=f64) if has_d else None
        z = torch.randn(batch, dim, length, generator=gen, dtype=f64) if has_z else None
        bias = None
        if has_bias:
            raw = torch.randn(dim, generator=gen, dtype=f64) if softplus else torch.rand(dim, generator=gen, dtype=f64)
            bias = 0.5 * raw if softplus else 0.1 * raw
        return ScanInputs(u, delta, A, B, C, D, z, bias, softplus, seed).to(dtype)

    return draw_inputs()
