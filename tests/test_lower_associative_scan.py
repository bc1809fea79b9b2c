"""lower_associative_scan: a selective scan written with `associative_scan` becomes one
`vmeanba.selective_scan` call, and anything that is not exactly that pattern is left untouched.

Two frontends produce the two graph forms the pass reads (see the pass's docstring):

- "generic": the public `associative_scan(..., combine_mode="generic")`, which runs on CPU and which
  Dynamo unrolls into slices, vmapped combine calls and interleaves (no associative_scan node).
- "hop": the `torch.ops.higher_order.associative_scan` node that `combine_mode="pointwise"` records.
  The public pointwise frontend refuses CPU tensors, so `hop_associative_scan` below performs the
  frontend's own steps (flatten the leaves, movedim the scan dim to 0, call the HOP with the flat
  combine, movedim back) without the device check; Dynamo records exactly the graph a CUDA model
  gets. Its eager execution runs the HOP's dense CPU implementation.

The oracle is the module's own eager output: the scan computed by PyTorch's associative_scan,
independent of the vmeanba op. For transformers' `mamba_selective_scan` it is the function itself
run eagerly (its sequential loop: eager execution never takes its associative_scan path).
"""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._higher_order_ops.associative_scan import associative_scan, associative_scan_op, wrap_combine_fn_flat

from vmeanba_compiler.passes.lower_associative_scan import Declined, Match, lower_associative_scan, match_associative_scans
from vmeanba_compiler.passes.scan_sites import SCAN_TARGETS, find_scan_sites
from vmeanba_compiler.testing import assert_scan_close

RTOL, ATOL = 1e-4, 1e-4  # float32: the op and the parallel scan sum in different orders

FRONTENDS = ("generic", "hop")


def affine(left, right):
    """The selective scan's combine: (a1, b1) . (a2, b2) = (a1*a2, a2*b1 + b2)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def affine_drive_first(left, right):
    """The same recurrence with the leaves stored as (drive, decay) and operands swapped."""
    b1, a1 = left
    b2, a2 = right
    return b2 + b1 * a2, a2 * a1


def wrong_add_mul(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 + a2, b1 * b2


def wrong_reversed(left, right):
    """(a1*a2, a1*b2 + b1): associative too, but it is the recurrence run backwards."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a1 * b2 + b1


