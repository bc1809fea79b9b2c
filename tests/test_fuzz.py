"""Fuzzing the compiled path against eager execution, with hypothesis.

- The op in every argument form (`scan_inputs`: grouped/shared/fixed B and C, optional D, z,
  delta_bias, softplus, four dtypes), contiguous or not, with and without the VMeanba rewrite,
  compiled by Inductor.
- Random stacks of SS2D blocks (depth, widths, state size, gating, 1/2/4 scan routes, dtype,
  image size) compiled with a random subset of their sites rewritten.
- Random batch sizes and sequence lengths through one compiled scan: never a recompile.

Each Inductor example compiles (~10 s on 2 cores), so CI runs few: VMEANBA_FUZZ_EXAMPLES
(default 2) sets how many; e.g. `VMEANBA_FUZZ_EXAMPLES=100 python -m pytest -m fuzz` for a long run.
"""

from __future__ import annotations

import os

import pytest
import torch
from compile_helpers import CountingBackend, OneScan
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vmeanba_compiler.models.ss2d import ROUTE_CHOICES, SS2D
from vmeanba_compiler.testing import (
    ScanInputs,
    assert_backend_matches_eager,
    assert_scan_close,
    scan_inputs,
    site_groups,
    vmeanba_formula,
)

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("VMEANBA_FUZZ_EXAMPLES", "2"))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (last two axes stored transposed)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


@settings(max_examples=EXAMPLES)
@given(x=scan_inputs(max_batch=3, max_dim=16, max_state=4, max_length=24), rewrite=st.booleans(),
       strided=st.booleans())
def test_compiled_scan_matches_eager_in_every_argument_form(x: ScanInputs, rewrite: bool, strided: bool) -> None:
    args = [t if t is None or not strided else _strided(t) for t in x.args()[:-1]]
    options = {"sites": [OneScan.SITE]} if rewrite else {}
    y = assert_backend_matches_eager(OneScan(x.delta_softplus), tuple(args), **options)
    if rewrite:
        assert_scan_close(y, vmeanba_formula(x, site_groups(x)), x.u.dtype, what="compiled rewrite vs formulas")


class _Block(nn.Module):
    def __init__(self, dim: int, d_state: int, ssm_ratio: float, gated: bool, routes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, gated=gated, routes=routes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.op(self.norm(x))


@st.composite
def ss2d_stacks(draw):
    """(model, images, site ids): 1-3 residual SS2D blocks on channels-last images."""
    dim = draw(st.sampled_from((4, 8, 12)))
    blocks = [
        _Block(dim, draw(st.sampled_from((1, 2, 4))), draw(st.sampled_from((1.0, 2.0))), draw(st.booleans()),
               draw(st.sampled_from(ROUTE_CHOICES)))
        for _ in range(draw(st.integers(1, 3)))
    ]
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = nn.Sequential(*blocks).eval().to(dtype)
    height, width = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    images = torch.randn(draw(st.integers(1, 2)), height, width, dim, generator=gen).to(dtype)
    return model, images, [f"{i}.op:0" for i in range(len(blocks))]


@settings(max_examples=EXAMPLES)
@given(stack=ss2d_stacks(), data=st.data())
def test_backend_matches_eager_on_random_ss2d_models(stack, data) -> None:
    model, images, site_ids = stack
    chosen = data.draw(st.lists(st.sampled_from(site_ids), unique=True, max_size=len(site_ids)))
    assert_backend_matches_eager(model, images, sites=chosen)


@settings(max_examples=5 * EXAMPLES)  # no Inductor: cheap
@given(x=scan_inputs(max_batch=1, max_dim=12, max_state=4, max_length=1),
       sizes=st.lists(st.tuples(st.integers(2, 5), st.integers(6, 40)), min_size=2, max_size=4), rewrite=st.booleans())
def test_no_recompile_for_any_batch_size_or_length(x: ScanInputs, sizes, rewrite: bool) -> None:
    """The argument form comes from `x`; batch and L are redrawn per call and marked dynamic."""
    torch._dynamo.reset()
    backend = CountingBackend(inductor=False, **({"sites": [OneScan.SITE]} if rewrite else {}))
    compiled = torch.compile(OneScan(x.delta_softplus), backend=backend)
    gen = torch.Generator().manual_seed(0)
    for batch, length in sizes:
        args = _resized(x, batch, length, gen)
        for t in args:
            if t is not None and t.dim() >= 3:  # (batch, ..., L) tensors
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, t.dim() - 1)
        expected = OneScan(x.delta_softplus)(*args) if not rewrite else vmeanba_formula(
            ScanInputs(*args, delta_softplus=x.delta_softplus), site_groups(x))
        assert_scan_close(compiled(*args), expected, x.u.dtype)
    torch._dynamo.reset()
    assert backend.compiles == 1


def _resized(x: ScanInputs, batch: int, length: int, gen: torch.Generator) -> list:
    """x's arguments with fresh values of the given batch size and length (same forms, dtypes)."""
    resized = []
    for t in x.args()[:-1]:
        if t is None or t.dim() < 3:  # A, D, delta_bias and fixed B/C keep their shapes
            resized.append(t)
            continue
        shape = (batch, *t.shape[1:-1], length)
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
        resized.append(values.to(t.dtype))
    if not x.delta_softplus:  # keep dt = delta + bias positive, as scan_inputs does
        resized[1] = resized[1].double().abs().mul(0.5).add(0.01).to(x.u.dtype)
    return resized
