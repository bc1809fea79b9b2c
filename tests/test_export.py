"""`vmeanba_compiler.export`: the exported program is the model as `backend="vmeanba"` rewrites it.

The programs run as `ExportedProgram.module()` and the backend with `inductor=False` (no Inductor
compile): what is checked is that export selects and rewrites exactly what the backend does, for
the in-repo v0-tiny and v2-tiny and every way of selecting (sites, top_k, threshold), and that it
refuses what the backend refuses, with the same messages. Packaging is tests/test_export_package.py.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import vmeanba_compiler as vc
from vmeanba_compiler.models.vmamba import build_vmamba
from vmeanba_compiler.passes.scan_sites import find_scan_sites
from vmeanba_compiler.passes.site_selection import site_signature
from vmeanba_compiler.profile import ProfileMismatchError, SiteStats
from vmeanba_compiler.tracing import backend_errors_unwrapped

from compile_helpers import CountingBackend

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
REDUCED_OP = torch.ops.vmeanba.reduced_selective_scan.default
REDUCED_TARGETS = (REDUCED_OP, REDUCED_OP.overloadpacket)  # the rewrite calls the packet; export records .default


@functools.lru_cache(maxsize=None)
def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vmamba(name, num_classes=10).eval()


@functools.lru_cache(maxsize=None)
def synthetic_profile(name: str) -> vc.Profile:
    """A profile of the model's sites (signatures as traced) whose metrics make top_k and threshold
    pick different sites: impact grows with the site's position, the ratio shrinks with it."""
    sites = find_scan_sites(torch.export.export(tiny(name), (IMAGES,)).module())
    stats = {}
    for position, site in enumerate(sites):
        s = SiteStats()
        s.channel_variance.update(torch.tensor([1.0 / (1 + position)], dtype=torch.float64))
        s.mean_square.update(torch.tensor([1.0], dtype=torch.float64))
        s.impact.update(torch.tensor([float(position)], dtype=torch.float64))
        stats[site.site_id] = s
    return vc.Profile({s.site_id: site_signature(s) for s in sites}, "ab" * 32, stats, num_batches=1, num_samples=2,
                      settings={"dt_mode": "effective", "skip_mode": "exact"})


def selection(name: str, mode: str) -> dict[str, Any]:
    profile = synthetic_profile(name)
    ids = profile.site_ids
    return {
        "sites": {"sites": [ids[1], ids[-1]]},
        "top_k": {"profile": profile, "top_k": 3},  # the three first sites
        "threshold": {"profile": profile, "threshold": 0.2},  # ratio <= 0.2: the sites from the fifth on
    }[mode]


def backend_run(model: torch.nn.Module, x: torch.Tensor, **options: Any) -> tuple[torch.Tensor, int]:
    """The backend's output (rewritten graph run eagerly) and how many sites it rewrote."""
    backend = CountingBackend(**options, inductor=False)
    with torch.no_grad():
        output = torch.compile(model, backend=backend)(x)
    torch._dynamo.reset()  # entries left on the model's code make the next compile of it slower
    return output, sum(1 for gm in backend.graphs for node in gm.graph.nodes if node.target in REDUCED_TARGETS)


def backend_output(model: torch.nn.Module, x: torch.Tensor, **options: Any) -> torch.Tensor:
    return backend_run(model, x, **options)[0]


def reduced_sites(program: torch.export.ExportedProgram) -> int:
    return sum(1 for node in program.graph.nodes if node.target in REDUCED_TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("vmamba_v0_tiny", marks=pytest.mark.extended), "vmamba_v2_tiny"])
def test_export_equals_the_backend_for_every_selection(name):
    model = tiny(name)
    with torch.no_grad():
        plain = model(IMAGES)
    outputs = {}
    for mode in ("sites", "top_k", "threshold"):
        options = selection(name, mode)
        program = vc.export(model, (IMAGES,), **options)
        compiled, rewritten = backend_run(model, IMAGES, **options)
        assert reduced_sites(program) == rewritten > 0, mode
        with torch.no_grad():
            exported = program.module()(IMAGES)
        torch.testing.assert_close(exported, compiled, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}, {mode}: {m}")
        # negative control: the rewrite changed the output, so the comparison above can fail
        assert not torch.allclose(exported, plain, rtol=1e-5, atol=1e-6), mode
        outputs[mode] = exported
    # different selections give different programs
    assert not torch.allclose(outputs["top_k"], outputs["threshold"], rtol=1e-5, atol=1e-6)