def wrong_extra_op(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, (a2 * b1 + b2) * 1.0


def hop_associative_scan(combine, xs, dim, reverse=False):
    """What `associative_scan(..., combine_mode="pointwise")` does, minus its CUDA-only check."""
    leaves, spec = pytree.tree_flatten(xs)
    leaves = [torch.movedim(leaf, dim, 0) for leaf in leaves]
    if reverse:
        leaves = [torch.flip(leaf, [0]) for leaf in leaves]
    flat = functools.partial(wrap_combine_fn_flat, combine_fn=combine, spec=spec, num_leaves=len(leaves))
    out = associative_scan_op(flat, leaves, additional_inputs=())
    if isinstance(out, torch.Tensor):  # Dynamo unflattens a one-leaf result to the tensor
        out = [out]
    if reverse:
        out = [torch.flip(o, [0]) for o in out]
    out = pytree.tree_unflatten(list(out), spec)
    return pytree.tree_map(lambda leaf: torch.movedim(leaf, 0, dim), out)


def scan_fn(frontend, combine, xs, dim, reverse=False):
    if frontend == "hop":
        return hop_associative_scan(combine, xs, dim, reverse)
    return associative_scan(combine, xs, dim, reverse=reverse, combine_mode="generic")


class ScanAS(torch.nn.Module):
    """Mamba's selective scan via associative_scan, in the layouts the pass accepts.

    layout "bdln": scan operands (batch, dim, L, N), scan dim 2; "bldn": (batch, L, dim, N), dim 1.
    B/C forms: "shared" (batch, N, L), "grouped" (batch, G, N, L) repeat_interleaved to the
    channels, "fixed" (dim, N), "channel" (batch, dim, N, L) given per channel.
    """

    def __init__(self, frontend, *, layout="bdln", b_form="shared", c_form="shared", contraction="sum",
                 softplus=False, combine=affine, leaves="decay_first", extra=None, reverse=False,
                 prologue="mul"):
        super().__init__()
        self.frontend, self.layout, self.b_form, self.c_form = frontend, layout, b_form, c_form
        self.contraction, self.softplus, self.combine = contraction, softplus, combine
        self.leaves, self.extra, self.reverse, self.prologue = leaves, extra, reverse, prologue

    def _proj(self, P, form, dim):
        """B or C broadcast to (batch|1, dim|1, L|1, N), or to (batch|1, L|1, dim|1, N)."""
        if form == "shared":
            x = P.transpose(-1, -2)[:, None]  # (b, 1, L, N)
        elif form == "grouped":
            x = P.repeat_interleave(dim // P.shape[1], dim=1).transpose(-1, -2)  # (b, dim, L, N)
        elif form == "fixed":
            x = P[None, :, None, :]  # (1, dim, 1, N)
        else:  # "channel"
            x = P.transpose(-1, -2)
        return x.transpose(1, 2) if self.layout == "bldn" else x

    def forward(self, u, delta, A, B, C, bias):
        dim = u.shape[1]
        dt = F.softplus(delta + bias[:, None]) if self.softplus else delta
        if self.layout == "bldn":
            dt, u = dt.transpose(1, 2), u.transpose(1, 2)
            decay = torch.exp(dt[..., None] * A)  # (b, L, d, N)
            scan_dim = 1
        else:
            decay = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # (b, d, L, N)
            scan_dim = 2
        drive = dt[..., None] * self._proj(B, self.b_form, dim) * u[..., None]
        if self.prologue == "einsum":  # as mamba_ssm's selective_scan_ref writes it (layout bdln)
            decay = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
            if self.b_form == "fixed":
                drive = torch.einsum("bdl,dn,bdl->bdln", dt, B, u)
            elif self.b_form == "grouped":
                drive = torch.einsum("bdl,bdnl,bdl->bdln", dt, B.repeat_interleave(dim // B.shape[1], 1), u)
            else:
                drive = torch.einsum("bdl,bnl,bdl->bdln", dt, B, u)
        xs = (decay, drive) if self.leaves == "decay_first" else (drive, decay)
        out = scan_fn(self.frontend, self.combine, xs, scan_dim, self.reverse)
        h = out[1] if self.leaves == "decay_first" else out[0]
        cum_decay = out[0] if self.leaves == "decay_first" else out[1]
        if self.contraction == "einsum" and self.layout == "bdln" and self.c_form == "shared":
            y = torch.einsum("bdln,bnl->bdl", h, C)
        elif self.contraction == "einsum" and self.layout == "bdln" and self.c_form == "fixed":
            y = torch.einsum("bdln,dn->bdl", h, C)
        elif self.contraction == "einsum":
            Cx = self._proj(C, self.c_form, dim)
            y = torch.einsum("xyzn,xyzn->xyz", h, Cx)  # size-1 axes of Cx broadcast
        elif self.contraction == "matmul":  # (.., 1, N) @ (.., N, 1), batch axes broadcast
            y = (h.unsqueeze(-2) @ self._proj(C, self.c_form, dim).unsqueeze(-1))[..., 0, 0]
        else:
            y = (h * self._proj(C, self.c_form, dim)).sum(-1)
        if self.layout == "bldn":
            y = y.transpose(1, 2)
        if self.extra == "h_elsewhere":
            y = y + h.mean()
        elif self.extra == "decay_elsewhere":
            y = y + cum_decay.mean()
        elif self.extra == "drive_elsewhere":
            y = y + drive.mean()
        return y


class Block(torch.nn.Module):
    """Puts the scan at a nested module path, as a model would."""

    def __init__(self, scan):
        super().__init__()
        self.mixer = torch.nn.ModuleDict({"ssm": scan})

    def forward(self, *args):
        out = self.mixer["ssm"](*args)
        return out * 2.0 if isinstance(out, torch.Tensor) else out


def make_inputs(batch=2, groups=2, d=2, N=3, L=5, b_form="shared", c_form="shared", seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = groups * d

    def proj(form):
        if form == "shared":
            return torch.randn(batch, N, L, generator=g)
        if form == "grouped":
            return torch.randn(batch, groups, N, L, generator=g)
        if form == "fixed":
            return torch.randn(dim, N, generator=g)
        return torch.randn(batch, dim, N, L, generator=g)

    u = torch.randn(batch, dim, L, generator=g)
    delta = torch.rand(batch, dim, L, generator=g) * 0.5 + 0.1
    A = -(torch.rand(dim, N, generator=g) + 0.5)
    return (u, delta, A, proj(b_form), proj(c_form), torch.randn(dim, generator=g) * 0.1)


class Capture:
    """Test backend: record the graph, apply the pass, run the rewritten graph eagerly."""

    def __call__(self, gm, example_inputs):
        self.before = str(gm.graph)
        self.before_names = {n.name for n in gm.graph.nodes}
        self.reports = match_associative_scans(gm)
        self.gm = lower_associative_scan(gm)
        self.after = str(self.gm.graph)
        return self.gm.forward


def compile_and_run(module, inputs):
    torch._dynamo.reset()
    capture = Capture()
    with torch.no_grad():
        out = torch.compile(module, backend=capture, fullgraph=True)(*inputs)
    return capture, out


def count(gm, predicate):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and predicate(n))


def is_scan_op(node):
    return node.target in SCAN_TARGETS


def is_associative_scan_leftover(node):
    name = str(node.target)
    return "associative_scan" in name or "batch_dim" in name or "vmap" in name


def assert_rewritten(capture, out, expected):
    reports = capture.reports
    assert [type(r) for r in reports] == [Match], reports
    assert count(capture.gm, is_scan_op) == 1, capture.after
    assert count(capture.gm, is_associative_scan_leftover) == 0, capture.after
    assert not any(n.op == "get_attr" for n in capture.gm.graph.nodes), capture.after
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


def assert_declined(capture, out, expected, reason_part):
    declined = [r for r in capture.reports if isinstance(r, Declined)]
    assert declined and not any(isinstance(r, Match) for r in capture.reports), capture.reports
    assert any(reason_part in r.reason for r in declined), [r.reason for r in declined]
    assert capture.after == capture.before  # left untouched
    assert count(capture.gm, is_scan_op) == 0
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# (a), (b): the accepted pattern becomes one op and computes the same y
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(layout="bldn"),
        dict(b_form="grouped", c_form="grouped"),
        dict(b_form="fixed", c_form="shared", contraction="einsum"),
        dict(b_form="shared", c_form="fixed", contraction="einsum"),
        dict(b_form="grouped", c_form="shared", layout="bldn", contraction="einsum"),
        dict(b_form="fixed", c_form="grouped", layout="bldn", contraction="matmul"),
        dict(softplus=True, combine=affine_drive_first, leaves="drive_first"),
        dict(prologue="einsum", contraction="einsum"),
        dict(prologue="einsum", b_form="grouped", c_form="fixed", contraction="einsum"),
    ],
    ids=lambda v: "-".join(f"{k}={getattr(x, '__name__', x)}" for k, x in v.items()) or "default",
)
def test_selective_scan_pattern_becomes_one_op_with_the_same_output(frontend, variant):
    module = ScanAS(frontend, **variant)
    inputs = make_inputs(b_form=variant.get("b_form", "shared"), c_form=variant.get("c_form", "shared"))
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_rewritten(capture, out, expected)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_dt_is_passed_as_delta_without_softplus(frontend):
    """softplus(delta + bias) stays in the graph; its result is the op's delta."""
    module = ScanAS(frontend, softplus=True)
    inputs = make_inputs()
    capture, _ = compile_and_run(module, inputs)
    (scan,) = [n for n in capture.gm.graph.nodes if n.op == "call_function" and is_scan_op(n)]
    delta = scan.args[1]
    assert "softplus" in str(delta.target)
    assert scan.args[5:] == (None, None, None, False)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_new_nodes_carry_fake_values_and_the_callers_module_stack(frontend):
    module = Block(ScanAS(frontend, layout="bldn", b_form="grouped", c_form="fixed"))
    inputs = make_inputs(b_form="grouped", c_form="fixed")
    capture, _ = compile_and_run(module, inputs)
    (scan,) = [n for n in capture.gm.graph.nodes if n.op == "call_function" and is_scan_op(n)]
    y, state = scan.meta["example_value"]
    assert tuple(y.shape) == (2, 4, 5) and tuple(state.shape) == (2, 4, 3)
    for arg in scan.args[:5]:
        assert isinstance(arg.meta["example_value"], torch.Tensor), arg
    stack = scan.meta["nn_module_stack"]
    assert list(stack.values())[-1][1] is ScanAS


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_site_id_names_the_module_that_called_associative_scan(frontend):
    model = Block(ScanAS(frontend))
    capture, _ = compile_and_run(model, make_inputs())
    sites = find_scan_sites(capture.gm)
    assert [(s.site_id, s.module_path, s.b_form, s.c_form) for s in sites] == [
        ("mixer.ssm:0", "mixer.ssm", "shared", "shared")
    ]
    assert [r.module_path for r in capture.reports] == ["mixer.ssm"]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_prologue_values_used_elsewhere_stay_for_their_other_consumers(frontend):
    module = ScanAS(frontend, extra="drive_elsewhere")
    inputs = make_inputs()
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_rewritten(capture, out, expected)


def test_combine_subgraph_attribute_is_removed_with_the_scan():
    capture, _ = compile_and_run(ScanAS("hop"), make_inputs())
    assert "associative_scan_combine" in capture.before
    assert not any("associative_scan" in name for name, _ in capture.gm.named_children())


def test_dynamic_shapes_hop_form_is_rewritten_and_serves_other_sizes():
    """With dynamic=True Dynamo lifts the symbolic sizes into the combine as unused inputs."""
    torch._dynamo.reset()
    capture = Capture()
    module = ScanAS("hop", b_form="grouped")
    compiled = torch.compile(module, backend=capture, fullgraph=True, dynamic=True)
    for batch, L in ((2, 5), (3, 7)):
        inputs = make_inputs(batch=batch, L=L, b_form="grouped")
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), module(*inputs), rtol=RTOL, atol=ATOL)
    assert [type(r) for r in capture.reports] == [Match]
    assert count(capture.gm, is_scan_op) == 1


