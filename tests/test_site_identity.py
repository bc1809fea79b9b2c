"""Site ids name the module that owns a scan, whichever graph Dynamo traced it in.

Models whose forward breaks the graph before (or between) their scans are compared with the same
models without breaks: the ids, the calibration profile and the rewrite of a named site must not
depend on how Dynamo split the model. The oracle for a rewritten site is `vmeanba_formula`, an
independent float64 evaluation of the reduced scan, applied eagerly to exactly that module.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import pytest
import torch
from torch import nn

import vmeanba_compiler
from vmeanba_compiler.passes.scan_sites import SiteIdCollisionError
from vmeanba_compiler.testing import MODEL_TOLERANCES, ScanInputs, vmeanba_formula
from vmeanba_compiler.tracing import fresh_trace

STATE = 4


class ScanBlock(nn.Module):
    """Projects (batch, L, dim) to one scan; optionally breaks the graph right before the scan.

    `eager_reduced` makes the eager forward compute the VMeanba-reduced scan from the independent
    formula: the reference for "only this module's site was rewritten"."""

    def __init__(self, dim: int, graph_break: bool) -> None:
        super().__init__()
        self.graph_break = graph_break
        self.eager_reduced = False
        self.proj = nn.Linear(dim, 2 * dim + 2 * STATE)
        self.A_log = nn.Parameter(torch.linspace(-1.0, 1.0, dim * STATE).reshape(dim, STATE))
        self.D = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def scan_inputs(self, x: torch.Tensor) -> ScanInputs:
        dim = self.D.shape[0]
        u, delta, B, C = self.proj(x).transpose(1, 2).split([dim, dim, STATE, STATE], dim=1)
        return ScanInputs(u.contiguous(), delta.contiguous(), -torch.exp(self.A_log), B.contiguous(),
                          C.contiguous(), self.D, delta_softplus=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.scan_inputs(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        if self.eager_reduced:
            y = vmeanba_formula(inputs, groups=1).to(x.dtype)
        else:
            y, _ = torch.ops.vmeanba.selective_scan(*inputs.args())
        return x + y.transpose(1, 2)


class Backbone(nn.Module):
    """a, b (width 8) and c (width 16); a is called twice."""

    def __init__(self, graph_break: bool) -> None:
        super().__init__()
        self.a = ScanBlock(8, graph_break)
        self.b = ScanBlock(8, graph_break)
        self.up = nn.Linear(8, 16)
        self.c = ScanBlock(16, graph_break)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = self.b(x)
        x = self.a(x)
        return self.c(self.up(x)).mean(1)


class TwoScansOneModule(nn.Module):
    """One module's forward with two scans, optionally split by a graph break between them."""

    def __init__(self, graph_break: bool) -> None:
        super().__init__()
        self.graph_break = graph_break
        self.first = nn.Linear(8, 8)
        self.scan = ScanBlock(8, graph_break=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.scan.scan_inputs(x)
        y1, _ = torch.ops.vmeanba.selective_scan(*inputs.args())
        if self.graph_break:
            torch._dynamo.graph_break()
        inputs = self.scan.scan_inputs(self.first(y1.transpose(1, 2)))
        y2, _ = torch.ops.vmeanba.selective_scan(*inputs.args())
        return y2.transpose(1, 2)


class CoreMixin:
    """The forward and scan methods live in a mixin listed after nn.Module in the bases, as in
    VMamba's SS2D."""

    def forward_v2(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.core(x).transpose(1, 2)

    def core_v2(self, x: torch.Tensor, softplus: bool) -> torch.Tensor:
        inputs = self.scan_inputs(x)
        if self.graph_break:
            torch._dynamo.graph_break()

        def run() -> torch.Tensor:
            return torch.ops.vmeanba.selective_scan(*inputs.args()[:-1], softplus)[0]

        return run()


class IndirectScanBlock(ScanBlock, CoreMixin):
    """Reaches its scan the way VMamba's SS2D does: `forward` bound per instance to another
    method, which calls the mixin's scan method through a functools.partial; the scan itself runs
    in a closure, and the graph break (when on) sits in the middle of that method."""

    def __init__(self, dim: int, graph_break: bool) -> None:
        super().__init__(dim, graph_break)
        self.forward = self.forward_v2
        self.core = functools.partial(self.core_v2, softplus=True)


class IndirectBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(IndirectScanBlock(8, graph_break=False) for _ in range(3))

    def set_graph_breaks(self, on: bool) -> None:
        for block in self.blocks:
            block.graph_break = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


@pytest.mark.parametrize("breaks_first", [False, True])
def test_ids_do_not_depend_on_breaks_or_on_what_was_traced_before(breaks_first: bool) -> None:
    """The same model object calibrated with and without breaks, in either order: one id per block
    each time (an index that depended on the graph split, or on an earlier trace, would differ)."""
    torch.manual_seed(0)
    model = IndirectBackbone().eval()
    profiles = {}
    for breaks in (breaks_first, not breaks_first):
        model.set_graph_breaks(breaks)
        profiles[breaks] = vmeanba_compiler.calibrate(model, _batches(), impact=False, progress=False)
    expected = ["blocks.0:0", "blocks.1:0", "blocks.2:0"]
    assert profiles[False].site_ids == profiles[True].site_ids == expected
    for site_id in expected:
        assert math.isclose(profiles[True].metric(site_id, "ratio"), profiles[False].metric(site_id, "ratio"),
                            rel_tol=1e-9)


def test_a_graph_dynamo_shares_between_instances_is_selected_whole_or_not_at_all() -> None:
    """After the break, core_v2 no longer uses `self`: Dynamo runs one compiled resume function for
    all three blocks. Rewriting one of them alone cannot be compiled, so it is refused; all three
    together are rewritten, each as the independent formula says."""
    torch.manual_seed(0)
    model = IndirectBackbone().eval()
    model.set_graph_breaks(True)
    x = _batches(1)[0]
    with pytest.raises(Exception, match=r"rewrites blocks.1:0 but keeps .*one compiled graph"):
        fresh_trace(model, "vmeanba", options={"sites": ["blocks.1:0"], "inductor": False})(x)
    everything = ["blocks.0:0", "blocks.1:0", "blocks.2:0"]
    with torch.no_grad():
        plain = model(x)
        expected = x
        for block in model.blocks:
            inputs = block.scan_inputs(expected)
            expected = expected + vmeanba_formula(inputs, groups=1).to(x.dtype).transpose(1, 2)
        expected = expected.mean(1)
        actual = fresh_trace(model, "vmeanba", options={"sites": everything, "inductor": False})(x)
    torch._dynamo.reset()
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    assert not torch.allclose(expected, plain, rtol=rtol, atol=atol), "negative control: the rewrite changes y"


def _backbone(graph_break: bool) -> Backbone:
    torch.manual_seed(0)
    return Backbone(graph_break).eval()


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 6, 8, generator=g) for _ in range(n)]


