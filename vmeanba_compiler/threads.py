"""`torch_threads(n)`: run a block with n torch CPU threads, restoring the previous count after.

Used where thread count changes results or their meaning: training runs on one thread so its
float rounding, and so its weights, do not depend on the machine; benchmarks may pin threads so
that OpenMP workers spinning against other jobs on a shared machine do not swamp the timings.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """`torch.set_num_threads(count)` for the block; None leaves the setting alone."""
    previous = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ValueError(f"thread count must be >= 1, got {count}")
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
