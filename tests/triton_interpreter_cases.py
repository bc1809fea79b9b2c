"""The Triton kernels on CPU tensors under the Triton interpreter, against the float64 reference.

Not collected by the main test run (the name does not start with test_): tests/test_triton_kernels.py
runs this file in a child pytest process with TRITON_INTERPRET=1, which Triton reads when the
kernels are decorated, i.e. before this process imports Triton. Shapes are small (the interpreter
runs each tile operation in numpy, a scan element by element): the kernels' interpreter config
(4 channels x 8 steps per tile) still makes them span several channel blocks and time chunks.
"""

from __future__ import annotations

import itertools
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_triton_kernels.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import triton_checks  # noqa: E402
from vmeanba_compiler.rewrite_modes import DT_MODES, SKIP_MODES  # noqa: E402
from vmeanba_compiler.testing import ScanInputs, scan_inputs, site_groups  # noqa: E402

SMALL = {"max_batch": 2, "max_dim": 8, "max_state": 4, "max_length": 12}


@settings(max_examples=25)
@given(x=scan_inputs(**SMALL))
def test_forward_matches_reference(x: ScanInputs) -> None:
    triton_checks.assert_forward_matches_reference(x, "cpu")


@settings(max_examples=15)
@given(
    x=scan_inputs(**SMALL, dtypes=(torch.float32, torch.float64)),
    grad_seed=st.integers(0, 2**32 - 1),
    with_last_state=st.booleans(),
)
def test_backward_matches_autograd_through_reference(x: ScanInputs, grad_seed: int, with_last_state: bool) -> None:
    triton_checks.assert_backward_matches_reference(x, grad_seed, with_last_state, "cpu")


def _reduction(x: ScanInputs, data: st.DataObject) -> tuple[int, str, str]:
    """A group count the site allows (a multiple of B's and C's that divides dim) and the modes."""
    dim, base = x.u.shape[1], site_groups(x)
    groups = data.draw(st.sampled_from([g for g in range(base, dim + 1, base) if dim % g == 0]), label="groups")
    return groups, data.draw(st.sampled_from(DT_MODES), label="dt_mode"), data.draw(st.sampled_from(SKIP_MODES),
                                                                                      label="skip_mode")


@settings(max_examples=20)
@given(x=scan_inputs(**SMALL), data=st.data())
def test_fused_site_matches_reduced_scan(x: ScanInputs, data: st.DataObject) -> None:
    groups, dt_mode, skip_mode = _reduction(x, data)
    triton_checks.assert_fused_matches_reduced_site(x, groups, "cpu", dt_mode, skip_mode)


@settings(max_examples=8)
@given(x=scan_inputs(**SMALL), data=st.data(), grad_seed=st.integers(0, 2**32 - 1), with_last_state=st.booleans())
def test_fused_site_backward_matches_reference(x: ScanInputs, data: st.DataObject, grad_seed: int,
                                               with_last_state: bool) -> None:
    groups, dt_mode, skip_mode = _reduction(x, data)
    triton_checks.assert_fused_site_backward_matches_reference(x, groups, dt_mode, skip_mode, grad_seed, "cpu",
                                                              with_last_state)


def _tiny_site(options: bool, dtype: torch.dtype) -> ScanInputs:
    """One batch row, 2 groups of 2 channels, 10 steps (two chunks): with `options`, D, z, a bias,
    softplus, grouped B and fixed C; without, none of them, shared B and grouped C."""
    gen = torch.Generator().manual_seed(int(options))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    u, A = randn(1, 4, 10), -torch.exp(0.5 * randn(4, 3))
    if options:
        x = ScanInputs(u, 0.5 * randn(1, 4, 10), A, randn(1, 2, 3, 10), randn(4, 3), randn(4), randn(1, 4, 10),
                       0.5 * randn(4), True)
    else:
        x = ScanInputs(u, 0.5 * torch.rand(1, 4, 10, generator=gen, dtype=torch.float64) + 0.01, A,
                       randn(1, 3, 10), randn(1, 2, 3, 10))
    return x.to(dtype)


def test_fused_site_backward_in_every_mode_with_and_without_options() -> None:
    """Every (dt_mode, skip_mode) with all optional inputs and with none, a fixed grid so no
    combination is left to chance; the storage dtype cycles through float32, bfloat16 and float16,
    so each meets both option sets (the hypothesis case above draws the rest, float64 too)."""
    dtypes = itertools.cycle((torch.float32, torch.bfloat16, torch.float16))
    for dt_mode, skip_mode, options in itertools.product(DT_MODES, SKIP_MODES, (True, False)):
        x = _tiny_site(options, next(dtypes))
        triton_checks.assert_fused_site_backward_matches_reference(x, 2, dt_mode, skip_mode, 0, "cpu")


@settings(max_examples=6)
@given(x=scan_inputs(**SMALL, dtypes=(torch.float32,)), grad_seed=st.integers(0, 2**32 - 1))
def test_kernels_read_strided_views_in_place(x: ScanInputs, grad_seed: int) -> None:
    views = triton_checks.strided(x)
    triton_checks.assert_forward_matches_reference(views, "cpu")
    triton_checks.assert_backward_matches_reference(views, grad_seed, True, "cpu")
    triton_checks.assert_fused_matches_reduced_site(views, site_groups(x), "cpu")
    triton_checks.assert_fused_site_backward_matches_reference(views, site_groups(x), "effective", "exact", grad_seed,
                                                              "cpu")
