"""The calibration profile's data model (docs/DESIGN.md section 3): stable statistics that merge
exactly, a versioned file format whose errors say what to do, and model-compatibility checks.

Variance oracle: exact rational arithmetic (fractions.Fraction) on the float64 inputs, so the
reference has no rounding at all; numpy's two-pass float64 var is checked against it as well.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vmeanba_compiler.profile import (
    PROFILE_FORMAT_VERSION,
    Profile,
    ProfileMismatchError,
    RunningMean,
    SiteSignature,
    SiteStats,
    parameter_hash,
)

EPS64 = float(np.finfo(np.float64).eps)
# Relative accuracy asked of the streaming statistics on well-conditioned data.
REL_TOL = 1e-12


def _exact_mean_var(values: Sequence[float]) -> tuple[float, float]:
    exact = [Fraction(v) for v in values]
    mean = sum(exact) / len(exact)
    return float(mean), float(sum((v - mean) ** 2 for v in exact) / len(exact))


def _variance_tolerance(values: np.ndarray, variance: float, chunks: int) -> float:
    """REL_TOL, plus the error a float64 mean must carry: the stored mean is off by up to a few
    ulp of max|x|, and each of the `chunks` merges turns that into a first-order error of about
    eps * max|x| * std in the variance (the naive formula's is second order: eps * max|x|^2)."""
    scale = float(np.max(np.abs(values)))
    return REL_TOL * variance + 4 * chunks * EPS64 * scale * math.sqrt(variance) + (4 * EPS64 * scale) ** 2


def _chunked(values: np.ndarray, cuts: Sequence[int]) -> RunningMean:
    parts = [RunningMean() for _ in range(len(cuts) + 1)]
    for part, chunk in zip(parts, np.split(values, sorted(cuts))):
        part.update(torch.from_numpy(chunk))
    merged = RunningMean()
    for part in parts:
        merged = merged.merge(part)
    return merged


# Magnitudes from 1e-8 to 1e8 in one array, and arrays that sit on a large offset.
scaled_floats = st.builds(lambda m, e: m * 10.0**e, st.floats(-1.0, 1.0), st.integers(-8, 8))


@st.composite
def arrays_and_cuts(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    values = draw(st.lists(scaled_floats, min_size=1, max_size=80))
    if draw(st.booleans()):
        offset = draw(st.sampled_from([1e3, -1e6, 1e8]))
        values = [offset + v for v in values]
    array = np.asarray(values, dtype=np.float64)
    cuts = draw(st.lists(st.integers(0, len(values)), max_size=12))
    return array, cuts


@given(arrays_and_cuts())
def test_running_mean_merge_of_random_chunks_equals_exact_and_numpy(case: tuple[np.ndarray, list[int]]) -> None:
    values, cuts = case
    whole = RunningMean()
    whole.update(torch.from_numpy(values))
    merged = _chunked(values, cuts)
    exact_mean, exact_var = _exact_mean_var(values.tolist())
    mean_tol = REL_TOL * float(np.max(np.abs(values)))
    var_tol = _variance_tolerance(values, exact_var, len(cuts) + 1)
    for stats in (whole, merged):
        assert stats.count == len(values)
        assert abs(stats.mean - exact_mean) <= mean_tol
        assert abs(stats.variance - exact_var) <= var_tol
        assert stats.std == pytest.approx(math.sqrt(stats.variance))
    assert abs(float(np.mean(values)) - exact_mean) <= mean_tol
    assert abs(float(np.var(values)) - exact_var) <= var_tol
    assert abs(merged.variance - float(np.var(values))) <= 2 * var_tol


@pytest.mark.parametrize("noise", [1.0, 1e5])
def test_running_mean_stays_accurate_on_large_offset_where_naive_sum_of_squares_fails(noise: float) -> None:
    """Values 1e8 + noise: E[x^2] - E[x]^2 loses ~16 digits to cancellation at noise 1 and ~6 at
    noise 1e5; the merged Welford/Chan statistics lose only ~eps * 1e8 / noise (relative)."""
    values = 1e8 + noise * np.random.default_rng(0).standard_normal(10_000)
    _, exact_var = _exact_mean_var(values.tolist())
    streamed = _chunked(values, list(range(100, 10_000, 100)))
    naive = float(np.mean(values * values) - np.mean(values) ** 2)

    streamed_error = abs(streamed.variance - exact_var) / exact_var
    naive_error = abs(naive - exact_var) / exact_var
    assert streamed_error < 10 * EPS64 * 1e8 / noise
    assert naive_error > 1e4 * streamed_error
    if noise == 1e5:  # well-conditioned enough for the streaming result to meet REL_TOL
        assert streamed_error < REL_TOL < naive_error


def test_running_mean_merge_is_order_independent_and_empty_is_identity() -> None:
    rng = np.random.default_rng(1)
    a, b = RunningMean(), RunningMean()
    a.update(torch.from_numpy(rng.normal(3.0, 2.0, 50)))
    b.update(torch.from_numpy(rng.normal(-7.0, 0.5, 30)))
    ab, ba = a.merge(b), b.merge(a)
    assert ab.count == ba.count == 80
    assert ab.mean == pytest.approx(ba.mean, rel=1e-15)
    assert ab.m2 == pytest.approx(ba.m2, rel=1e-15)
    assert a.merge(RunningMean()) == a and RunningMean().merge(a) == a
    assert a.merge(RunningMean()) is not a  # merge never aliases its inputs
    empty = RunningMean()
    empty.update(torch.empty(0))
    assert empty == RunningMean() and empty.variance == 0.0 and empty.std == 0.0


def test_running_mean_update_accepts_any_dtype_and_rejects_non_finite() -> None:
    stats = RunningMean()
    stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16))
    assert (stats.count, stats.mean, stats.variance) == (4, 2.5, 1.25)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            stats.update(torch.tensor([1.0, bad]))
    assert stats.count == 4  # a rejected batch leaves the statistics unchanged
    assert RunningMean.from_dict(stats.to_dict()) == stats


