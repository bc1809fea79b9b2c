"""Hugging Face transformers' Mamba scan: `mamba_selective_scan` of its modeling modules.

Matched: `mamba_selective_scan` of the modules named exactly
`transformers.models.mamba.modeling_mamba`, `transformers.models.falcon_mamba.modeling_falcon_mamba`,
`transformers.models.jamba.modeling_jamba` and `transformers.models.zamba.modeling_zamba`, signature
`(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False, use_mambapy=False, use_associative_scan=False, **kwargs)`. The module
attribute is the function wrapped by transformers' `use_kernel_func_from_hub_with_fallback`
(`functools.wraps`), so the family unwraps it and substitutes the wrapped function: the wrapper
still runs under Dynamo (kernel-hub dispatch, its refusal of packed sequences, its filtering of
keyword arguments) and then calls the function we map. `MambaMixer.forward` (and its FalconMamba,
Jamba and Zamba counterparts) call it for every full-sequence forward; single-token decoding calls
`mamba_selective_state_update`, which is not a scan over L and is left alone.

Versions checked (source of the released wheels compared): the function first appears in
transformers 5.15.0 (5.14.0 and earlier inline the loop in `MambaMixer.slow_forward`, which nothing
here matches). Its source text is identical in the mamba, falcon_mamba and jamba modules of 5.15.0,
5.16.0, 5.18.0, 5.21.0 and 5.24.0, and in zamba's of 5.18.0, 5.21.0 and 5.24.0; zamba's copy in
5.15/5.16 chooses the associative path on `is_tracing(hidden_states)` instead of "compiling and not
exporting", which differs only under torch.export (there the polyfill follows the newer text: the
sequential path's last-state dtype). The tests pin transformers>=5.18,<5.25 and check on the
installed version that the four modules' functions are identical. The associative path needs
torch >= 2.9 in the original; this project requires 2.11. Other transformers SSMs (mamba2, bamba,
...) use chunked scans of another form and are not matched.

Semantics (both of the original's torch paths compute the same recurrence as
`torch.ops.vmeanba.selective_scan`): u = hidden_states and dt are (batch, dim, L), A (dim, N), B and
C (batch, N, L) shared by every channel (the op's "shared" form; the original transposes them to
(batch, L, N) itself), D and delta_bias (dim,), z (batch, dim, L). The sequential loop (the default;
also what eager execution runs when `use_associative_scan=True`, since the original takes that path
only under Dynamo) and the associative_scan path (`use_associative_scan=True` under torch.compile,
not under torch.export) both become one op node, so neither the loop over L nor the
associative_scan higher-order op reaches the graph.

Output dtypes follow the original exactly, so compiled and eager agree:
- out: the scan term is in u's dtype; adding `hidden_states * D` and multiplying by `silu(z)`
  promote it, so out has dtype promote(u, D, z) (D and z where given). MambaMixer passes
  `D=self.D.float()`, so a bfloat16 model's scan returns float32. Where out is wider than u, u and
  dt reach the op in the wider dtype, so y is not rounded through u's dtype first.
- last state (`return_last_state=True`, e.g. a forward with a cache): the original accumulates the
  float32 discretised terms `exp(A * dt)` and `dt * B.float() * u.float()`, so the state has dtype
  promote(A, dt, float32); the sequential path starts from zeros in u's dtype, which adds u to that
  promotion, the associative path does not.
Math is float32 (float64 where out or the state is float64); the original keeps the state in
float32 too but rounds it to u's dtype before every C product, so for half-precision inputs ours
is the more precise of the two.

Declined (the polyfill then traces the original's own code, loop and all; results stay correct):
- an argument that is not a real floating tensor (or None where optional);
- shapes other than the above (the original broadcasts e.g. a B of batch 1; our op does not),
  and L = 0 (the original's loop fails on it, and so does the traced fallback, as in eager);
- C in another dtype than u: the original's matmul raises for it, and the fallback raises the
  same error;
- non-empty **kwargs (e.g. cu_seqlens or seq_idx of packed sequences): the original ignores
  them, a kernel would use them; we cannot tell which the caller meant. (Through the transformers
  wrapper they never arrive: it drops names the function does not declare.)
- `use_mambapy=True` while the mambapy package is importable: the original then runs mambapy's
  parallel scan, whose dtype rules differ (its float32 states meet C in a matmul); without
  mambapy the original ignores the flag, and so does the polyfill.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from .common import supported
from .family import ScanFamily

MODULES = (
    "transformers.models.mamba.modeling_mamba",
    "transformers.models.falcon_mamba.modeling_falcon_mamba",
    "transformers.models.jamba.modeling_jamba",
    "transformers.models.zamba.modeling_zamba",
)


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def _representable(u, dt, A, B, C, D, z, delta_bias) -> bool:
    """Whether the op computes exactly what the original would for these arguments (see the module
    docstring's "Declined")."""
    if not supported((u, dt, A, B, C), (D, z, delta_bias)):
        return False
    if u.dim() != 3 or A.dim() != 2:
        return False
    batch, dim, length = u.shape
    state = A.shape[1]
    if length == 0 or A.shape[0] != dim or tuple(dt.shape) != tuple(u.shape):
        return False
    if tuple(B.shape) != (batch, state, length) or tuple(C.shape) != (batch, state, length):
        return False
    if C.dtype != u.dtype:
        return False
    if z is not None and tuple(z.shape) != tuple(u.shape):
        return False
    return all(t is None or tuple(t.shape) == (dim,) for t in (D, delta_bias))


def _mamba_selective_scan_polyfill(name: str, fallback: Callable) -> Callable:
    # Read once, when the substitution is registered (the original asks transformers'
    # is_mambapy_available(), a cached probe of the same installation).
    mambapy_installed = importlib.util.find_spec("mambapy") is not None

    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, use_mambapy=False,
                             use_associative_scan=False, **kwargs):
        if kwargs or (use_mambapy and mambapy_installed) or not _representable(
            hidden_states, dt, A, B, C, D, z, delta_bias
        ):
            return fallback(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                            use_mambapy, use_associative_scan, **kwargs)
        u = hidden_states
        out_dtype = _promote(u.dtype, *(t.dtype for t in (D, z) if t is not None))
        # The original's associative path is taken only under Dynamo and never under torch.export;
        # the polyfill only runs under Dynamo.
        associative = bool(use_associative_scan) and not torch.compiler.is_exporting()
        state_dtype = _promote(A.dtype, dt.dtype, torch.float32, *(() if associative else (u.dtype,)))
        wide = torch.float64 if torch.float64 in (out_dtype, state_dtype) else torch.float32
        if u.dtype != out_dtype or dt.dtype != u.dtype or (wide == torch.float64 and u.dtype != wide):
            u, dt = u.to(wide), dt.to(wide)
        y, last_state = torch.ops.vmeanba.selective_scan(u, dt, A, B, C, D, z, delta_bias, bool(delta_softplus))
        if y.dtype != out_dtype:
            y = y.to(out_dtype)
        if not return_last_state:
            return y
        if last_state.dtype != state_dtype:
            last_state = last_state.to(state_dtype)
        return y, last_state

    return mamba_selective_scan


TRANSFORMERS_MAMBA = ScanFamily(
    name="transformers_mamba",
    matches=lambda module_name: module_name in MODULES,
    functions=("mamba_selective_scan",),
    make_polyfill=_mamba_selective_scan_polyfill,
    unwrap=True,
)
