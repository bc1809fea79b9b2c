"""`vmeanba::reduced_selective_scan`, one reduced site as one op (docs/DESIGN.md section 2).

Oracles, independent of the fused kernels: `vmeanba_formula` (one group at a time, the plain
reference loop, float64) for y, and the reference composition `reduced_scan_reference` (means,
the reference loop, broadcast) in float64 for the last state and, through autograd, for the
gradients. Tolerances come from `vmeanba_compiler.testing` only.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import vmeanba_compiler as vc
from vmeanba_compiler import calibrate
from vmeanba_compiler.lowering.reduced_scan import reduced_scan_reference
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.passes.reduced_scan import reduced_selective_scan
from vmeanba_compiler.rewrite_modes import DT_MODES, SKIP_MODES
from vmeanba_compiler.scan_schema import compute_dtype_for
from vmeanba_compiler.testing import (
    MODEL_TOLERANCES, ScanInputs, assert_scan_close, scan_inputs, site_groups,
    training_losses, vmeanba_formula,
)

REDUCED_OP = torch.ops.vmeanba.reduced_selective_scan
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@st.composite
def reduced_calls(draw, **limits) -> tuple[ScanInputs, dict]:
    """Scan inputs in every form and dtype, a group count the site allows (a multiple of B's and
    C's group counts dividing dim) and both modes."""
    x = draw(scan_inputs(**limits))
    dim, base = x.u.shape[1], site_groups(x)
    groups = draw(st.sampled_from([g for g in range(base, dim + 1, base) if dim % g == 0]))
    return x, {"groups": groups, "dt_mode": draw(st.sampled_from(DT_MODES)),
               "skip_mode": draw(st.sampled_from(SKIP_MODES))}


def _inputs(length: int, dtype=torch.float32, seed: int = 0, b_form: str = "grouped", c_form: str = "fixed",
            gate: bool = True, state: int = 3) -> ScanInputs:
    """batch 2, 3 groups of 2 channels, N `state`; B grouped over the 3 groups, C fixed; D, z, bias given."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    batch, dim = 2, 6
    projection = {"grouped": lambda: randn(batch, 3, state, length), "shared": lambda: randn(batch, state, length),
                  "fixed": lambda: randn(dim, state)}
    x = ScanInputs(randn(batch, dim, length), 0.5 * randn(batch, dim, length), -torch.exp(0.5 * randn(dim, state)),
                   projection[b_form](), projection[c_form](), randn(dim), randn(batch, dim, length) if gate else None,
                   0.5 * randn(dim), True, seed)
    return x.to(dtype)


def _assert_matches_oracles(x: ScanInputs, modes: dict, y: Tensor, last_state: Tensor) -> None:
    full_y, full_state = torch.ops.vmeanba.selective_scan(*x.args())
    assert (y.shape, y.dtype, y.stride()) == (full_y.shape, full_y.dtype, full_y.stride())
    assert (last_state.shape, last_state.dtype) == (full_state.shape, full_state.dtype)
    expected = vmeanba_formula(x, modes["groups"], modes["dt_mode"], modes["skip_mode"])
    assert_scan_close(y, expected, x.u.dtype, f"y {modes} of {x}")
    _, last_ref = reduced_scan_reference(*x.to(torch.float64).args(), **modes)
    assert_scan_close(last_state, last_ref, compute_dtype_for(x.u), f"last state {modes} of {x}")


# 1. Forward: the fused CPU kernel against the oracles ----------------------------------------------


@given(call=reduced_calls())
def test_fused_cpu_op_matches_the_reference(call) -> None:
    x, modes = call
    y, last_state = REDUCED_OP(*x.args(), **modes)
    _assert_matches_oracles(x, modes, y, last_state)


@pytest.mark.parametrize("dt_mode", DT_MODES)
@pytest.mark.parametrize("skip_mode", SKIP_MODES)
def test_long_sequences_carry_the_state_across_time_chunks(dt_mode: str, skip_mode: str) -> None:
    # The C kernel runs 256-step chunks and writes each chunk's output during the next sweep:
    # 600 steps end in a partial chunk (and rows that start off the vector alignment), 512 in a
    # whole one; N = 40 takes shorter chunks (its per-chunk B and C buffers are bounded).
    modes = {"groups": 3, "dt_mode": dt_mode, "skip_mode": skip_mode}
    for length, gate, state in ((600, True, 3), (600, False, 3), (512, True, 3), (300, True, 40)):
        x = _inputs(length, torch.float32, gate=gate, state=state)
        _assert_matches_oracles(x, modes, *REDUCED_OP(*x.args(), **modes))


def test_projections_are_read_in_place_whatever_their_strides() -> None:
    x = _inputs(20, torch.float32, b_form="grouped", c_form="shared")
    expected = REDUCED_OP(*x.args(), groups=3)
    transposed = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x.B, x.C)]
    broadcast = [x.B[:1].expand_as(x.B), x.C[:1].expand_as(x.C)]  # batch stride 0
    for B, C in (transposed, broadcast):
        args = list(x.args())
        args[3:5] = B, C
        reference = REDUCED_OP(*[a.contiguous() if isinstance(a, Tensor) else a for a in args], groups=3)
        actual = REDUCED_OP(*args, groups=3)
        assert torch.equal(actual[0], reference[0]) and torch.equal(actual[1], reference[1])
    assert torch.equal(REDUCED_OP(*x.args()[:3], *transposed, *x.args()[5:], groups=3)[0], expected[0])


def test_result_does_not_depend_on_the_thread_split() -> None:
    x = _inputs(40, torch.float32, b_form="shared", c_form="grouped")
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 4):  # 1 or 4 workers over the 2 x 3 (batch, group) items
            torch.set_num_threads(threads)
            results.append(REDUCED_OP(*x.args(), groups=3))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_rewritten_site_is_exact_when_the_channels_of_each_group_are_identical() -> None:
    x = _inputs(30, torch.float64, b_form="grouped", c_form="grouped")
    same = {name: (None if t is None else t) for name, t in zip(NAMES, x.args())}
    for name in ("u", "delta", "z"):
        same[name] = same[name][:, ::2].repeat_interleave(2, dim=1)
    for name in ("A",):
        same[name] = same[name][::2].repeat_interleave(2, dim=0)
    for name in ("D", "delta_bias"):
        same[name] = same[name][::2].repeat_interleave(2)
    args = [same[n] for n in NAMES]
    full, _ = torch.ops.vmeanba.selective_scan(*args, True)
    for dt_mode in DT_MODES:
        for skip_mode in SKIP_MODES:
            y, _ = REDUCED_OP(*args, True, groups=3, dt_mode=dt_mode, skip_mode=skip_mode)
            assert_scan_close(y, full, torch.float64, f"identical channels, {dt_mode}/{skip_mode}")


# 2. The op's registrations -------------------------------------------------------------------------


@pytest.mark.parametrize("modes", [("effective", "exact"), ("raw", "mean")], ids="/".join)
def test_opcheck_schema_fake_kernel_and_autograd_registration(modes) -> None:
    x = _inputs(12, torch.float64, b_form="shared", c_form="fixed")
    args = [None if t is None else t.clone().requires_grad_() for t in x.args()[:-1]]
    torch.library.opcheck(REDUCED_OP.default, (*args, True), {"groups": 3, "dt_mode": modes[0], "skip_mode": modes[1]})


# Each mode pair with another pairing of B and C forms: every form appears as B and as C.
@pytest.mark.parametrize("modes, forms", [
    (("effective", "exact"), ("grouped", "fixed")), (("effective", "mean"), ("shared", "grouped")),
    (("raw", "exact"), ("fixed", "shared")), (("raw", "mean"), ("grouped", "grouped")),
], ids=lambda v: "/".join(v))
def test_gradcheck_every_argument_and_last_state(modes, forms) -> None:
    x = _inputs(7, torch.float64, b_form=forms[0], c_form=forms[1])
    tensors = [t.detach().clone().requires_grad_() for t in x.args()[:-1]]

    def site(*args: Tensor) -> tuple[Tensor, Tensor]:
        return REDUCED_OP(*args, True, groups=3, dt_mode=modes[0], skip_mode=modes[1])

    assert torch.autograd.gradcheck(site, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@given(call=reduced_calls(dtypes=(torch.float32, torch.float64)), grad_seed=st.integers(0, 2**32 - 1))
def test_backward_op_matches_autograd_through_the_float64_reference(call, grad_seed: int) -> None:
    x, modes = call
    gen = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(x.u.shape, generator=gen, dtype=torch.float64)
    grad_last = torch.randn(*x.u.shape[:2], x.A.shape[1], generator=gen, dtype=torch.float64)
    math = compute_dtype_for(x.u)
    grads = torch.ops.vmeanba.reduced_selective_scan_backward(
        grad_y.to(x.u.dtype), grad_last.to(math), *x.args(), modes["groups"], modes["dt_mode"], modes["skip_mode"]
    )
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in x.args()[:-1]]
    y, last_state = reduced_scan_reference(*leaves, x.delta_softplus, **modes)
    present = [t for t in leaves if t is not None]
    expected = iter(torch.autograd.grad([y, last_state], present, [grad_y, grad_last], allow_unused=True))
    for name, got, leaf, given_ in zip(NAMES, grads, leaves, x.args()):
        if leaf is None:
            assert got.numel() == 0, f"grad of absent {name}"
            continue
        want = next(expected)
        want = torch.zeros_like(leaf) if want is None else want
        assert (got.dtype, got.shape) == (given_.dtype, given_.shape), name
        assert_scan_close(got, want, x.u.dtype, f"grad of {name} {modes}, {x}")


def test_autocast_runs_mixed_u_and_delta_in_float32() -> None:
    x = _inputs(10, torch.float32)
    u_low = x.u.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, last_state = REDUCED_OP(u_low, *x.args()[1:], groups=3)
    expected, expected_state = REDUCED_OP(u_low.float(), *x.args()[1:], groups=3)
    assert y.dtype == torch.bfloat16 and last_state.dtype == torch.float32
    assert torch.equal(y, expected.to(torch.bfloat16)) and torch.equal(last_state, expected_state)
    with pytest.raises(TypeError, match="'delta' has dtype torch.float32 but 'u' has torch.bfloat16"):
        REDUCED_OP(u_low, *x.args()[1:], groups=3)  # outside autocast: refused, naming both


@pytest.mark.parametrize("groups, kwargs, message", [
    (4, {}, r"groups=4 must be a positive divisor of the channel count dim=6"),
    (1, {}, r"groups=1 must be a multiple of B's group count 3, .* pass groups as the lcm"),
    (3, {"dt_mode": "mean"}, r"dt_mode must be one of \('effective', 'raw'\)"),
])
def test_bad_reduction_is_refused_naming_the_problem_and_the_fix(groups, kwargs, message) -> None:
    x = _inputs(5)
    for run in (lambda: REDUCED_OP(*x.args(), groups=groups, **kwargs),
                lambda: reduced_scan_reference(*x.args(), groups=groups, **kwargs)):
        with pytest.raises(ValueError, match=message):
            run()


# 3. Calibration measures the approximated part -------------------------------------------------------


class _Site(torch.nn.Module):
    """One scan site with a settable skip weight."""

    def __init__(self, x: ScanInputs, skip: float) -> None:
        super().__init__()
        self.x, self.skip = x, skip

    def forward(self, u: Tensor) -> Tensor:
        x = self.x
        return vc.selective_scan(u, x.delta, x.A, x.B, x.C, torch.full_like(x.D, self.skip), None, x.delta_bias,
                                 True)


@pytest.mark.parametrize("skip_mode", SKIP_MODES)
def test_calibration_statistics_leave_out_the_skip_only_where_the_rewrite_keeps_it_exact(skip_mode: str) -> None:
    x = _inputs(16)
    profiles = [calibrate(_Site(x, skip), [x.u], impact=False, skip_mode=skip_mode, progress=False)
                for skip in (0.0, 50.0)]
    (site,) = profiles[0].stats
    metrics = [[p.metric(site, m) for m in ("ratio", "relative_error")] for p in profiles]
    if skip_mode == "exact":  # a large exact skip does not change what is measured
        assert metrics[0] == pytest.approx(metrics[1], rel=1e-9)
    else:  # negative control: the averaged skip is part of the approximation
        assert metrics[0] != pytest.approx(metrics[1], rel=1e-2)


# 4. The rewrite emits one op per site; compiled models follow the eager rewrite ---------------------


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    sites = [s.site_id for s in vc.explain(model, torch.randn(2, 3, 32, 32)).sites]
    return model, sites


def _rewritten_targets(model: torch.nn.Module, images: Tensor, **options) -> list:
    from compile_helpers import CountingBackend

    backend = CountingBackend(inductor=False, **options)
    with torch.no_grad():
        torch.compile(model, backend=backend)(images)
    torch._dynamo.reset()
    return [n.target for gm in backend.graphs for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrite_emits_one_reduced_op_node_per_selected_site(mini) -> None:
    model, sites = mini
    images = torch.randn(1, 3, 32, 32)
    targets = _rewritten_targets(model, images, sites=sites)
    assert targets.count(reduced_selective_scan) == len(sites) == 2
    assert torch.ops.vmeanba.selective_scan not in targets
    # negative control: an unselected site keeps its full-scan node
    targets = _rewritten_targets(model, images, sites=sites[:1])
    assert targets.count(reduced_selective_scan) == 1 and targets.count(torch.ops.vmeanba.selective_scan) == 1
    report = vc.explain(model, images, sites=sites)
    assert list(report.rewritten) == sites


class _ScanNet(torch.nn.Module):
    """Projections -> one scan site (2 groups, gate, skip, bias, softplus) -> pooled linear head:
    the smallest trainable model whose Inductor compile covers a rewritten site's forward and
    backward (a cold Inductor compile costs seconds per graph and kernel)."""

    def __init__(self, features: int = 4, dim: int = 6, state: int = 2, groups: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.dim, self.state, self.groups = dim, state, groups
        self.proj = torch.nn.Linear(features, 3 * dim + 2 * groups * state)
        self.A_log = torch.nn.Parameter(torch.zeros(dim, state))
        self.D = torch.nn.Parameter(torch.ones(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, L, features)
        d, gn = self.dim, self.groups * self.state
        u, delta, z, B, C = self.proj(x).transpose(1, 2).split([d, d, d, gn, gn], dim=1)
        B, C = (p.unflatten(1, (self.groups, self.state)).contiguous() for p in (B, C))
        y = vc.selective_scan(u.contiguous(), delta.contiguous(), -torch.exp(self.A_log), B, C, self.D,
                              z.contiguous(), self.bias, True)
        return self.head(y.mean(-1))


@pytest.mark.slow
def test_compiled_rewritten_model_trains_like_the_eager_rewrite() -> None:
    torch.manual_seed(0)
    eager_model, compiled_model = _ScanNet(), _ScanNet()
    compiled_model.load_state_dict(eager_model.state_dict())
    images, labels = torch.randn(2, 10, 4), torch.tensor([1, 2])
    sites = [s.site_id for s in vc.explain(eager_model, images).sites]
    eager = torch.compile(eager_model, backend="vmeanba", options={"sites": sites, "inductor": False})
    compiled = torch.compile(compiled_model, backend="vmeanba", options={"sites": sites})
    losses = {"eager rewrite": training_losses(eager, eager_model, images, labels),
              "compiled": training_losses(compiled, compiled_model, images, labels)}
    torch._dynamo.reset()
    assert len(sites) == 1 and losses["compiled"][-1] < losses["compiled"][0], (sites, losses)
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager rewrite"]),
                               rtol=rtol, atol=atol)
