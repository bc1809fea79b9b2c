"""Pieces every Triton kernel of this package shares: device-side math and the launch policy.

Device side (`@triton.jit` helpers, inlined into the kernels that call them): the affine combine
of the scan recurrence, an accurate softplus and its slope, step sizes, one chunk of the
recurrence, column extraction. They are written once so the plain scan (`scan_triton.py`) and
the fused VMeanba kernels (`vmeanba_triton.py`) compute the same thing the same way.

Host side:
- `autotune_configs`: under the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors) one tiny
  config replaces the list. Autotuning there would time a CPU interpreter for nothing, the
  interpreter's cost grows with the tile (its scan is a Python loop per element), and tiny tiles
  make small test shapes run several time chunks and channel blocks, so the carries between
  chunks and the sums across blocks are exercised.
- `launcher` / `recording_launches`: eager calls launch kernels directly; while AOT autograd
  traces a CUDA graph for Inductor (see `cuda_dispatch.py`), launches go through
  `torch.library.wrap_triton`, which records them as higher-order-op nodes that Inductor inlines
  into its generated module. Direct launches skip that op's Python dispatch (a noticeable part
  of a small kernel's time) and accept interpreted kernels, which `wrap_triton` refuses on
  older torch versions.

Importing this module imports Triton, so only the CUDA path and tests import it, lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator, Sequence

import triton
import triton.language as tl

# Triton reads the variable when a kernel is decorated; read it the same way.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# torch.nn.functional.softplus's default: the identity above it. A constexpr, as kernels may only
# read module globals that are.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

_recording: contextvars.ContextVar[bool] = contextvars.ContextVar("vmeanba_recording_launches", default=False)


def autotune_configs(configs: Sequence[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """`configs` on a GPU, `[interpreted]` in the Triton interpreter."""
    return [interpreted] if INTERPRETING else list(configs)


@contextlib.contextmanager
def recording_launches() -> Iterator[None]:
    """Within this block `launcher` returns traceable kernels (see the module docstring)."""
    token = _recording.set(True)
    try:
        yield
    finally:
        _recording.reset(token)


def launcher(kernel: Any) -> Any:
    """The object to index with a grid and call: `kernel` itself, or inside
    `recording_launches()` the `torch.library.wrap_triton` wrapper that records the launch."""
    if not _recording.get():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


@triton.jit
def affine_combine(a_left, b_left, a_right, b_right):
    """(a_l, b_l) then (a_r, b_r): h -> a_r * (a_l * h + b_l) + b_r, the scan's associative step."""
    return a_left * a_right, b_left * a_right + b_right


@triton.jit
def softplus(x):
    """log(1 + exp(x)) as torch computes it (identity above the threshold), with log1p done
    accurately: log(w) * e / (w - 1) for w = 1 + e corrects the rounding of w, so small steps
    (very negative x) keep their relative precision."""
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p_e)


@triton.jit
def softplus_slope(x):
    """d softplus / dx: sigmoid(x), exactly 1 above the threshold."""
    return tl.where(x > SOFTPLUS_THRESHOLD, 1.0, tl.sigmoid(x))


@triton.jit
def step_sizes(delta_ptr, row, t, s_t, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, delta + bias) for a [channels, BLOCK_T] tile in bias' dtype (the math dtype); dt is 0
    where `mask` is off, so masked steps neither decay nor drive the state."""
    x = tl.load(delta_ptr + row + t[None, :] * s_t, mask=mask, other=0.0).to(bias.dtype)
    if HAS_BIAS:
        x += bias[:, None]
    dt = x
    if SOFTPLUS:
        dt = softplus(x)
    return tl.where(mask, dt, 0.0), x


@triton.jit
def chunk_states(dt, dtu, A, B, h_in):
    """h_t over one chunk of BLOCK_T steps (axis 1) for a column of independent recurrences
    (axis 0: channels of one state, or states of one channel), from the carry-in h_in, with
    a_t = exp(dt_t A) and b_t = dt_t u_t B_t; dt, dtu and B broadcast against [rows, BLOCK_T].
    Returns (h, b)."""
    decay = tl.exp(dt * A[:, None])
    drive = dtu * B
    decay_prod, drive_scan = tl.associative_scan((decay, drive), 1, affine_combine)
    return decay_prod * h_in[:, None] + drive_scan, drive


@triton.jit
def column(x, j):
    """x[:, j] of a 2D tile (a masked sum: tiles cannot be indexed). With j = BLOCK_T - 1 on a
    chunk's states this is the carry, since masked steps pass the state through unchanged."""
    return tl.sum(tl.where(tl.arange(0, x.shape[1])[None, :] == j, x, 0.0), 1)
