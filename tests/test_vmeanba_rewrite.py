"""The VMeanba rewrite (docs/DESIGN.md section 2): formulas, invariants, and the pass on graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmeanba_compiler.models.ss2d as ss2d_module
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.passes.reduced_scan import DT_MODES, SKIP_MODES, reduced_selective_scan
from vmeanba_compiler.testing import (
    ScanInputs,
    assert_backend_matches_eager,
    assert_rewrite_matches_formulas,
    assert_scan_close,
    scan_inputs,
    site_groups,
    small_vmamba_models,
    vmeanba_formula,
)

modes = st.tuples(st.sampled_from(DT_MODES), st.sampled_from(SKIP_MODES))


@given(inputs=scan_inputs(), mode=modes)
def test_rewrite_equals_independent_formulas(inputs, mode):
    assert_rewrite_matches_formulas(inputs, dt_mode=mode[0], skip_mode=mode[1])


def _identical_within_groups(inputs: ScanInputs, groups: int) -> ScanInputs:
    """Copy the first channel of every group onto the group's other channels."""
    dim = inputs.u.shape[1]
    source = torch.arange(dim) // (dim // groups) * (dim // groups)

    def per_channel(t, axis):
        return None if t is None else t.index_select(axis, source)

    return dataclasses.replace(
        inputs,
        u=per_channel(inputs.u, 1), delta=per_channel(inputs.delta, 1), A=per_channel(inputs.A, 0),
        B=inputs.B if inputs.B.dim() != 2 else per_channel(inputs.B, 0),
        C=inputs.C if inputs.C.dim() != 2 else per_channel(inputs.C, 0),
        D=per_channel(inputs.D, 0), z=per_channel(inputs.z, 1), delta_bias=per_channel(inputs.delta_bias, 0),
    )


@given(inputs=scan_inputs(dtypes=(torch.float32, torch.float64)), mode=modes)
def test_rewrite_is_exact_when_each_groups_channels_are_identical(inputs, mode):
    inputs = _identical_within_groups(inputs, site_groups(inputs))
    reduced, reduced_state = reduced_selective_scan(
        *inputs.args(), groups=site_groups(inputs), dt_mode=mode[0], skip_mode=mode[1]
    )
    full, full_state = torch.ops.vmeanba.selective_scan(*inputs.args())
    assert_scan_close(reduced, full, inputs.u.dtype, what="reduced vs full scan")
    assert_scan_close(reduced_state, full_state, reduced_state.dtype, what="last state")


@given(inputs=scan_inputs(dtypes=(torch.float64,)), scale=st.floats(-4, 4), mode=modes)
def test_rewrite_is_linear_in_u_for_fixed_dt(inputs, scale, mode):
    groups = site_groups(inputs)
    kwargs = {"groups": groups, "dt_mode": mode[0], "skip_mode": mode[1]}
    y, _ = reduced_selective_scan(*inputs.args(), **kwargs)
    scaled = dataclasses.replace(inputs, u=inputs.u * scale)
    y_scaled, _ = reduced_selective_scan(*scaled.args(), **kwargs)
    assert_scan_close(y_scaled, y * scale, torch.float64, what="y(scale*u) vs scale*y(u)")


@given(inputs=scan_inputs(), mode=modes)
def test_rewrite_keeps_the_ops_shape_dtype_and_stride_contract(inputs, mode):
    y, state = reduced_selective_scan(*inputs.args(), groups=site_groups(inputs), dt_mode=mode[0], skip_mode=mode[1])
    full_y, full_state = torch.ops.vmeanba.selective_scan(*inputs.args())
    assert (y.shape, y.dtype, y.stride(), y.device) == (full_y.shape, full_y.dtype, full_y.stride(), full_y.device)
    assert (state.shape, state.dtype) == (full_state.shape, full_state.dtype)


