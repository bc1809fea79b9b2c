"""The measuring helpers of the soak check (`python -m vmeanba_compiler.soak`, run by hand: it
takes minutes); the run itself is not a test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vmeanba_compiler.soak import _slope_per_1k_steps, resident_set_size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_set_size_agrees_with_the_kernels_vmrss() -> None:
    """statm counts pages; /proc/self/status reports VmRSS in kB: the two must agree."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    vm_rss = int(status["VmRSS"].split()[0]) * 1024
    rss = resident_set_size()
    assert rss is not None and abs(rss - vm_rss) < 8 << 20, (rss, vm_rss)


def test_slope_is_per_thousand_steps_and_zero_when_flat() -> None:
    steps = [0, 50, 100, 150]
    assert _slope_per_1k_steps(steps, [10.0, 10.5, 11.0, 11.5]) == pytest.approx(10.0)
    assert _slope_per_1k_steps(steps, [7.0] * 4) == 0.0
