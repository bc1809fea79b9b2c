"""Precision (docs/PRECISION.md): float32 accumulation for low-precision inputs, the op's autocast
rule, a model compiled under CPU autocast, and the tolerance tables stated in the docs.

Tolerances come from `vmeanba_compiler.testing` only (TOLERANCES for one op call against a float64
oracle, MODEL_TOLERANCES for a compiled model against eager execution).
"""

from __future__ import annotations

import pytest
import torch
from doc_sections import DOCS, check_generated_section
from hypothesis import given

import vmeanba_compiler as vc
from vmeanba_compiler.lowering.scan_reference import selective_scan_reference
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.passes.reduced_scan import reduced_selective_scan
from vmeanba_compiler.testing import (
    MODEL_TOLERANCES,
    TOLERANCES,
    ScanInputs,
    assert_backend_matches_eager,
    assert_scan_close,
    scan_inputs,
    vmeanba_formula,
)

LOW = (torch.bfloat16, torch.float16)


def _autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _long_inputs(dtype: torch.dtype, length: int = 2048) -> ScanInputs:
    """One long VMamba-like call (4 groups of 8 channels, N 4), drawn in float64 and cast."""
    gen = torch.Generator().manual_seed(0)
    batch, groups, dim, state = 1, 4, 32, 4

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    x = ScanInputs(
        u=randn(batch, dim, length), delta=0.5 * randn(batch, dim, length) - 2.0,
        A=-torch.exp(0.5 * randn(dim, state)), B=randn(batch, groups, state, length),
        C=randn(batch, groups, state, length), D=randn(dim), z=randn(batch, dim, length),
        delta_bias=0.1 * randn(dim), delta_softplus=True,
    )
    return x.to(dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_scan_accumulates_in_float32_over_a_long_sequence(dtype: torch.dtype) -> None:
    """2048 recurrence steps: accumulating in the input dtype would drift far beyond one rounding."""
    x = _long_inputs(dtype)
    y, last_state = vc.selective_scan(**x.kwargs(), return_last_state=True)
    y_ref, state_ref = selective_scan_reference(*x.to(torch.float64).args())
    assert y.dtype == dtype and last_state.dtype == torch.float32
    assert_scan_close(y, y_ref, dtype, what=f"y ({dtype}, L=2048)")
    assert_scan_close(last_state, state_ref, torch.float32, what="last state")


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_rewrite_accumulates_in_float32_over_a_long_sequence(dtype: torch.dtype) -> None:
    x = _long_inputs(dtype)
    y, _ = reduced_selective_scan(*x.args(), groups=4)
    assert y.dtype == dtype
    assert_scan_close(y, vmeanba_formula(x, groups=4), dtype, what=f"rewritten y ({dtype}, L=2048)")


@given(x=scan_inputs(dtypes=LOW))
def test_autocast_reconciles_u_and_delta_of_different_dtypes(x: ScanInputs) -> None:
    """Under autocast, u can come from a low-precision op and delta from a float32 one: the rule
    upcasts both (exactly), computes in float32 and returns y in u's dtype. Outside autocast
    the same call stays an error."""
    mixed = {**x.kwargs(), "delta": x.delta.float()}
    with pytest.raises(TypeError, match="'delta' has dtype torch.float32 but 'u' has"):
        vc.selective_scan(**mixed)
    with _autocast():
        y, last_state = vc.selective_scan(**mixed, return_last_state=True)
    y_ref, state_ref = selective_scan_reference(*x.to(torch.float64).args())
    assert y.dtype == x.u.dtype and last_state.dtype == torch.float32
    assert_scan_close(y, y_ref, x.u.dtype, what="y under autocast")
    assert_scan_close(last_state, state_ref, torch.float32, what="last state under autocast")


@given(x=scan_inputs(dtypes=(torch.float32, torch.float64)))
def test_autocast_never_casts_the_scan_down(x: ScanInputs) -> None:
    """The scan is not on autocast's low-precision list: in an autocast region it computes and
    returns exactly what it does outside one."""
    expected = vc.selective_scan(**x.kwargs(), return_last_state=True)
    with _autocast():
        actual = vc.selective_scan(**x.kwargs(), return_last_state=True)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e)


def test_gradients_under_autocast_reach_u_and_delta_in_their_own_dtypes() -> None:
    x = _long_inputs(torch.bfloat16, length=64)
    u = x.u.detach().requires_grad_()
    delta = x.delta.float().requires_grad_()
    with _autocast():
        y = vc.selective_scan(**{**x.kwargs(), "u": u, "delta": delta})
    y.float().square().sum().backward()
    u64, delta64 = x.u.double().requires_grad_(), x.delta.double().requires_grad_()
    y64, _ = selective_scan_reference(u64, delta64, *x.to(torch.float64).args()[2:])
    # the oracle's upstream gradient is 2*y as the op produced it (rounded to bfloat16)
    torch.autograd.backward(y64, 2 * y.detach().double())
    assert u.grad.dtype == torch.bfloat16 and delta.grad.dtype == torch.float32
    assert_scan_close(u.grad, u64.grad, torch.bfloat16, what="grad u")
    assert_scan_close(delta.grad, delta64.grad, torch.float32, what="grad delta")


def test_model_compiled_with_rewrite_under_cpu_autocast_matches_eager() -> None:
    """vmamba's SS2D hands the scan u and delta in different dtypes under CPU autocast."""
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini", depths=(1,)).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), _autocast():
        eager = model(images)
    with _autocast():
        compiled = assert_backend_matches_eager(model, images, sites=["stages.0.0.op:0"])
    assert eager.dtype == compiled.dtype == torch.bfloat16


def _tolerance_table(table: dict[torch.dtype, tuple[float, float]]) -> str:
    rows = ["| dtype | rtol | atol |", "|---|---|---|"]
    rows += [f"| {str(dtype).removeprefix('torch.')} | {rtol:.3g} | {atol:.3g} |" for dtype, (rtol, atol) in table.items()]
    return "\n".join(rows)


@pytest.mark.parametrize(("name", "table"), [("TOLERANCES", TOLERANCES), ("MODEL_TOLERANCES", MODEL_TOLERANCES)])
def test_precision_doc_states_the_tolerances_the_tests_use(name: str, table: dict) -> None:
    check_generated_section(DOCS / "PRECISION.md", name, _tolerance_table(table))