def _site_stats(seed: int, impact: bool = True) -> SiteStats:
    gen = torch.Generator().manual_seed(seed)
    stats = SiteStats()
    stats.channel_variance.update(torch.rand(4, 8, generator=gen) * 0.01)
    stats.mean_square.update(torch.randn(4, 8, 16, generator=gen).square())
    stats.rel_err_num, stats.rel_err_den = 0.25 * (seed + 1), 10.0 * (seed + 1)
    if impact:
        stats.impact.update(torch.rand(3, generator=gen))
    return stats


def test_site_stats_properties() -> None:
    stats = _site_stats(0)
    assert stats.variance == stats.channel_variance.mean
    assert stats.ratio == stats.variance / stats.mean_square.mean
    assert stats.relative_error == 0.025
    assert stats.impact_score == stats.impact.mean
    assert SiteStats().impact_score is None


@pytest.mark.parametrize(
    ("variance", "mean_square", "ratio"),
    [(0.0, 0.0, 0.0), (0.5, 0.0, math.inf), (0.0, 2.0, 0.0), (0.5, 2.0, 0.25)],
)
def test_site_stats_ratio_edge_cases(variance: float, mean_square: float, ratio: float) -> None:
    stats = SiteStats(channel_variance=RunningMean(1, variance, 0.0), mean_square=RunningMean(1, mean_square, 0.0))
    assert stats.ratio == ratio


@pytest.mark.parametrize(("num", "den", "expected"), [(0.0, 0.0, 0.0), (1.0, 0.0, math.inf), (1.0, 4.0, 0.25)])
def test_site_stats_relative_error_edge_cases(num: float, den: float, expected: float) -> None:
    assert SiteStats(rel_err_num=num, rel_err_den=den).relative_error == expected


def test_site_stats_merge_equals_accumulating_both_batches() -> None:
    first, second = torch.rand(5, 7, dtype=torch.float64), torch.rand(3, 7, dtype=torch.float64)
    parts = [SiteStats(rel_err_num=1.0, rel_err_den=2.0), SiteStats(rel_err_num=3.0, rel_err_den=4.0)]
    whole = SiteStats(rel_err_num=4.0, rel_err_den=6.0)
    for part, batch in zip(parts, (first, second)):
        for stats in (part, whole):
            stats.channel_variance.update(batch)
            stats.mean_square.update(batch.square())
            stats.impact.update(batch.sum())
    merged = parts[0].merge(parts[1])
    for name in ("channel_variance", "mean_square", "impact"):
        got, want = getattr(merged, name), getattr(whole, name)
        assert got.count == want.count
        assert got.mean == pytest.approx(want.mean, rel=1e-14)
        assert got.m2 == pytest.approx(want.m2, rel=1e-12)
    assert (merged.rel_err_num, merged.rel_err_den) == (4.0, 6.0)
    assert SiteStats.from_dict(merged.to_dict()) == merged


