"""VMamba's scan: `selective_scan_fn` of its `csms6s` module.

Matched: `selective_scan_fn` of any module whose last dotted component is `csms6s` (VMamba's
classification/models/csms6s.py, imported as `models.csms6s` or `csms6s`; `foo_csms6s` is not
matched), signature `(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
oflex=True, backend=None)`. No z; `backend` is ignored (all of VMamba's backends compute the same
scan).

Output dtype: VMamba's pure-torch fallback `selective_scan_torch` computes in float32 and returns
`out if oflex else out.to(u.dtype)`, i.e. float32 when `oflex` is true and u's dtype otherwise.
The `selective_scan_cuda_oflex` kernel is called with the same flag (its "output flexible"
float32 output). The polyfill follows that reading; for half/bfloat16 inputs with `oflex` it
feeds u and delta to our op in float32, so y is not rounded through the input dtype first.
(VMamba's older "mamba" CUDA backend ignores `oflex` and returns u's dtype; not imitated.)
"""

from __future__ import annotations

from typing import Callable

import torch

from .common import scan, supported
from .family import ScanFamily


def _csms6s_polyfill(name: str, fallback: Callable) -> Callable:
    def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True,
                          backend=None):
        if not supported((u, delta, A, B, C), (D, delta_bias)):
            return fallback(u, delta, A, B, C, D, delta_bias, delta_softplus, oflex, backend)
        y, _ = scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus, bool(oflex))
        out_dtype = torch.float32 if oflex else u.dtype
        return y if y.dtype == out_dtype else y.to(out_dtype)

    return selective_scan_fn


CSMS6S = ScanFamily(
    name="csms6s",
    matches=lambda module_name: module_name.rpartition(".")[2] == "csms6s",
    functions=("selective_scan_fn",),
    make_polyfill=_csms6s_polyfill,
)
