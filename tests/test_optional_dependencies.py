"""scikit-learn and matplotlib are the `demo` extra, not dependencies of the backend.

Their absence is simulated by putting None into sys.modules (Python then refuses the import, as
for a package that is not installed); everything else imports without them, and what needs them
stops with a message that names the extra to install.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmeanba_compiler import cli
from vmeanba_compiler.extras import MissingExtraError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def without_demo_packages(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("sklearn", "matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.mark.parametrize("argv, package", [
    (["demo"], "scikit-learn"),
    (["train-demo", "--out", "unused.pt"], "scikit-learn"),
    (["experiments", "--out", "unused"], "scikit-learn"),
    (["report", "unused.json"], "matplotlib"),
])
def test_cli_commands_name_the_missing_extra(without_demo_packages, capsys, argv, package):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert package in err and "vmeanba-compiler[demo]" in err, err


def test_library_calls_name_the_missing_extra(without_demo_packages):
    from vmeanba_compiler.digits import load_digits_data
    from vmeanba_compiler.plots import plot_site_metrics

    with pytest.raises(MissingExtraError, match=r"scikit-learn.*\[demo\]"):
        load_digits_data()
    with pytest.raises(MissingExtraError, match=r"matplotlib.*\[demo\]"):
        plot_site_metrics(None, "unused.png")


def test_backend_and_calibration_import_without_demo_packages():
    """In a fresh interpreter with the demo packages blocked: the package, the backend (through
    its entry point) and calibrate work; nothing imports scikit-learn or matplotlib."""
    script = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None
        sys.modules["matplotlib"] = None
        import torch
        import vmeanba_compiler as vc
        from vmeanba_compiler import cli, commands, demo, experiments, training  # noqa: F401
        from vmeanba_compiler.models import build_vmamba
        model = build_vmamba("vmamba_mini").eval()
        images = torch.randn(1, 3, 8, 8)
        assert vc.calibrate(model, [images], impact=False, progress=False).site_ids
        with torch.no_grad():
            torch.compile(model, backend="vmeanba", options={"inductor": False})(images)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_demo_packages_are_an_extra_the_readme_installs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hard = " ".join(project["dependencies"])
    assert "scikit-learn" not in hard and "matplotlib" not in hard
    assert set(project["optional-dependencies"]["demo"]) == {"scikit-learn", "matplotlib"}
    assert "vmeanba-compiler[demo]" in project["optional-dependencies"]["test"]
    first_command = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert 'pip install -e ".[demo,test]"' in first_command and "vmeanba demo" in first_command
    assert 'pip install -q -e ".[demo,test]"' in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_exactly_the_readmes_test_command():
    test_command = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[1]
    pytest_call = test_command.split("&& ", 1)[1]
    assert pytest_call.startswith("python -m pytest")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line and not line.startswith("#")]
    assert ci_lines == [pytest_call, pytest_call + " -m extended"]  # the README's command, then the extended tier
