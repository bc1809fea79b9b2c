"""Distributed calibration (vmeanba_compiler.distributed) on 2 CPU processes with gloo.

Each rank calibrates its shard; the merged profile must equal a single-process calibration on
all the data within float64 rounding (rel 1e-9 on every metric), be identical on every rank,
and be written by rank 0. Failures on one rank must surface on every rank instead of hanging.
Ranks run as subprocesses with a timeout, so a hang fails the test rather than the CI job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_calibration_worker import model_and_batches, shard

import vmeanba_compiler as vc
from vmeanba_compiler.profile import METRIC_NAMES

WORLD = 2
TIMEOUT_S = 600
WORKER = Path(__file__).with_name("distributed_calibration_worker.py")
REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the two ranks once; the tests read what they wrote."""
    out = tmp_path_factory.mktemp("ranks")
    init_file = out / "init"
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), str(init_file), str(out)],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            proc.kill()
    failed = [(r, p.returncode, log[-3000:]) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
    assert not failed, failed
    return out


def test_merged_profile_equals_single_process_calibration_on_the_same_data(ranks: Path) -> None:
    model, batches = model_and_batches()
    single = vc.calibrate(model, [b for r in range(WORLD) for b in shard(batches, r, WORLD)], progress=False)
    merged = vc.Profile.load(ranks / "profile.json")
    assert merged.site_ids == single.site_ids
    assert (merged.num_batches, merged.num_samples) == (single.num_batches, single.num_samples) == (5, 10)
    for site in single.site_ids:
        for metric in METRIC_NAMES:
            assert merged.metric(site, metric) == pytest.approx(single.metric(site, metric), rel=1e-9), (site, metric)


def test_every_rank_holds_the_identical_merged_profile_and_rank_zero_wrote_it(ranks: Path) -> None:
    returned = [json.loads((ranks / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r == returned[0] for r in returned)
    assert vc.Profile.load(ranks / "profile.json").to_dict() == returned[0]


def test_a_failure_on_one_rank_is_raised_on_every_rank(ranks: Path) -> None:
    errors = [json.loads((ranks / f"rank{r}_errors.json").read_text()) for r in range(WORLD)]
    for rank_errors in errors:
        assert f"rank {WORLD - 1}: CalibrationError: calibrate got no batches" in rank_errors["empty_shard"]
        assert "parameter_hash differs" in rank_errors["other_weights"]


@pytest.mark.parametrize("call", [lambda: vc.merge_across_ranks(vc.Profile({}, "x")),
                                  lambda: vc.calibrate_distributed(torch.nn.Linear(1, 1), [])],
                         ids=["merge_across_ranks", "calibrate_distributed"])
def test_without_a_process_group_the_error_says_how_to_start_one(call) -> None:
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed process group: call "
                                           r"torch.distributed.init_process_group\(...\) first"):
        call()


def test_torchrun_example_writes_a_merged_profile(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(REPO / "examples" / "distributed_calibration.py"), "--out", str(out), "--images", "8",
               "--size", "16"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    profile = vc.Profile.load(out)
    assert (profile.num_batches, profile.num_samples) == (4, 8)
    assert f"{WORLD} ranks, 4 batches, 8 images" in done.stdout