def test_dynamic_shapes_unrolled_form_is_declined_cleanly():
    """The unrolled generic scan reads symbolic sizes (`size` calls) inside its region: left alone."""
    torch._dynamo.reset()
    capture = Capture()
    module = ScanAS("generic")
    inputs = make_inputs()
    out = torch.compile(module, backend=capture, fullgraph=True, dynamic=True)(*inputs)
    torch.testing.assert_close(out, module(*inputs), rtol=RTOL, atol=ATOL)
    assert all(isinstance(r, Declined) for r in capture.reports) and capture.after == capture.before


def test_pass_without_associative_scan_changes_nothing():
    def f(x):
        return torch.movedim(x, 2, 0).cumsum(0) * 2

    torch._dynamo.reset()
    capture = Capture()
    torch.compile(f, backend=capture, fullgraph=True)(torch.randn(2, 3, 4))
    assert capture.reports == [] and capture.after == capture.before


def test_pass_logs_matches_and_graph(caplog):
    with caplog.at_level("DEBUG", logger="vmeanba_compiler.passes"):
        compile_and_run(ScanAS("hop"), make_inputs())
    text = caplog.text
    assert "-> vmeanba.selective_scan" in text and "graph after lower_associative_scan" in text


# --------------------------------------------------------------------------------------------
# (c), (d): anything else is declined with a reason and left untouched
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("combine", [wrong_add_mul, wrong_reversed, wrong_extra_op])
def test_a_different_combine_is_declined_and_left_untouched(frontend, combine):
    module = ScanAS(frontend, combine=combine)
    inputs = make_inputs()
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_declined(capture, out, expected, "not the affine recurrence")


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_cumsum_scan_is_declined(frontend):
    class Cumsum(torch.nn.Module):
        def forward(self, x):
            return scan_fn(frontend, operator.add, x, 1)

    x = torch.randn(2, 5, 3)
    torch._dynamo.reset()
    capture = Capture()
    out = torch.compile(Cumsum(), backend=capture, fullgraph=True)(x)
    torch.testing.assert_close(out, x.cumsum(1), rtol=RTOL, atol=ATOL)
    assert [type(r) for r in capture.reports] == [Declined]
    assert "scan" in capture.reports[0].reason and capture.after == capture.before


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_h_used_by_another_consumer_is_declined(frontend):
    """Decision: declined. Keeping the scan for the other consumer would save nothing."""
    module = ScanAS(frontend, extra="h_elsewhere")
    inputs = make_inputs()
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_declined(capture, out, expected, "only the C contraction may read it")


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_cumulative_decay_used_is_declined(frontend):
    module = ScanAS(frontend, extra="decay_elsewhere")
    inputs = make_inputs()
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_declined(capture, out, expected, "cumulative decay")


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_per_channel_B_is_declined(frontend):
    module = ScanAS(frontend, b_form="channel")
    inputs = make_inputs(b_form="channel")
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_declined(capture, out, expected, "varies per channel")


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_reversed_scan_is_declined(frontend):
    module = ScanAS(frontend, reverse=True)
    inputs = make_inputs()
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_declined(capture, out, expected, "reversed")


