"""Calibration, profiles in the backend, selection options, explain, and their bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

import vmeanba_compiler as vc
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.testing import assert_backend_matches_eager


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    batches = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    return model, batches


@pytest.fixture(scope="module")
def mini_profile(mini):
    model, batches = mini
    return vc.calibrate(model, batches, progress=False)


MINI_SITES = ["stages.0.0.op:0", "stages.1.0.op:0"]


def test_calibration_records_every_site_with_finite_metrics(mini_profile):
    assert mini_profile.site_ids == MINI_SITES
    assert mini_profile.num_batches == 3 and mini_profile.num_samples == 6
    for site in MINI_SITES:
        for metric in ("ratio", "variance", "relative_error", "impact"):
            value = mini_profile.metric(site, metric)
            assert value is not None and value == value and value >= 0, (site, metric, value)
        assert mini_profile.stats[site].impact.count == 3


def test_calibration_statistics_merge_exactly_across_batches(mini):
    model, batches = mini
    whole = vc.calibrate(model, batches, progress=False)
    parts = vc.calibrate(model, batches[:1], progress=False).merge(vc.calibrate(model, batches[1:], progress=False))
    for site in MINI_SITES:
        for metric in ("ratio", "variance", "relative_error", "impact"):
            assert parts.metric(site, metric) == pytest.approx(whole.metric(site, metric), rel=1e-9)


def test_calibration_with_a_dataloader_and_task_loss(mini):
    model, _ = mini
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    profile = vc.calibrate(model, loader, loss_fn=torch.nn.functional.cross_entropy, progress=False)
    assert profile.settings["impact"] == "loss" and profile.num_batches == 2
    assert profile.settings["measured_output"] == "approximated_part"  # what a threshold is judged on


def test_profile_round_trip_and_threshold_compile_equals_eager_rewrite(mini, mini_profile, tmp_path):
    model, batches = mini
    path = mini_profile.save(tmp_path / "mini.json")
    loaded = vc.Profile.load(path)
    threshold = (loaded.metric(MINI_SITES[0], "ratio") + loaded.metric(MINI_SITES[1], "ratio")) / 2
    report = vc.explain(model, batches[0], profile=str(path), threshold=threshold)
    assert len(report.rewritten) == 1 and report.scan_flops_removed > 0
    assert_backend_matches_eager(model, batches[0], profile=str(path), threshold=threshold)


def test_top_k_rewrites_the_lowest_impact_sites(mini, mini_profile):
    model, batches = mini
    lowest = min(MINI_SITES, key=lambda s: mini_profile.metric(s, "impact"))
    report = vc.explain(model, batches[0], profile=mini_profile, top_k=1)
    assert report.rewritten == [lowest]
    assert "impact rank 1" in str(report)


def test_changing_the_profile_never_serves_a_stale_graph(mini, mini_profile):
    """The rewrite runs before Inductor, so the graph Inductor caches differs by selection;
    with the FX graph cache on, a second compile with another selection must not reuse it."""
    model, batches = mini
    cache_on = {"inductor_config": {"fx_graph_cache": True}}
    with torch.no_grad():
        plain = model(batches[0])
        torch._dynamo.reset()
        everything = torch.compile(model, backend="vmeanba", options={**cache_on, "profile": mini_profile, "threshold": 10.0})(batches[0])
        torch._dynamo.reset()
        nothing = torch.compile(model, backend="vmeanba", options={**cache_on, "profile": mini_profile, "threshold": 0.0})(batches[0])
        torch._dynamo.reset()
    assert not torch.allclose(everything, plain, rtol=0, atol=1e-7)
    torch.testing.assert_close(nothing, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.extended  # a full-size model through Inductor: 1-2 min of compiling on 2 cores
def test_tiny_vmamba_calibrate_save_load_compile_with_threshold(tmp_path):
    torch.manual_seed(0)
    model = build_vmamba("vmamba_v0_tiny").eval()
    images = torch.randn(1, 3, 64, 64)  # profiles are per site, not per resolution: 64x64 is enough
    profile = vc.calibrate(model, [images], progress=False)
    assert len(profile.site_ids) == 15
    path = profile.save(tmp_path / "tiny.json")
    ratios = sorted(profile.metric(s, "ratio") for s in profile.site_ids)
    threshold = ratios[len(ratios) // 2]
    report = vc.explain(model, images, profile=str(path), threshold=threshold)
    expected = [s for s in profile.site_ids if profile.metric(s, "ratio") <= threshold]
    assert sorted(report.rewritten) == expected and len(expected) >= 8
    assert all(f"REWRITE" in line for line in str(report).splitlines() if line.split(" ")[0] in expected)
    assert_backend_matches_eager(model, images, profile=vc.Profile.load(path), threshold=threshold)


# ---------------------------------------------------------------- bad input: each a clear error


def test_profile_of_another_model_is_refused_naming_the_sites(mini_profile):
    other = build_vmamba("vmamba_mini", depths=(1, 2)).eval()
    with pytest.raises(vc.ProfileMismatchError, match=r"stages\.1\.1\.op:0"):
        vc.explain(other, torch.randn(1, 3, 32, 32), profile=mini_profile, threshold=0.5)
    wider = build_vmamba("vmamba_mini", embed_dim=8).eval()
    with pytest.raises(vc.ProfileMismatchError, match=r"(?s)stages\.0\.0\.op:0 \(differs in dim\).*different model"):
        vc.explain(wider, torch.randn(1, 3, 32, 32), profile=mini_profile, threshold=0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_during_calibration_are_an_error_naming_the_site(mini, bad):
    model, batches = mini
    poisoned = batches[0].clone()
    poisoned[0, 0, 0, 0] = bad
    with pytest.raises(vc.CalibrationError, match=r"scan site 'stages\.0\.0\.op:0'.*NaN or inf.*batch 1"):
        vc.calibrate(model, [batches[1], poisoned], progress=False)


@pytest.mark.parametrize("threshold", [-0.1, float("inf"), float("nan"), "0.1", True])
def test_bad_threshold_is_refused(mini_profile, threshold):
    with pytest.raises(ValueError, match="'threshold' must be a finite number >= 0"):
        vc.VMeanbaConfig.from_options({"profile": mini_profile, "threshold": threshold})


def test_top_k_larger_than_the_number_of_sites_is_refused(mini_profile):
    with pytest.raises(ValueError, match="top_k=3 but the profile has only 2 sites"):
        vc.VMeanbaConfig.from_options({"profile": mini_profile, "top_k": 3})


def test_unknown_site_id_is_an_error_listing_the_known_ids(mini):
    model, batches = mini
    with pytest.raises(Exception, match=r"unknown site id\(s\) 'stages\.0\.0:0'.*stages\.0\.0\.op:0, stages\.1\.0\.op:0"):
        vc.explain(model, batches[0], sites=["stages.0.0:0"])


@pytest.mark.parametrize("option", [{"threshold": 0.1}, {"top_k": 1}])
def test_selection_without_calibration_data_is_refused_not_guessed(option):
    with pytest.raises(ValueError, match="no profile was given"):
        vc.VMeanbaConfig.from_options(option)


def test_two_selection_options_at_once_are_refused(mini_profile):
    with pytest.raises(ValueError, match="pass only one"):
        vc.VMeanbaConfig.from_options({"profile": mini_profile, "top_k": 1, "sites": ["stages.0.0.op:0"]})


def test_empty_calibration_data_is_refused(mini):
    model, _ = mini
    with pytest.raises(vc.CalibrationError, match="no batches"):
        vc.calibrate(model, [], progress=False)


def test_corrupt_profile_path_in_options_is_a_clear_error(tmp_path, mini_profile):
    path = mini_profile.save(tmp_path / "p.json")
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        vc.VMeanbaConfig.from_options({"profile": str(path), "threshold": 0.1})
    payload = json.loads(mini_profile.save(tmp_path / "q.json").read_text())
    assert payload["format"] == "vmeanba-profile"
