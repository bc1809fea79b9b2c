"""Shared test setup: hypothesis profiles and a warm-up of torch's exp.

Profiles: "ci" is derandomized (the same examples every run, so CI failures replay) and prints
the reproduction blob; "dev" draws fresh examples each run. CI=1 selects "ci"; otherwise
$HYPOTHESIS_PROFILE, else "dev". Neither sets a deadline: first calls build the C kernel and
torch.compile tests are slow in ways unrelated to correctness.

Threads are deliberately NOT pinned: the fast CPU scan splits channels over
torch.get_num_threads() workers, and tests must exercise that split.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _warm_up_elementwise_math() -> None:
    """A numerical trap (seen in development): on torch 2.13.0+cpu with 2 threads, the first exp (also
    sin, tanh) of a fresh process was seen to return less precise values on one thread's half of
    the tensor. Call each once, on tensors large enough to be split over threads, before any test
    computes a reference."""
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(-4.0, 4.0, 1 << 16, dtype=dtype)
        for fn in (torch.exp, torch.sin, torch.tanh, torch.sigmoid, torch.nn.functional.softplus):
            fn(x)


_warm_up_elementwise_math()


@pytest.fixture(autouse=True)
def _fresh_dynamo_after_each_test():
    """Each test leaves Dynamo's caches empty for the next. The library never resets Dynamo (a
    user's compiled code must survive calibrate/explain), and compiled entries that earlier tests
    leave on shared code objects (the models' forward methods) make later compilations several
    times slower: the tiny-VMamba calibration test took 66 s after another test, 10 s with this."""
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Tests marked `extended` (AOTInductor packages and C++ builds, full-size models exported or
    compiled by Inductor: minutes on 2 cores) are left out unless the -m expression names them
    (`-m extended`), so the README's test command and `-m "not slow"` stay quick. They are
    deselected, not skipped (pytest reports the count), and `.ci/run` runs them after the README's
    test command."""
    if "extended" in (config.getoption("markexpr") or ""):
        return
    extended = [item for item in items if item.get_closest_marker("extended") is not None]
    if extended:
        config.hook.pytest_deselected(items=extended)
        items[:] = [item for item in items if item.get_closest_marker("extended") is None]
