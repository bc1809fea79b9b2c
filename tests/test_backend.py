"""The `vmeanba` backend with no calibration profile: registered by entry point, options
validated, output equal to eager execution, training through it works."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from vmeanba_compiler.config import VMeanbaConfig
from vmeanba_compiler.models import build_vmamba
from vmeanba_compiler.testing import MODEL_TOLERANCES


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_name_resolves_in_fresh_interpreter_without_importing_the_package():
    script = textwrap.dedent(
        """
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        x = torch.randn(3, 4)
        assert "vmeanba_compiler" not in sys.modules
        out = torch.compile(model, backend="vmeanba")(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert "vmeanba_compiler.backend" in sys.modules, "the entry point did not load the backend"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_mini_vmamba_equals_eager_without_profile(dtype):
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval().to(dtype)
    images = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        expected = model(images)
        actual = torch.compile(model, backend="vmeanba")(images)
    rtol, atol = MODEL_TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_option_inductor_false_runs_the_graph_eagerly_and_bit_identically():
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        actual = torch.compile(model, backend="vmeanba", options={"inductor": False})(images)
        expected = model(images)
    assert torch.equal(actual, expected)


def test_unknown_option_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown vmeanba option\(s\) 'threshhold'.*valid options are: inductor"):
        VMeanbaConfig.from_options({"threshhold": 0.1})


def test_option_of_wrong_type_is_an_error_naming_it():
    with pytest.raises(TypeError, match="'inductor' must be True or False"):
        VMeanbaConfig.from_options({"inductor": "yes"})
    with pytest.raises(TypeError, match="options must be a dict"):
        VMeanbaConfig.from_options(["inductor"])


def test_inductor_config_names_are_checked_against_inductor():
    config = VMeanbaConfig.from_options({"inductor_config": {"fx_graph_cache": False}})
    assert dict(config.inductor_config) == {"fx_graph_cache": False}
    with pytest.raises(ValueError, match="'no_such_setting', which is not a torch._inductor.config setting"):
        VMeanbaConfig.from_options({"inductor_config": {"no_such_setting": 1}})


def test_config_is_frozen():
    config = VMeanbaConfig.from_options({})
    with pytest.raises(Exception):
        config.inductor = False  # type: ignore[misc]


def test_bad_option_surfaces_through_torch_compile():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(Exception, match="unknown vmeanba option"):
        torch.compile(model, backend="vmeanba", options={"bogus": 1})(torch.randn(1, 2))


def _one_scan_args(seed: int = 0, batch: int = 2, dim: int = 8, state: int = 4, length: int = 12, groups: int = 2):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    return (randn(batch, dim, length), randn(batch, dim, length), -torch.rand(dim, state, generator=gen) - 0.5,
            randn(batch, groups, state, length), randn(batch, groups, state, length), randn(dim),
            randn(batch, dim, length), 0.5 * randn(dim))


def test_profile_measured_under_other_rewrite_modes_is_refused_naming_both_and_the_fix():
    import vmeanba_compiler as vc
    from compile_helpers import OneScan

    args = _one_scan_args()
    profile = vc.calibrate(OneScan(True), [args], impact=False, dt_mode="raw", progress=False)
    assert profile.settings["dt_mode"] == "raw"
    compiled = torch.compile(OneScan(True), backend="vmeanba",
                             options={"profile": profile, "threshold": 1e9, "inductor": False})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(*args)
    message = str(info.value)
    for part in ("calibrated with dt_mode='raw'", "options say dt_mode='effective'", "Pass options dt_mode='raw'",
                 "re-run vmeanba_compiler.calibrate with dt_mode='effective'"):
        assert part in message, message
    assert "skip_mode" not in message  # only the setting that differs is named
    # the config refuses it directly too, and explain (which reads the same config)
    with pytest.raises(vc.ProfileMismatchError, match="calibrated with dt_mode='raw'"):
        VMeanbaConfig.from_options({"profile": profile, "threshold": 1e9})
    with pytest.raises(vc.ProfileMismatchError, match="calibrated with dt_mode='raw'"):
        vc.explain(OneScan(True), args, profile=profile, threshold=1e9)


def test_profile_measured_under_the_configured_rewrite_modes_compiles_and_rewrites():
    """Negative control of the refusal: the same profile with matching options rewrites its site."""
    import vmeanba_compiler as vc
    from compile_helpers import OneScan
    from vmeanba_compiler.passes.reduced_scan import reduced_selective_scan

    args = _one_scan_args()
    profile = vc.calibrate(OneScan(True), [args], impact=False, dt_mode="raw", progress=False)
    compiled = torch.compile(OneScan(True), backend="vmeanba",
                             options={"profile": profile, "threshold": 1e9, "dt_mode": "raw", "inductor": False})
    with torch.no_grad():
        actual = compiled(*args)
        expected = reduced_selective_scan(*args, True, groups=2, dt_mode="raw")[0]
        effective = reduced_selective_scan(*args, True, groups=2, dt_mode="effective")[0]
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(actual, effective, rtol=1e-4, atol=1e-4)  # the modes are told apart by the output
