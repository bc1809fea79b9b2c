"""The GPU session's end-to-end benchmark and its driver script, checked where no GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmeanba_compiler.bench import end_to_end

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_time_a_gpu_it_does_not_have(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        end_to_end.main(["--out", str(tmp_path / "e2e.json")])
    assert exit_info.value.code == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "e2e.json").exists()


def test_the_gpu_script_refuses_an_unknown_step(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_evidence.sh"), "no-such-step"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert run.returncode == 2
    assert "unknown step no-such-step" in run.stdout


@pytest.mark.extended  # three compilations of a small model
def test_smoke_run_on_cpu_writes_every_contender(tmp_path):
    out = tmp_path / "e2e.json"
    assert end_to_end.main(["--device", "cpu", "--models", "vmamba_mini", "--batches", "2", "--precisions",
                            "float32", "--image-size", "32", "--repeats", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]  # vmamba_mini has two scan sites
    assert run["sites"] == 2 and set(run["results"]) == {"inductor", "none", "all"}
    for contender in run["results"].values():
        assert contender["compile_s"] > 0 and contender["median_ms"] > 0
    assert run["speedup_all_vs_inductor"] == pytest.approx(
        run["results"]["inductor"]["median_ms"] / run["results"]["all"]["median_ms"])
    assert payload["machine"]["torch"] == torch.__version__