# --------------------------------------------------------------------------------------------
# (e): varied shapes and forms
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=12)
@given(
    frontend=st.sampled_from(FRONTENDS),
    batch=st.integers(1, 2),
    groups=st.integers(1, 2),
    d=st.integers(1, 3),
    N=st.integers(1, 3),
    L=st.integers(2, 6),
    layout=st.sampled_from(["bdln", "bldn"]),
    b_form=st.sampled_from(["shared", "grouped", "fixed"]),
    c_form=st.sampled_from(["shared", "grouped", "fixed"]),
    contraction=st.sampled_from(["sum", "einsum", "matmul"]),
    seed=st.integers(0, 2**16),
)
def test_varied_shapes_and_projection_forms(frontend, batch, groups, d, N, L, layout, b_form, c_form, contraction, seed):
    module = ScanAS(frontend, layout=layout, b_form=b_form, c_form=c_form, contraction=contraction)
    inputs = make_inputs(batch, groups, d, N, L, b_form, c_form, seed)
    expected = module(*inputs)
    capture, out = compile_and_run(module, inputs)
    assert_rewritten(capture, out, expected)
    (site,) = find_scan_sites(capture.gm)
    assert site.dim == groups * d and site.state == N and site.length == L
    # a size-1 group count or channel count makes "grouped" indistinguishable from "shared" inputs
    if b_form == "grouped" and d > 1:
        assert site.b_form == "grouped"
    elif b_form != "grouped":
        assert site.b_form == b_form


