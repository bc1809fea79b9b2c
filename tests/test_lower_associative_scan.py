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
independent of the vmeanba op.
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
        return self.mixer["ssm"](*args) * 2.0


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
    contraction=st.sampled_from(["sum", "einsum"]),
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


def test_backend_explain_and_calibrate_see_associative_scan_sites_end_to_end():
    """Canonicalisation runs in every consumer of site ids: explain and calibrate find the
    site, and the backend rewrites it (compiled output equals the eager rewrite)."""
    import vmeanba_compiler as vc
    from vmeanba_compiler.testing import assert_backend_matches_eager

    model = Block(ScanAS("generic", b_form="grouped", c_form="grouped")).eval()
    inputs = make_inputs(b_form="grouped", c_form="grouped")
    report = vc.explain(model, inputs, verbose=False, sites=["mixer.ssm:0"])
    assert [s.site_id for s in report.sites] == ["mixer.ssm:0"] and report.rewritten == ["mixer.ssm:0"]
    profile = vc.calibrate(model, [inputs], progress=False)
    assert profile.site_ids == ["mixer.ssm:0"]
    assert_backend_matches_eager(model, inputs, sites=["mixer.ssm:0"])