def _profile(model: nn.Module) -> vmeanba_compiler.Profile:
    return vmeanba_compiler.calibrate(model, _batches(), progress=False)


@pytest.fixture(scope="module")
def profiles() -> dict[bool, vmeanba_compiler.Profile]:
    return {graph_break: _profile(_backbone(graph_break)) for graph_break in (False, True)}


def test_graph_breaks_keep_one_distinct_id_per_module(profiles) -> None:
    for graph_break, profile in profiles.items():
        assert profile.site_ids == ["a:0", "b:0", "c:0"], graph_break
        assert profile.signatures["a:0"].dim == profile.signatures["b:0"].dim == 8
        assert profile.signatures["c:0"].dim == 16


def test_calibration_with_graph_breaks_equals_calibration_without(profiles) -> None:
    broken, whole = profiles[True], profiles[False]
    assert broken.signatures == whole.signatures
    for site_id in whole.site_ids:
        for metric in ("ratio", "variance", "relative_error", "impact"):
            expected, actual = whole.metric(site_id, metric), broken.metric(site_id, metric)
            assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-15), (site_id, metric, actual, expected)
        # a's two calls are one site: both are counted, in both models
        assert broken.stats[site_id].mean_square.count == whole.stats[site_id].mean_square.count
    assert whole.stats["a:0"].mean_square.count == 2 * whole.stats["b:0"].mean_square.count


def test_modules_of_one_class_do_not_share_statistics(profiles) -> None:
    """Dynamo compiles one resume function for the class; a and b must still be told apart."""
    broken = profiles[True]
    assert broken.metric("a:0", "ratio") != broken.metric("b:0", "ratio")