SIG = SiteSignature(dim=384, state=16, groups=4, b_form="grouped", c_form="grouped", has_D=True, has_z=False)
SIG_SHARED = SiteSignature(dim=96, state=8, groups=1, b_form="shared", c_form="shared", has_D=True, has_z=True)


def _profile(seed: int = 0, **overrides: object) -> Profile:
    fields = dict(
        signatures={"stages.0.0.op:0": SIG, "stages.0.1.op:0": SIG, "stages.1.0.op:0": SIG_SHARED},
        parameter_hash="ab" * 32,
        stats={"stages.0.0.op:0": _site_stats(seed), "stages.0.1.op:0": _site_stats(seed + 1, impact=False)},
        num_batches=2,
        num_samples=16,
        settings={"dt_mode": "effective", "skip_mode": "exact", "impact": "kl"},
    )
    fields.update(overrides)
    return Profile(**fields)  # type: ignore[arg-type]


def test_site_signature_validates_and_round_trips() -> None:
    assert SiteSignature.from_dict(SIG.to_dict()) == SIG
    with pytest.raises(ValueError, match="b_form"):
        SiteSignature(dim=8, state=4, groups=2, b_form="tiled", c_form="shared", has_D=False, has_z=False)
    with pytest.raises(ValueError, match="groups=3 must divide dim=8"):
        SiteSignature(dim=8, state=4, groups=3, b_form="grouped", c_form="shared", has_D=False, has_z=False)


def test_profile_site_ids_and_metrics() -> None:
    profile = _profile()
    assert profile.format_version == PROFILE_FORMAT_VERSION
    assert profile.site_ids == ["stages.0.0.op:0", "stages.0.1.op:0", "stages.1.0.op:0"]
    stats = profile.stats["stages.0.0.op:0"]
    assert profile.metric("stages.0.0.op:0", "ratio") == stats.ratio
    assert profile.metric("stages.0.0.op:0", "variance") == stats.variance
    assert profile.metric("stages.0.0.op:0", "relative_error") == stats.relative_error
    assert profile.metric("stages.0.0.op:0", "impact") == stats.impact_score
    with pytest.raises(ValueError, match="unknown profile metric 'kl'.*ratio, variance, relative_error, impact"):
        profile.metric("stages.0.0.op:0", "kl")
    assert profile.metric("stages.0.1.op:0", "impact") is None  # calibrated without impact
    with pytest.raises(KeyError, match="no statistics for site 'stages.1.0.op:0'"):
        profile.metric("stages.1.0.op:0", "ratio")


def test_profile_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="sites without a signature: nowhere:0"):
        _profile(stats={"nowhere:0": SiteStats()})
    with pytest.raises(ValueError, match="settings must survive a JSON round trip"):
        _profile(settings={"sizes": (1, 2)})


def test_profile_save_load_round_trip_and_content_hash(tmp_path: Path) -> None:
    profile = _profile()
    path = profile.save(tmp_path / "profile.json")
    assert path == tmp_path / "profile.json"
    assert json.loads(path.read_text())["format"] == "vmeanba-profile"
    loaded = Profile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    assert loaded.content_hash() == profile.content_hash()
    assert Profile.load(loaded.save(tmp_path / "again.json")).content_hash() == profile.content_hash()

    changed = Profile.load(path)
    changed.stats["stages.0.0.op:0"].rel_err_num += 1e-9
    assert changed.content_hash() != profile.content_hash()
    assert _profile(settings={"impact": "loss"}).content_hash() != profile.content_hash()