def test_formula_oracle_catches_a_wrong_reduction():
    """The oracle is not a copy of the rewrite: averaging over the wrong groups must fail it."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, n, length = 1, 8, 4, 12
    inputs = ScanInputs(
        torch.randn(batch, dim, length, generator=gen), torch.rand(batch, dim, length, generator=gen),
        -torch.rand(dim, n, generator=gen) - 0.5, torch.randn(batch, 2, n, length, generator=gen),
        torch.randn(batch, 2, n, length, generator=gen),
    )
    wrong, _ = reduced_selective_scan(*inputs.args(), groups=4)  # finer groups than B's 2
    with pytest.raises(AssertionError, match="differ beyond"):
        assert_scan_close(wrong, vmeanba_formula(inputs, groups=2), torch.float32)


class TwoBranches(torch.nn.Module):
    """Two independent SS2D branches on one input: selecting one must leave the other alone."""

    def __init__(self):
        super().__init__()
        self.left = ss2d_module.SS2D(8, d_state=4)
        self.right = ss2d_module.SS2D(8, d_state=4)

    def forward(self, x):
        return self.left(x), self.right(x)


def test_unselected_site_is_bit_identical_and_selected_one_changes():
    torch.manual_seed(0)
    model = TwoBranches().eval()
    x = torch.randn(2, 6, 5, 8)
    with torch.no_grad():
        left, right = model(x)
        torch._dynamo.reset()
        new_left, new_right = torch.compile(
            model, backend="vmeanba", options={"sites": ["left:0"], "inductor": False}
        )(x)
    torch._dynamo.reset()
    assert torch.equal(new_right, right)
    assert not torch.equal(new_left, left)


def test_rewritten_model_equals_eager_model_with_formula_scans(monkeypatch):
    """Graph-level check: the rewritten, Inductor-compiled model equals the eager model whose
    selected SS2D computes its scan by the independent formulas."""
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vmeanba", options={"sites": ["stages.1.0.op:0"]})(images)
        torch._dynamo.reset()
        original = ss2d_module.selective_scan
        calls = []

        def scan_by_formulas(*args, **kwargs):
            calls.append(1)
            if len(calls) != 2:  # the second SS2D call is stages.1.0.op
                return original(*args, **kwargs)
            inputs = ScanInputs(*args, **kwargs)
            return vmeanba_formula(inputs, site_groups(inputs)).float()

        monkeypatch.setattr(ss2d_module, "selective_scan", scan_by_formulas)
        expected = model(images)
    assert len(calls) == 2
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=1)  # two compilations each; tests/test_fuzz.py (-m fuzz) draws more models
@given(model_and_images=small_vmamba_models(), data=st.data())
def test_backend_matches_eager_rewrite_on_random_small_models(model_and_images, data):
    model, images = model_and_images
    n_sites = sum(isinstance(m, ss2d_module.SS2D) for m in model.modules())
    ids = [f"{name}:0" for name, m in model.named_modules() if isinstance(m, ss2d_module.SS2D)]
    chosen = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=n_sites))
    assert_backend_matches_eager(model, images, sites=chosen)


@pytest.mark.parametrize("fault", ["named site kept", "unnamed site rewritten"])
def test_backend_matches_eager_fails_when_the_compilation_ignores_the_selection(fault, monkeypatch):
    """Negative control of `assert_backend_matches_eager`: with the rewrite pass made to ignore the
    selection, the compiled model still equals its own graph run eagerly, so only the helper's check
    of which sites were rewritten can catch it."""
    import vmeanba_compiler.passes.vmeanba_rewrite as rewrite_pass

    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini", in_chans=1).eval()
    images = torch.randn(2, 1, 8, 8)
    if fault == "named site kept":
        monkeypatch.setattr(rewrite_pass, "_replace", lambda gm, site, config: None)
        expected = r"not rewritten: \['stages.1.0.op:0'\]"
    else:
        real = rewrite_pass.select_sites
        monkeypatch.setattr(rewrite_pass, "select_sites", lambda sites, config, owners=None: [
            dataclasses.replace(d, rewrite=True) for d in real(sites, config, owners)])
        expected = r"rewritten though not selected: \['stages.0.0.op:0'\]"
    with pytest.raises(AssertionError, match=expected):
        assert_backend_matches_eager(model, images, sites=["stages.1.0.op:0"])


@pytest.mark.parametrize("mode", [("effective", "exact"), ("raw", "mean")])
def test_rewritten_site_is_differentiable_gradcheck(mode):
    gen = torch.Generator().manual_seed(1)
    f64 = torch.float64
    batch, groups, width, n, length = 1, 2, 3, 2, 5
    dim = groups * width
    leaves = [
        torch.randn(batch, dim, length, generator=gen, dtype=f64),
        0.5 * torch.randn(batch, dim, length, generator=gen, dtype=f64),
        -torch.rand(dim, n, generator=gen, dtype=f64) - 0.5,
        torch.randn(batch, groups, n, length, generator=gen, dtype=f64),
        torch.randn(batch, groups, n, length, generator=gen, dtype=f64),
        torch.randn(dim, generator=gen, dtype=f64),
        torch.randn(batch, dim, length, generator=gen, dtype=f64),
        torch.randn(dim, generator=gen, dtype=f64),
    ]
    leaves = [t.requires_grad_() for t in leaves]

    def reduced(*args):
        return reduced_selective_scan(*args, True, groups=groups, dt_mode=mode[0], skip_mode=mode[1])[0]

    assert torch.autograd.gradcheck(reduced, leaves)