@pytest.mark.extended  # explain, calibrate and an Inductor compile of an associative-scan model: ~60 s cold
def test_backend_explain_and_calibrate_see_associative_scan_sites_end_to_end():
    """Canonicalisation runs in every consumer of site ids: explain and calibrate find the
    site, and the backend rewrites it (compiled output equals the eager rewrite)."""
    import vmeanba_compiler as vc
    from vmeanba_compiler.testing import assert_backend_matches_eager

    model = Block(ScanAS("generic", b_form="grouped", c_form="grouped")).eval()
    inputs = make_inputs(b_form="grouped", c_form="grouped")
    report = vc.explain(model, inputs, sites=["mixer.ssm:0"])
    assert [s.site_id for s in report.sites] == ["mixer.ssm:0"] and report.rewritten == ["mixer.ssm:0"]
    profile = vc.calibrate(model, [inputs], progress=False)
    assert profile.site_ids == ["mixer.ssm:0"]
    assert_backend_matches_eager(model, inputs, sites=["mixer.ssm:0"])


# --------------------------------------------------------------------------------------------
# (f): what real code writes: Hugging Face transformers' mamba_selective_scan, and hand-written
# variants of it (dtype casts before C, a matmul contraction, the last state read)
# --------------------------------------------------------------------------------------------