def test_profile_save_is_atomic_when_serialisation_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _profile(seed=0).save(tmp_path / "profile.json")
    old_bytes = path.read_bytes()
    real_dumps = json.dumps
    partial_writes: list[int] = []

    def dump_half_then_fail(obj: object, fp, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
        text = real_dumps(obj, **kwargs)
        fp.write(text[: len(text) // 2])
        fp.flush()
        partial_writes.append(len(text) // 2)
        raise RuntimeError("serialisation failed midway")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    with pytest.raises(RuntimeError, match="midway"):
        _profile(seed=5).save(path)
    assert partial_writes and partial_writes[0] > 0  # half a file really was written somewhere
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]
    monkeypatch.undo()
    assert Profile.load(path).to_dict() == _profile(seed=0).to_dict()


def test_load_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json does not exist.*vmeanba_compiler.calibrate"):
        Profile.load(tmp_path / "nope.json")


@pytest.mark.parametrize("content", ["half", b"not json at all", b"\xff\xfe\x00garbage"])
def test_load_corrupt_file_says_not_valid_json(tmp_path: Path, content: object) -> None:
    path = tmp_path / "profile.json"
    if content == "half":
        full = _profile().save(path).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"profile file .*profile\.json is not valid JSON \(truncated or corrupt\?\): .+; re-run calibration",
    ):
        Profile.load(path)


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def _modified(edit) -> dict:  # type: ignore[no-untyped-def]
    data = _profile().to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "onnx"}, r"this is not a vmeanba profile \(expected format 'vmeanba-profile', found 'onnx'\)"),
        ([1, 2, 3], "this is not a vmeanba profile"),
        (_modified(lambda d: d.update(format_version=2)),
         r"format version 2 is newer than this vmeanba-compiler supports \(version 1\); upgrade vmeanba-compiler"),
        (_modified(lambda d: d.update(format_version=0)),
         r"format version 0 is no longer supported.*re-run calibration \(vmeanba_compiler\.calibrate\)"),
        (_modified(lambda d: d.pop("parameter_hash")), "profile field parameter_hash is missing"),
        (_modified(lambda d: d.update(num_batches="2")), "profile field num_batches must be an integer, got '2'"),
        (_modified(lambda d: d["stats"]["stages.0.0.op:0"]["mean_square"].pop("m2")),
         r"profile field stats\['stages.0.0.op:0'\]\.mean_square\.m2 is missing"),
        (_modified(lambda d: d["signatures"]["stages.1.0.op:0"].update(has_z="yes")),
         r"profile field signatures\['stages.1.0.op:0'\]\.has_z must be true or false"),
        (_modified(lambda d: d["stats"]["stages.0.0.op:0"].update(rel_err_num=float("nan"))),
         r"rel_err_num must be a finite number, got nan"),
    ],
)
def test_load_invalid_profile_names_the_problem(tmp_path: Path, data: object, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message):
        Profile.load(path)
    with pytest.raises(ValueError, match=message):
        Profile.from_dict(data)


def test_profile_merge_sums_and_merges_stats_exactly() -> None:
    a, b = _profile(seed=0), _profile(seed=3)
    b.stats["stages.1.0.op:0"] = _site_stats(9)
    merged = a.merge(b)
    assert (merged.num_batches, merged.num_samples) == (4, 32)
    assert merged.signatures == a.signatures and merged.settings == a.settings
    for site in ("stages.0.0.op:0", "stages.0.1.op:0"):
        assert merged.stats[site] == a.stats[site].merge(b.stats[site])
    assert merged.stats["stages.1.0.op:0"] == b.stats["stages.1.0.op:0"]
    assert merged.stats["stages.1.0.op:0"] is not b.stats["stages.1.0.op:0"]
    assert a.to_dict() == _profile(seed=0).to_dict()  # inputs untouched


def test_profile_merge_refuses_other_models_or_settings() -> None:
    other_sites = _profile(signatures={"stages.0.0.op:0": SIG_SHARED, "stages.0.1.op:0": SIG, "x.op:0": SIG},
                           stats={}, parameter_hash="cd" * 32, settings={"impact": "loss"})
    with pytest.raises(ValueError, match="cannot merge") as info:
        _profile().merge(other_sites)
    message = str(info.value)
    for expected in ("x.op:0", "stages.1.0.op:0", "stages.0.0.op:0 (differs in", "parameter_hash differs: abab",
                     "settings differ in: dt_mode", "impact ('kl' vs 'loss')"):
        assert expected in message


