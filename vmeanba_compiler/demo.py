"""`vmeanba demo`: the main job on built-in defaults.

Builds a bundled VMamba (seeded), compiles it with `backend="vmeanba"`, checks the compiled output
against eager execution and times both. With no calibration profile the backend rewrites nothing,
so the outputs must agree within float32 tolerance; a disagreement fails the command.
"""

from __future__ import annotations

import time

import torch

from .bench.timing import summarize, time_call
from .models import build_vmamba
from .testing import MODEL_TOLERANCES


def main(args) -> int:
    torch.manual_seed(args.seed)
    model = build_vmamba(args.model).eval()
    in_chans = model.config.in_chans
    images = torch.randn(args.batch, in_chans, args.image_size, args.image_size)
    compiled = torch.compile(model, backend="vmeanba")
    with torch.no_grad():
        eager_out = model(images)
        start = time.perf_counter()
        compiled_out = compiled(images)
        compile_s = time.perf_counter() - start
        eager = summarize(time_call(lambda: model(images), args.repeats))
        fast = summarize(time_call(lambda: compiled(images), args.repeats))

    rtol, atol = MODEL_TOLERANCES[torch.float32]
    error = (compiled_out - eager_out).abs().max().item()
    agree = torch.allclose(compiled_out, eager_out, rtol=rtol, atol=atol)
    print(f"model {args.model}, input {tuple(images.shape)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  compile (first call)         {compile_s:8.2f} s")
    print(f"  eager                        {eager['median_ms']:8.2f} ms (median of {args.repeats})")
    print(f"  backend='vmeanba'            {fast['median_ms']:8.2f} ms (median of {args.repeats})")
    print(f"  speedup vs eager             {eager['median_ms'] / fast['median_ms']:8.2f}x")
    print(f"  max |compiled - eager|       {error:.3e} (tolerance rtol={rtol:g}, atol={atol:g}): "
          f"{'agree' if agree else 'DISAGREE'}")
    return 0 if agree else 1