# Tolerances: `assert_scan_close` at the dtype of the result. For bfloat16 y the original rounds every
# state to bfloat16 before the contraction while the op rounds only y; that stays within the
# bfloat16 tolerance for the scan's own output. D and z are applied to y afterwards only in the
# float32 cases: in bfloat16 each of their roundings, and cancellation in y + D*u, would turn a
# one-ulp difference of y into a larger relative one that says nothing about the rewrite.


def mamba_inputs(dtype, batch=2, dim=4, N=3, L=6, seed=0):
    """Arguments as transformers' MambaMixer passes them: A is float32 (-exp(A_log.float())),
    everything else in the model's dtype; B and C are (batch, N, L)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, dim, L, generator=g).to(dtype),
        dt=(torch.randn(batch, dim, L, generator=g) * 0.5).to(dtype),
        A=-(torch.rand(dim, N, generator=g) + 0.5),
        B=torch.randn(batch, N, L, generator=g).to(dtype),
        C=torch.randn(batch, N, L, generator=g).to(dtype),
        D=torch.randn(dim, generator=g).to(dtype),
        z=torch.randn(batch, dim, L, generator=g).to(dtype),
        delta_bias=torch.randn(dim, generator=g) * 0.1,
    )


def unwrapped_mamba_selective_scan():
    """A copy of transformers' function: the project's trace-time substitution is keyed on the
    original function object, so tracing the copy records transformers' own code."""
    import inspect
    import types

    modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    fn = inspect.unwrap(modeling_mamba.mamba_selective_scan)
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@pytest.mark.parametrize("return_last_state", [True, False], ids=["last_state", "y_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transformers_mamba_selective_scan_becomes_one_op(dtype, return_last_state):
    """use_associative_scan=True on CPU: generic associative_scan, `.float()` casts in the prologue,
    states cast to the input dtype and contracted with C by a matmul, `all_states[:, :, -1]`."""
    scan = unwrapped_mamba_selective_scan()
    skip = dtype == torch.float32  # D and z (see the tolerances above)

    def f(hidden_states, dt, A, B, C, D, z, delta_bias):
        return scan(hidden_states, dt, A, B, C, D if skip else None, z if skip else None, delta_bias,
                    delta_softplus=True, return_last_state=return_last_state, use_associative_scan=True)

    inputs = mamba_inputs(dtype)
    expected = f(**inputs)  # eager: transformers' sequential loop
    torch._dynamo.reset()
    capture = Capture()
    with torch.no_grad():
        out = torch.compile(f, backend=capture, fullgraph=True)(**inputs)
    assert [(type(r), getattr(r, "last_state", None)) for r in capture.reports] == [(Match, return_last_state)]
    assert count(capture.gm, is_scan_op) == 1 and count(capture.gm, is_associative_scan_leftover) == 0, capture.after
    if return_last_state:
        (y, state), (y_ref, state_ref) = out, expected
        assert state.dtype == state_ref.dtype == torch.float32
        assert_scan_close(state, state_ref, torch.float32, "last state")
    else:
        y, y_ref = out, expected
    assert y.dtype == y_ref.dtype == dtype
    assert_scan_close(y, y_ref, dtype, "y")


class MambaStyle(torch.nn.Module):
    """transformers' scan written by hand, with the variations real code has.

    contraction: "matmul" (torch.matmul(h.transpose(1, 2), C.unsqueeze(-1)).squeeze(-1).transpose(1, 2)),
    "at" (`@` of (.., 1, N) rows and (.., N, 1) columns), "sum" ((h * C).sum(-1)) or "einsum". cast: None, "input"
    (.to(u.dtype)), "float" (.float()) or "type_as" (.type_as(u)) on the states before C. last:
    None, "index" (h[:, :, -1]), "select" (h.select(2, -1)), "transposed" (h.transpose(1, 2)[:, -1])
    or "L-1" (h[:, :, L - 1]). skip: D and z are applied to y afterwards, as Mamba does.
    """

    def __init__(self, frontend, contraction="matmul", cast="input", last="index", skip=False):
        super().__init__()
        self.frontend, self.contraction, self.cast, self.last = frontend, contraction, cast, last
        self.skip = skip

    def forward(self, hidden_states, dt, A, B, C, D, z, delta_bias):
        u = hidden_states
        dt = F.softplus(dt + delta_bias.to(dt.dtype)[..., None])
        decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        drive = dt[:, :, :, None] * B.transpose(1, 2)[:, None].float() * u[:, :, :, None].float()
        _, h = scan_fn(self.frontend, affine, (decay, drive), 2)
        hc = {None: h, "input": h.to(u.dtype), "float": h.float(), "type_as": h.type_as(u)}[self.cast]
        if self.contraction == "matmul":
            y = torch.matmul(hc.transpose(1, 2), C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        elif self.contraction == "at":
            y = (hc.unsqueeze(-2) @ C.transpose(1, 2)[:, None, :, :, None])[..., 0, 0]  # (.., 1, n) @ (.., n, 1)
        elif self.contraction == "sum":
            y = (hc * C.transpose(1, 2)[:, None].float()).sum(-1)
        else:
            y = torch.einsum("bdln,bnl->bdl", hc, C.to(hc.dtype))
        if self.skip:
            y = (y + u * D[None, :, None]) * F.silu(z)
        if self.last is None:
            return y
        state = {
            "index": lambda: h[:, :, -1],
            "select": lambda: h.select(2, -1),
            "transposed": lambda: h.transpose(1, 2)[:, -1],
            "L-1": lambda: h[:, :, h.shape[2] - 1],
        }[self.last]()
        return y, state


def run_mamba_style(module, dtype):
    inputs = list(mamba_inputs(dtype).values())
    expected = module(*inputs)
    torch._dynamo.reset()
    capture = Capture()
    with torch.no_grad():
        out = torch.compile(module, backend=capture, fullgraph=True)(*inputs)
    return capture, out, expected


@pytest.mark.parametrize(
    "frontend,dtype,variant",
    [
        ("generic", torch.float32, dict(skip=True)),
        ("hop", torch.bfloat16, dict()),
        ("generic", torch.bfloat16, dict(contraction="sum", cast="float", last="select")),
        ("hop", torch.bfloat16, dict(contraction="einsum", cast="type_as", last="transposed")),
        ("hop", torch.float32, dict(contraction="at", cast=None, last="L-1", skip=True)),
        ("hop", torch.bfloat16, dict(contraction="at", cast="input", last=None)),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v).replace("torch.", ""),
)
def test_casts_matmul_and_last_state_variants_become_one_op(frontend, dtype, variant):
    module = MambaStyle(frontend, **variant)
    capture, out, expected = run_mamba_style(module, dtype)
    last = variant.get("last", "index")
    assert [(type(r), getattr(r, "last_state", None)) for r in capture.reports] == [(Match, last is not None)]
    assert count(capture.gm, is_scan_op) == 1 and count(capture.gm, is_associative_scan_leftover) == 0, capture.after
    y, y_ref = (out[0], expected[0]) if last else (out, expected)
    assert y.dtype == y_ref.dtype
    assert_scan_close(y, y_ref, y_ref.dtype, "y")
    if last:
        assert out[1].dtype == expected[1].dtype
        assert_scan_close(out[1], expected[1], torch.float32, "last state")


def test_last_state_and_casts_are_new_nodes_with_the_scans_meta():
    """Every node the pass creates (argument casts, the op, its two outputs in the callers'
    layouts) carries the module stack and stack trace site ids are built from."""
    model = Block(MambaStyle("hop", contraction="sum", cast="float", last="transposed"))
    capture, _, _ = run_mamba_style(model, torch.bfloat16)
    (scan,) = [n for n in capture.gm.graph.nodes if n.op == "call_function" and is_scan_op(n)]
    new = [n for n in capture.gm.graph.nodes if n.name not in capture.before_names]
    assert scan in new and any(n.op == "call_method" and n.target == "to" for n in new)  # u, dt -> float32
    assert {n.args[1] for n in new if n.target is operator.getitem} == {0, 1}
    for node in new:
        assert node.meta["nn_module_stack"] == scan.meta["nn_module_stack"], node
        assert node.meta["stack_trace"] == scan.meta["stack_trace"], node
        assert isinstance(node.meta["example_value"], (torch.Tensor, tuple)), node
    assert list(scan.meta["nn_module_stack"].values())[-1][1] is MambaStyle
    assert find_scan_sites(capture.gm)[0].site_id == "mixer.ssm:0"


class DeclinedMambaStyle(MambaStyle):
    """MambaStyle with one thing the pass must not rewrite (see `test_..._declined` below)."""

    def __init__(self, frontend, what):
        super().__init__(frontend)
        self.what = what

    def forward(self, hidden_states, dt, A, B, C, D, z, delta_bias):
        u = hidden_states
        if self.what == "bf16_scan":
            A, dt = A.to(u.dtype), dt
        decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        drive = dt[:, :, :, None] * B.transpose(1, 2)[:, None] * u[:, :, :, None]
        _, h = scan_fn(self.frontend, affine, (decay, drive), 2)
        hc = h.to(torch.int32).to(h.dtype) if self.what == "int_cast" else h
        y = (hc * C.transpose(1, 2)[:, None]).sum(-1)
        if self.what == "first_step":
            return y, h[:, :, 0]
        if self.what == "channel_last":
            return y, h[:, -1]
        if self.what == "scaled_state":
            return y, (h * 2.0)[:, :, -1]
        return y


@pytest.mark.parametrize(
    "what,dtype,reason",
    [
        ("first_step", torch.float32, "not by a C contraction or a read of its last step"),
        ("channel_last", torch.float32, "other than the time axis L"),
        ("scaled_state", torch.float32, "not a view or cast of h"),
        ("int_cast", torch.float32, "not by a C contraction"),
        ("bf16_scan", torch.bfloat16, "the scan runs in torch.bfloat16"),
    ],
)
def test_what_selective_scan_cannot_reproduce_is_declined(what, dtype, reason):
    """Reads of h other than its last time step, the state scaled before it is read, a cast of
    the states to a non-float dtype, and a scan computed in bfloat16 (the op carries float32
    states) are left alone with their reason."""
    module = DeclinedMambaStyle("hop", what)
    capture, out, expected = run_mamba_style(module, dtype)
    declined = [r for r in capture.reports if isinstance(r, Declined)]
    assert len(declined) == 1 and reason in declined[0].reason, capture.reports
    assert capture.after == capture.before and count(capture.gm, is_scan_op) == 0
    for o, e in zip(pytree.tree_leaves(out), pytree.tree_leaves(expected)):
        torch.testing.assert_close(o, e, rtol=RTOL, atol=ATOL)
