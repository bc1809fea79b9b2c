"""Measure the rewrite's two choices (dt_mode x skip_mode) to pick the defaults.

For each model and each combination: the reduced scan's relative error per site (from
calibration) and, with every site reduced, the change of the model output (relative L2 error
of the logits and KL divergence of their softmax) against the unreduced model. Run:

    python -m vmeanba_compiler.bench.rewrite_modes --out results/cpu/rewrite_modes.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..calibration import calibrate
from ..models import build_vmamba
from ..rewrite_modes import DT_MODES, SKIP_MODES
from ..tracing import fresh_trace
from .timing import machine_info, write_json

# (model name, image size): random-init weights, seeded; sizes keep a CPU run to minutes.
DEFAULT_MODELS = (("vmamba_mini", 32), ("vmamba_v0_tiny", 64), ("vmamba_v2_tiny", 64))


def measure_model(name: str, size: int, batches: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_vmamba(name).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    data = [torch.randn(2, model.config.in_chans, size, size, generator=gen) for _ in range(batches)]
    with torch.no_grad():
        reference = torch.cat([model(x) for x in data])
    results = {}
    for dt_mode, skip_mode in itertools.product(DT_MODES, SKIP_MODES):
        profile = calibrate(model, data, impact=False, dt_mode=dt_mode, skip_mode=skip_mode, progress=False)
        errors = [profile.metric(s, "relative_error") for s in profile.site_ids]
        options = {"sites": profile.site_ids, "inductor": False, "dt_mode": dt_mode, "skip_mode": skip_mode}
        with torch.no_grad():
            with fresh_trace(model, "vmeanba", options=options) as traced:
                reduced = torch.cat([traced(x) for x in data])
        log_p, log_q = reference.double().log_softmax(-1), reduced.double().log_softmax(-1)
        results[f"{dt_mode}/{skip_mode}"] = {
            "site_relative_error_median": statistics.median(errors),
            "site_relative_error_max": max(errors),
            "logits_relative_l2": float((reduced - reference).norm() / reference.norm()),
            "logits_kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        }
    return {"model": name, "image_size": size, "batches": batches, "sites": len(errors), "modes": results}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--out", default="results/cpu/rewrite_modes.json")
    args = parser.parse_args(argv)
    runs = [measure_model(name, size, args.batches) for name, size in DEFAULT_MODELS]
    write_json(Path(args.out), {"benchmark": "rewrite_modes", "machine": machine_info(), "runs": runs})
    for run in runs:
        print(f"{run['model']} @ {run['image_size']}px, {run['sites']} sites (all reduced)")
        for mode, r in run["modes"].items():
            print(f"  {mode:18s} site rel.err median {r['site_relative_error_median']:.3e} "
                  f"max {r['site_relative_error_max']:.3e}  logits rel.L2 {r['logits_relative_l2']:.3e} "
                  f"KL {r['logits_kl']:.3e}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
