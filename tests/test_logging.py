"""Logging: everything logs under the `vmeanba_compiler` logger, which TORCH_LOGS controls by
module name (TORCH_LOGS="vmeanba_compiler" for INFO, "+vmeanba_compiler" for DEBUG).

The runs with TORCH_LOGS are subprocesses: torch reads the variable when it is imported.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch

import vmeanba_compiler as vc
from vmeanba_compiler.models import build_vmamba

COMPILE_ONE_SITE = textwrap.dedent("""
    import torch
    from vmeanba_compiler.models import build_vmamba
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini", depths=(1,)).eval()
    options = {"sites": ["stages.0.0.op:0"], "inductor": False}
    with torch.no_grad():
        torch.compile(model, backend="vmeanba", options=options)(torch.randn(2, 3, 16, 16))
    print("done")
""")

REWRITE = "vmeanba: rewrote 1 of 1 scan sites: stages.0.0.op:0"
MATCH = "matched scan site stages.0.0.op:0: dim=128 N=4 groups=4 B=grouped C=grouped D=True z=False batch=2 L=16"
DECISION = "site stages.0.0.op:0: rewrite (named in sites)"


@pytest.mark.parametrize(
    ("torch_logs", "shown", "hidden"),
    [
        ("vmeanba_compiler", [REWRITE], [MATCH, DECISION]),
        ("+vmeanba_compiler", [REWRITE, MATCH, DECISION], []),
        (None, [], [REWRITE, MATCH, DECISION]),
    ],
    ids=["info", "debug", "unset"],
)
def test_torch_logs_shows_what_the_pass_matched_and_rewrote(
    torch_logs: Optional[str], shown: list[str], hidden: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    if torch_logs is not None:
        env["TORCH_LOGS"] = torch_logs
    done = subprocess.run([sys.executable, "-c", COMPILE_ONE_SITE], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
    for line in shown:
        assert line in done.stderr, f"{line!r} missing from stderr:\n{done.stderr[-3000:]}"
    for line in hidden:
        assert line not in done.stderr


def test_calibration_logs_a_summary_at_info(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini", depths=(1,)).eval()
    with caplog.at_level(logging.INFO, logger="vmeanba_compiler"):
        vc.calibrate(model, [torch.randn(2, 3, 16, 16)], impact=False, progress=False)
    assert "calibrated 1 scan sites on 1 batches (2 samples): stages.0.0.op:0" in caplog.messages
