"""calibrate, explain and the testing helpers leave the rest of the user's process alone.

They trace the model with a backend callable of their own and never call `torch._dynamo.reset()`:
code the user compiled before (another function, or the same model with another backend) keeps its
compiled code, and calling them many times on one model neither exhausts Dynamo's recompile limit
nor reuses an earlier instrumented trace. Library calls return and log; they print nothing.
"""

from __future__ import annotations

import torch
import torch._C._dynamo.eval_frame as dynamo_frames

import vmeanba_compiler as vc
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.testing import assert_backend_matches_eager

from test_site_identity import Backbone, _backbone, _batches


class EagerCounter:
    """A user's backend that counts its compilations and runs the graph as traced."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.compiles += 1
        return gm.forward


def _user_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def _mini() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return build_vmamba("vmamba_mini").eval(), torch.randn(2, 3, 16, 16)


def test_user_compiled_code_survives_calibrate_and_explain(capsys):
    model, images = _mini()
    user_backend = EagerCounter()
    user_fn = torch.compile(_user_function, backend=user_backend)
    user_model = torch.compile(model, backend=user_backend)  # the same model, compiled by the user
    x = torch.randn(5)
    with torch.no_grad():
        expected_fn, expected_model = user_fn(x), user_model(images)
    compiles = user_backend.compiles
    assert compiles >= 2

    profile = vc.calibrate(model, [images], progress=False)
    report = vc.explain(model, images, profile=profile, top_k=1)
    assert_backend_matches_eager(model, images, sites=profile.site_ids[:1])

    with torch.no_grad():
        assert torch.equal(user_fn(x), expected_fn)
        assert torch.equal(user_model(images), expected_model)
    assert user_backend.compiles == compiles, "the user's compiled code was thrown away and recompiled"
    assert report.rewritten == [min(profile.site_ids, key=lambda s: profile.metric(s, "impact"))]
    assert capsys.readouterr().out == "", "library calls must not print"


def test_user_backend_compiles_nothing_for_calibrate():
    """The reverse direction: calibrate's instrumented graphs are compiled by its own backend,
    never served to (or from) the user's compiled model."""
    model, images = _mini()
    profile = vc.calibrate(model, [images], impact=False, progress=False)
    user_backend = EagerCounter()
    with torch.no_grad():
        torch.compile(model, backend=user_backend)(images)
    assert user_backend.compiles >= 1  # traced anew: nothing of calibrate's was reused
    assert len(profile.site_ids) == 2


def test_repeated_calls_keep_finding_the_sites():
    """Dynamo allows 8 compiles per code object (per guarded module instance); each call compiles
    again, so without releasing its entries the 9th call would run the model uncompiled and find
    no sites. Backbone breaks the graph inside every scan block (identity-guarded module frames)."""
    model = _backbone(graph_break=True)
    batches = _batches(1)
    first = vc.calibrate(model, batches, impact=False, progress=False)
    assert sorted(first.site_ids) == ["a:0", "b:0", "c:0"]
    for _ in range(10):
        profile = vc.calibrate(model, batches, impact=False, progress=False)
        assert profile.site_ids == first.site_ids
        for site in first.site_ids:  # the same data gives the same statistics: no stale trace
            assert profile.metric(site, "ratio") == first.metric(site, "ratio")
        report = vc.explain(model, batches[0], sites=["b:0"])
        assert report.rewritten == ["b:0"]
    # what the calls compiled was released: no cache entries left on the model's code
    for code in (Backbone.forward.__code__, type(model.a).forward.__code__):
        assert dynamo_frames._debug_get_cache_entry_list(code) == []


def test_explain_report_prints_only_when_asked(capsys):
    model, images = _mini()
    report = vc.explain(model, images)
    assert capsys.readouterr().out == ""
    assert "scan sites rewritten" in str(report)
