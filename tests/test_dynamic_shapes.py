"""Dynamic shapes (docs/DYNAMIC_SHAPES.md): batch size and image resolution (so L) change without a
recompile per size, through the op's fake kernel, validation, site discovery, the rewrite and
Inductor; one calibration profile serves every resolution.

Recompiles are counted by `compile_helpers.CountingBackend` (one backend call per Dynamo graph).
"""

from __future__ import annotations

import pytest
import torch
from compile_helpers import CountingBackend, OneScan

import vmeanba_compiler as vc
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.passes.reduced_scan import reduced_selective_scan
from vmeanba_compiler.passes.scan_sites import find_scan_sites
from vmeanba_compiler.testing import MODEL_TOLERANCES, TOLERANCES, ScanInputs, vmeanba_formula

SITE = "stages.0.0.op:0"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _scan_inputs(batch: int, length: int, seed: int) -> ScanInputs:
    """dim 8 in 2 groups (grouped B/C), N 4, with D, z and delta_bias."""
    gen = torch.Generator().manual_seed(seed)
    dim, groups, state = 8, 2, 4

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    return ScanInputs(
        u=randn(batch, dim, length), delta=0.5 * randn(batch, dim, length), A=-torch.exp(0.5 * randn(dim, state)),
        B=randn(batch, groups, state, length), C=randn(batch, groups, state, length), D=randn(dim),
        z=randn(batch, dim, length), delta_bias=0.5 * randn(dim), delta_softplus=True,
    )


# (batch, L). With dynamic=True every input axis is symbolic and Dynamo "duck-sizes" axes of
# equal size on the first call into one symbol: the sizes differ from dim, G and N, which are
# structural and specialised (the group count decides the rewrite). Batch >= 2: PyTorch
# specialises sizes 0 and 1.
SIZES = [(3, 16), (5, 40), (6, 9)]


def test_op_compiles_once_for_every_batch_and_length_and_sizes_stay_symbolic() -> None:
    backend = CountingBackend(inductor=False)
    compiled = torch.compile(OneScan(True, return_last_state=True), backend=backend, dynamic=True)
    for seed, (batch, length) in enumerate(SIZES):
        x = _scan_inputs(batch, length, seed)
        y, last_state = compiled(*x.args()[:-1])
        y_eager, state_eager = OneScan(True, return_last_state=True)(*x.args()[:-1])
        assert torch.equal(y, y_eager) and torch.equal(last_state, state_eager)
    assert backend.compiles == 1
    (site,) = find_scan_sites(backend.graphs[0])
    assert isinstance(site.batch, torch.SymInt) and isinstance(site.length, torch.SymInt), (site.batch, site.length)


def test_rewrite_applies_once_to_every_batch_and_length() -> None:
    backend = CountingBackend(inductor=False, sites=[OneScan.SITE])
    compiled = torch.compile(OneScan(True), backend=backend, dynamic=True)
    for seed, (batch, length) in enumerate(SIZES):
        x = _scan_inputs(batch, length, seed)
        y = compiled(*x.args()[:-1])
        expected = vmeanba_formula(x, groups=2)
        torch.testing.assert_close(y.double(), expected, rtol=TOLERANCES[torch.float32][0],
                                   atol=TOLERANCES[torch.float32][1])
    assert backend.compiles == 1
    targets = [n.target for n in backend.graphs[0].graph.nodes]
    assert reduced_selective_scan in targets and torch.ops.vmeanba.selective_scan not in targets


def _images(batch: int, height: int, width: int, *, dynamic_resolution: bool) -> torch.Tensor:
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height + width))
    torch._dynamo.mark_dynamic(images, 0)
    for axis in (2, 3):
        (torch._dynamo.mark_dynamic if dynamic_resolution else torch._dynamo.mark_static)(images, axis)
    return images


def test_inference_with_rewrite_under_inductor_compiles_once_across_batches_and_resolutions() -> None:
    """mark_dynamic on batch, height and width; non-square sizes included."""
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    sizes = [(2, 32, 32), (3, 24, 40), (4, 40, 24)]
    outputs = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        backend = CountingBackend(sites=[SITE], inductor=inductor)
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            outputs[inductor] = [compiled(_images(*size, dynamic_resolution=True)) for size in sizes]
        assert backend.compiles == 1, f"inductor={inductor}: {backend.compiles} compiles for {sizes}"
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    for size, compiled_out, eager_out in zip(sizes, outputs[True], outputs[False]):
        torch.testing.assert_close(compiled_out, eager_out, rtol=rtol, atol=atol, msg=f"size {size}")


@pytest.mark.extended  # dynamic-shape training through Inductor: ~50 s cold
def test_training_with_rewrite_shares_one_graph_between_batch_sizes() -> None:
    """The training recipe: dynamic batch, static resolution (docs/DYNAMIC_SHAPES.md says why).
    Every parameter's gradient through the Inductor-compiled graphs follows the eager rewrite, for
    the rewritten site and for the site kept as it is (stages.1.0.op)."""
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini")
    grads = {}
    for inductor in (False, True):
        torch._dynamo.reset()
        backend = CountingBackend(sites=[SITE], inductor=inductor)
        compiled = torch.compile(model, backend=backend)
        grads[inductor] = []
        for batch in (2, 4):
            model.zero_grad()
            compiled(_images(batch, 16, 16, dynamic_resolution=False)).square().mean().backward()
            grads[inductor].append({name: p.grad.clone() for name, p in model.named_parameters()})
        assert backend.compiles == 1, f"inductor={inductor}: one graph per batch size"
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    for compiled_grads, eager_grads in zip(grads[True], grads[False]):
        assert compiled_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=rtol, atol=atol, msg=name)


def test_one_profile_serves_every_resolution() -> None:
    """Site statistics are per site, not per shape: a profile calibrated at one resolution selects
    the same sites at another, and calibrating on mixed resolutions merges like separate runs."""
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    small, large = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 24, 40)
    profile = vc.calibrate(model, [small], progress=False)
    ratios = sorted(profile.metric(s, "ratio") for s in profile.site_ids)
    threshold = (ratios[0] + ratios[1]) / 2
    chosen = [s for s in profile.site_ids if profile.metric(s, "ratio") <= threshold]
    report = vc.explain(model, large, profile=profile, threshold=threshold)
    assert report.rewritten == chosen and len(chosen) == 1

    mixed = vc.calibrate(model, [small, large], progress=False)
    merged = profile.merge(vc.calibrate(model, [large], progress=False))
    assert mixed.site_ids == profile.site_ids and mixed.num_samples == 4
    for site in mixed.site_ids:
        for metric in ("ratio", "variance", "relative_error", "impact"):
            assert mixed.metric(site, metric) == pytest.approx(merged.metric(site, metric), rel=1e-9)
