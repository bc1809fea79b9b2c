"""The Mamba project's scans: `mamba_ssm.ops.selective_scan_interface`.

Matched: `selective_scan_fn` and `selective_scan_ref` of the module named exactly
`mamba_ssm.ops.selective_scan_interface`, signature `(u, delta, A, B, C, D=None, z=None,
delta_bias=None, delta_softplus=False, return_last_state=False)`: the same semantics as
`vmeanba_compiler.ops.selective_scan`.

Output dtypes follow the originals, so compiled and eager agree: out in u's dtype; last_state
(when asked) in float32 (float64 if A is float64), as the reference's `A.new_zeros` state and the
CUDA kernel's float32 state are.

Declined (traced as the original): an argument that is not a real floating tensor (or None where
optional), e.g. Mamba's complex A.
"""

from __future__ import annotations

from typing import Callable

import torch

from .common import scan, supported
from .family import ScanFamily

MODULE = "mamba_ssm.ops.selective_scan_interface"


def _selective_scan_polyfill(name: str, fallback: Callable) -> Callable:
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        if not supported((u, delta, A, B, C), (D, z, delta_bias)):
            return fallback(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        y, last_state = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if y.dtype != u.dtype:
            y = y.to(u.dtype)
        if not return_last_state:
            return y
        state_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        if last_state.dtype != state_dtype:
            last_state = last_state.to(state_dtype)
        return y, last_state

    return selective_scan_fn


MAMBA_SSM = ScanFamily(
    name="mamba_ssm",
    matches=lambda module_name: module_name == MODULE,
    functions=("selective_scan_fn", "selective_scan_ref"),
    make_polyfill=_selective_scan_polyfill,
)