@pytest.mark.parametrize("graph_break", [False, True])
@pytest.mark.parametrize("selected", ["a:0", "b:0", "c:0"])
def test_selecting_one_site_rewrites_only_that_module(graph_break: bool, selected: str) -> None:
    model = _backbone(graph_break)
    x = _batches(1)[0]
    with torch.no_grad():
        plain = model(x)
        getattr(model, selected.split(":")[0]).eager_reduced = True
        expected = model(x)
        getattr(model, selected.split(":")[0]).eager_reduced = False
        actual = fresh_trace(model, "vmeanba", options={"sites": [selected], "inductor": False})(x)
    torch._dynamo.reset()
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    assert not torch.allclose(expected, plain, rtol=rtol, atol=atol), "negative control: the rewrite changes y"


def test_compiled_with_inductor_and_graph_breaks_matches_the_eager_rewrite() -> None:
    model = _backbone(graph_break=True)
    x = _batches(1)[0]
    with torch.no_grad():
        model.b.eager_reduced = True
        expected = model(x)
        model.b.eager_reduced = False
        actual = fresh_trace(model, "vmeanba", options={"sites": ["b:0"]})(x)
    torch._dynamo.reset()
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("graph_break", [False, True])
def test_call_index_does_not_restart_in_the_graph_after_a_break(graph_break: bool) -> None:
    torch.manual_seed(0)
    model = TwoScansOneModule(graph_break).eval()
    report = vmeanba_compiler.explain(model, _batches(1)[0])
    assert report.graph_count == (2 if graph_break else 1)
    assert [s.site_id for s in report.sites] == [":0", ":1"]
    profile = vmeanba_compiler.calibrate(model, _batches(), impact=False, progress=False)
    assert profile.site_ids == [":0", ":1"]


def test_explain_refuses_a_named_site_that_no_graph_has() -> None:
    with pytest.raises(ValueError, match=r"unknown site id\(s\) 'a:1'.*a:0, b:0, c:0"):
        vmeanba_compiler.explain(_backbone(True), _batches(1)[0], sites=["a:1"])


def test_backend_refuses_a_named_site_of_a_module_the_model_lacks() -> None:
    compiled = fresh_trace(_backbone(True), "vmeanba", options={"sites": ["d:0"]})
    with pytest.raises(Exception, match=r"unknown site id\(s\) 'd:0'"):
        compiled(_batches(1)[0])
    torch._dynamo.reset()


def scan_without_module(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A plain function (no module) whose scan Dynamo traces in a frame of its own."""
    torch._dynamo.graph_break()
    B = torch.ones(x.shape[0], STATE, x.shape[2])
    return torch.ops.vmeanba.selective_scan(x, x.sigmoid(), A, B, B)[0]


class CallsAFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(-torch.rand(8, STATE) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scan_without_module(x.transpose(1, 2), self.A)


def test_scan_outside_any_module_is_named_by_its_code_location() -> None:
    report = vmeanba_compiler.explain(CallsAFunction(), _batches(1)[0])
    assert [s.site_id for s in report.sites] == ["<test_site_identity.scan_without_module>:0"]


class SameCallOtherSizes(nn.Module):
    """One module called twice whose scan has a different group count per call: one id, two
    different scans."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(-torch.rand(8, STATE) - 0.5)

    def forward(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        u = x.transpose(1, 2).contiguous()
        B = torch.ones(u.shape[0], groups, STATE, u.shape[2])
        return torch.ops.vmeanba.selective_scan(u, u.sigmoid(), self.A, B, B)[0]


class CallsTwiceWithOtherGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = SameCallOtherSizes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, 1) + self.block(x, 2)


def test_one_id_for_two_different_scans_is_an_error_naming_both() -> None:
    with pytest.raises(SiteIdCollisionError, match=r"'block:0'.*differ"):
        vmeanba_compiler.calibrate(CallsTwiceWithOtherGroups(), _batches(1), progress=False)


def test_profile_merge_refuses_statistics_whose_signatures_differ(profiles) -> None:
    whole = profiles[False]
    other = copy.deepcopy(whole)
    other.signatures["a:0"] = dataclasses.replace(other.signatures["a:0"], has_z=True)
    whole.merge(copy.deepcopy(whole))  # negative control: the same sites merge
    with pytest.raises(ValueError, match=r"signature differs[\s\S]*a:0"):
        whole.merge(other)
