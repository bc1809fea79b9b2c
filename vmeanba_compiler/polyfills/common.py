"""Helpers the polyfills share: which calls our op represents, and the call itself.

They run under Dynamo and are inlined into the user's graph.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .. import ops  # noqa: F401  (defines torch.ops.vmeanba.selective_scan)

_REAL_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_real_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in _REAL_FLOAT


def supported(required: Iterable, optional: Iterable = ()) -> bool:
    """Whether our op represents a call with these tensors: every required argument a real
    floating tensor, every optional one too or None. Anything else (e.g. Mamba's complex A) is
    traced as the original code."""
    return all(is_real_float_tensor(t) for t in required) and all(
        t is None or is_real_float_tensor(t) for t in optional
    )


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, promote_to_float32: bool = False):
    """Call `vmeanba.selective_scan`, promoting u and delta where the op needs one dtype for both
    (or, with `promote_to_float32`, where the caller wants an unrounded float32 y)."""
    if u.dtype != delta.dtype or (promote_to_float32 and u.dtype in (torch.float16, torch.bfloat16)):
        wide = torch.float64 if torch.float64 in (u.dtype, delta.dtype) else torch.float32
        u, delta = u.to(wide), delta.to(wide)
    return torch.ops.vmeanba.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
