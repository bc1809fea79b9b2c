"""The `vmeanba` subcommands for users' own models: help texts, and calibrate -> report -> bench
end to end on a tiny model given as `module:factory` and data as `module:function`."""

from __future__ import annotations

import json
import textwrap

import pytest

from vmeanba_compiler.cli import main
from vmeanba_compiler.profile import Profile

USER_MODULE = textwrap.dedent(
    """
    import torch
    from vmeanba_compiler.models import build_vmamba

    def tiny_model():
        torch.manual_seed(0)
        return build_vmamba("vmamba_mini", in_chans=1, num_classes=10, patch_size=2)

    def labelled():
        gen = torch.Generator().manual_seed(0)
        return [(torch.rand(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen))
                for _ in range(2)]

    def images():
        return [inputs for inputs, _ in labelled()]
    """
)
SITES = ["stages.0.0.op:0", "stages.1.0.op:0"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_vmamba_user.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "my_vmamba_user"


@pytest.mark.parametrize("command, flags", [
    ("calibrate", ["--model", "--checkpoint", "--data", "--labelled", "--impact", "--out"]),
    ("report", ["PROFILE", "--model", "--data", "--out", "--random-orders", "--markdown"]),
    ("bench", ["--sites", "--top-k", "--threshold", "--max-accuracy-drop", "--profile", "--input-shape",
               "--repeats", "--threads", "--out"]),
    ("demo", ["--out", "--max-accuracy-drop", "--confidence", "--repeats", "--checkpoint"]),
    ("train-demo", ["--out", "--epochs", "--seed"]),
    ("experiments", ["--out", "--repeats", "--random-orders", "--threads"]),
    ("bench-scan", ["--dim", "--length", "--skip-inductor"]),
])
def test_every_subcommand_documents_its_flags(command, flags, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    missing = [flag for flag in flags if flag not in text]
    assert not missing, f"`vmeanba {command} --help` does not mention {missing}"


@pytest.mark.extended  # bench compiles the model with both backends
def test_calibrate_report_bench_end_to_end_on_a_user_model(user_module, tmp_path, capsys):
    model, data = f"{user_module}:tiny_model", f"{user_module}:labelled"
    assert main(["calibrate", "--model", model, "--data", data, "--labelled", "--impact", "loss",
                 "--out", "p.json", "--quiet"]) == 0
    profile = Profile.load(tmp_path / "p.json")
    assert profile.site_ids == SITES and profile.settings["impact"] == "loss" and profile.num_samples == 8
    assert "stages.1.0.op:0" in capsys.readouterr().out

    assert main(["report", "p.json", "--model", model, "--data", data, "--labelled", "--out", "rep",
                 "--random-orders", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "impact rank" in printed and "random (mean [min-max] of 2)" in printed
    for png in ("site_metrics.png", "accuracy_vs_k.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["bench", "--model", model, "--profile", "p.json", "--top-k", "1", "--input-shape", "2,1,8,8",
                 "--repeats", "2", "--threads", "1", "--out", "bench.json", "--quiet"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["results"]) == {"inductor", "vmeanba"}
    assert result["speedup_vs_inductor"] > 0 and len(result["results"]["vmeanba"]["samples_ms"]) == 2
    assert result["options"]["top_k"] == 1 and result["options"]["profile"] == profile.content_hash()
    assert result["machine"]["torch"] and result["input_shape"] == [2, 1, 8, 8] and result["threads"] == 1


def test_calibrate_with_unlabelled_data_and_kl_impact(user_module, tmp_path):
    assert main(["calibrate", "--model", f"{user_module}:tiny_model", "--data", f"{user_module}:images",
                 "--out", "kl.json", "--max-batches", "1", "--quiet"]) == 0
    profile = Profile.load(tmp_path / "kl.json")
    assert profile.settings["impact"] == "kl" and profile.num_batches == 1


def test_cli_errors_say_what_to_pass(user_module, tmp_path):
    with pytest.raises(SystemExit, match="--labelled"):
        main(["calibrate", "--model", f"{user_module}:tiny_model", "--data", f"{user_module}:images",
              "--impact", "loss", "--quiet"])
    with pytest.raises(ValueError, match="no attribute"):
        main(["calibrate", "--model", f"{user_module}:nothing", "--data", f"{user_module}:images", "--quiet"])
    with pytest.raises(SystemExit, match="exactly one of"):
        main(["bench", "--model", f"{user_module}:tiny_model", "--input-shape", "2,1,8,8"])
    with pytest.raises(SystemExit, match="--profile"):
        main(["bench", "--model", f"{user_module}:tiny_model", "--input-shape", "2,1,8,8", "--top-k", "1"])


def _subcommand(name: str):
    from vmeanba_compiler.cli import _parser

    (subparsers,) = [a for a in _parser()._actions if a.dest == "command"]
    return subparsers.choices[name]


@pytest.mark.parametrize("command, names", [("calibrate", ["dt_mode", "skip_mode"]),
                                            ("bench", ["dt_mode", "skip_mode", "metric", "top_k", "threshold"])])
def test_config_flags_come_from_vmeanba_config(command, names):
    """Choices, types and defaults of the flags are the config's, so the two cannot drift apart."""
    from vmeanba_compiler.config import VMeanbaConfig

    fields = VMeanbaConfig.cli_fields()
    actions = {a.dest: a for a in _subcommand(command)._actions}
    for name in names:
        action, field = actions[name], fields[name]
        assert action.option_strings == [f"--{name.replace('_', '-')}"]
        assert action.choices == field.metadata.get("choices")
        assert action.type is field.metadata.get("type", str)
        # bench's modes default to the profile's (None); calibrate's to the config's
        assert action.default == (None if command == "bench" and name.endswith("_mode") else field.default)
    assert tuple(actions["dt_mode"].choices) == ("effective", "raw")  # today's choices, read through the config


def _bench_args(profile_path, **flags):
    import argparse

    values = {"sites": None, "top_k": None, "threshold": None, "max_accuracy_drop": None, "metric": "ratio",
              "profile": str(profile_path), "dt_mode": None, "skip_mode": None, "data": None, "labelled": False,
              "command": "bench"}
    return argparse.Namespace(**{**values, **flags})


def test_bench_takes_the_profiles_rewrite_modes_and_refuses_others(tmp_path):
    import torch

    from vmeanba_compiler.commands import _selection_options
    from vmeanba_compiler.profile import SiteSignature, SiteStats

    sig = SiteSignature(dim=8, state=4, groups=2, b_form="grouped", c_form="grouped", has_D=True, has_z=True)
    stats = SiteStats()
    stats.impact.update(torch.tensor([0.1]))
    path = Profile({"scan:0": sig}, "ab" * 32, {"scan:0": stats},
                   settings={"dt_mode": "raw", "skip_mode": "exact"}).save(tmp_path / "p.json")
    options = _selection_options(_bench_args(path, top_k=1), model=None)
    assert (options["dt_mode"], options["skip_mode"], options["top_k"]) == ("raw", "exact", 1)
    with pytest.raises(SystemExit, match="calibrated with dt_mode='raw' but the vmeanba options say "
                                         "dt_mode='effective'"):
        _selection_options(_bench_args(path, top_k=1, dt_mode="effective"), model=None)
    # named sites need no profile: an explicit mode is passed through as it is
    assert _selection_options(_bench_args(path, sites="scan:0", dt_mode="raw"), model=None) == {
        "dt_mode": "raw", "sites": ["scan:0"]}
