"""`python -m vmeanba_compiler.bench.scan_kernels`: refuses without CUDA, runs with it."""

from __future__ import annotations

import json

import pytest
import torch

from vmeanba_compiler.bench import scan_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_refuses_to_run_without_cuda_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "scan_kernels.json"
    with pytest.raises(SystemExit) as exit_info:
        scan_kernels.main(["--out", str(out)])
    assert exit_info.value.code == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "device_name, peak",
    [("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H200", 4800.0), ("Tesla T4", None)],
)
def test_datasheet_peak_is_looked_up_by_device_name(device_name: str, peak) -> None:
    assert scan_kernels.datasheet_peak_gbps(device_name) == peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_small_shape_writes_every_contender(tmp_path) -> None:
    out = tmp_path / "scan_kernels.json"
    argv = ["--out", str(out), "--repeats", "3", "--batches", "1", "--dims", "384", "--states", "16", "--lengths", "49"]
    assert scan_kernels.main(argv) == 0
    payload = json.loads(out.read_text())
    (record,) = payload["records"]
    assert set(record["results_ms"]) == {"full", "reduced", "fused", "read_u_delta_once", "associative_scan", "reference"}
    assert payload["peak_bandwidth"]["copy_GBps"] > 0
    assert record["fused"]["max_abs_diff_vs_reduced"] < 1e-4