def test_check_compatible_reports_missing_extra_and_different_sites_together() -> None:
    profile = _profile()
    model = {"stages.0.0.op:0": SIG, "stages.0.1.op:0": SIG_SHARED, "stages.2.0.op:0": SIG}
    profile.check_compatible(dict(profile.signatures), parameter_hash=profile.parameter_hash)
    with pytest.raises(ProfileMismatchError) as info:
        profile.check_compatible(model)
    message = str(info.value)
    assert "sites in the model but missing from the profile: stages.2.0.op:0" in message
    assert "sites in the profile but not in the model: stages.1.0.op:0" in message
    assert "stages.0.1.op:0 (differs in dim, state, groups, b_form, c_form, has_z)" in message
    assert f"profile: {SIG.describe()}" in message and f"model: {SIG_SHARED.describe()}" in message
    assert "calibrated on a different model; re-run vmeanba_compiler.calibrate on this one" in message
    assert isinstance(info.value, ValueError)


def test_check_compatible_partial_accepts_a_subset_but_not_missing_or_different_sites() -> None:
    """One Dynamo graph (after a graph break) holds only some of the model's sites."""
    profile = _profile()
    profile.check_compatible({"stages.0.1.op:0": SIG}, partial=True)
    with pytest.raises(ProfileMismatchError) as info:
        profile.check_compatible({"stages.0.1.op:0": SIG_SHARED, "stages.9.op:0": SIG}, partial=True)
    message = str(info.value)
    assert "sites in the model but missing from the profile: stages.9.op:0" in message
    assert "stages.0.1.op:0 (differs in" in message
    assert "but not in the model" not in message
    with pytest.raises(ProfileMismatchError, match="but not in the model: stages.0.0.op:0, stages.1.0.op:0"):
        profile.check_compatible({"stages.0.1.op:0": SIG})


def test_check_compatible_reports_different_weights() -> None:
    profile = _profile()
    with pytest.raises(ProfileMismatchError, match=r"weights differ.*cdcdcdcdcdcd\.\.\. for the model, "
                                                   r"abababababab\.\.\. in the profile.*vmeanba_compiler\.calibrate"):
        profile.check_compatible(dict(profile.signatures), parameter_hash="cd" * 32)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def test_parameter_hash_identifies_weights_and_buffers() -> None:
    a, b = _model(), _model()
    assert parameter_hash(a) == parameter_hash(b)
    assert len(parameter_hash(a)) == 64 and int(parameter_hash(a), 16) >= 0
    with torch.no_grad():
        b[0].weight[1, 2] += 1e-6
    assert parameter_hash(a) != parameter_hash(b)
    c = _model()
    c[1].running_mean[0] = 0.5
    assert parameter_hash(a) != parameter_hash(c)
    assert parameter_hash(_model().to(torch.bfloat16)) != parameter_hash(a)  # dtype is part of the hash


def test_a_threshold_on_an_older_profiles_whole_output_metrics_is_warned_about(caplog) -> None:
    """Profiles from before the metrics left out the exact D*u skip carry no "measured_output"
    setting: a threshold on their ratio selects by other numbers, so the config says so."""
    from vmeanba_compiler.config import VMeanbaConfig

    older = _profile()  # settings as an older release wrote them
    current = _profile(settings={**older.settings, "measured_output": "approximated_part"})
    mean_skip = _profile(settings={**older.settings, "skip_mode": "mean"})  # whole output is right there
    with caplog.at_level("WARNING", logger="vmeanba_compiler"):
        VMeanbaConfig.from_options({"profile": older, "threshold": 0.5})
    assert "older vmeanba-compiler" in caplog.text and "re-run vmeanba_compiler.calibrate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vmeanba_compiler"):
        VMeanbaConfig.from_options({"profile": current, "threshold": 0.5})
        VMeanbaConfig.from_options({"profile": older, "top_k": 1})  # impact does not involve the skip
        VMeanbaConfig.from_options({"profile": mean_skip, "threshold": 0.5, "skip_mode": "mean"})
    assert caplog.text == ""