def mini() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vmamba("vmamba_mini").eval()


def test_dynamic_batch_runs_any_batch_like_the_backend():
    model = mini()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    program = vc.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, sites=["stages.0.0.op:0"],
                        skip_mode="mean")
    assert reduced_sites(program) == 1
    for batch in (1, 5):
        other = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            exported = program.module()(other)
        torch.testing.assert_close(exported, backend_output(model, other, sites=["stages.0.0.op:0"], skip_mode="mean"),
                                   rtol=1e-5, atol=1e-6)
    # negative control: without a dynamic batch the program is specialised to the example's
    static = vc.export(model, (x,), sites=["stages.0.0.op:0"])
    with pytest.raises(Exception, match="batch|size|shape|Expected|expected"):
        static.module()(torch.randn(5, 3, 32, 32))


def _backend_error(model: torch.nn.Module, x: torch.Tensor, **options: Any) -> BaseException:
    with pytest.raises(Exception) as caught, backend_errors_unwrapped():
        backend_output(model, x, **options)
    return caught.value


@pytest.mark.parametrize("options", [
    {"sites": ["stages.9.0.op:0"]},  # no such site
    {"top_k": 1},  # a selection from calibration data without a profile
    {"dt_mode": "sideways"},  # not a mode
    {"unknown_option": 1},
])
def test_export_refuses_what_the_backend_refuses_with_the_same_message(options):
    model, x = mini(), torch.randn(2, 3, 32, 32)
    with pytest.raises(Exception) as exported:
        vc.export(model, (x,), **options)
    compiled = _backend_error(model, x, **options)
    assert type(exported.value) is type(compiled)
    assert str(exported.value) == str(compiled)


def test_export_refuses_a_profile_calibrated_under_other_modes():
    profile = synthetic_profile("vmamba_v2_tiny")
    with pytest.raises(ProfileMismatchError, match="calibrated with dt_mode='effective' but the vmeanba options "
                                                   "say dt_mode='raw'"):
        vc.export(tiny("vmamba_v2_tiny"), (IMAGES,), profile=profile, top_k=1, dt_mode="raw")


def test_export_without_a_selection_is_the_model():
    model, x = mini(), torch.randn(2, 3, 32, 32)
    program = vc.export(model, (x,))
    assert reduced_sites(program) == 0
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


class _TwoScans(torch.nn.Module):
    def __init__(self, dim: int = 8, state: int = 4) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(dim, state, generator=torch.Generator().manual_seed(dim)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B = u[:, :2, None, :].expand(-1, -1, self.A.shape[1], -1)
        delta = torch.full_like(u, 0.1)
        y = vc.selective_scan(u, delta, self.A, B, B)
        return vc.selective_scan(y, delta, self.A, B, B)


class _SharedModule(torch.nn.Module):
    """`shared` is called twice (one site per scan call of its code, as the backend names them)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.other = _TwoScans(), _TwoScans()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.other(self.shared(self.shared(u)))


def test_site_ids_of_a_module_called_twice_are_the_backends():
    model, u = _SharedModule(), torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(0))
    backend_ids = [s.site_id for s in vc.explain(model, (u,)).sites]
    exported_ids = [s.site_id for s in find_scan_sites(torch.export.export(model, (u,)).module())]
    assert exported_ids == backend_ids == ["shared:0", "shared:1", "shared:0", "shared:1", "other:0", "other:1"]
    program = vc.export(model, (u,), sites=["shared:1"])  # both calls of shared rewrite their second scan
    assert reduced_sites(program) == 2
    with torch.no_grad():
        exported = program.module()(u)
        assert not torch.allclose(exported, model(u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exported, backend_output(model, u, sites=["shared:1"]), rtol=1e-5, atol=1e-6)


def test_inductor_settings_are_not_silently_dropped(caplog):
    u = torch.randn(2, 8, 6)
    with caplog.at_level("WARNING", logger="vmeanba_compiler.export"):
        vc.export(_TwoScans(), (u,), inductor_config={"max_autotune": True})
    assert "inductor_config does not change the exported program" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vmeanba_compiler.export"):
        vc.export(_TwoScans(), (u,))  # control: nothing to warn about
    assert "inductor_config" not in caplog.text
