"""What a rewritten site computes: docs/DESIGN.md section 2, one `vmeanba::reduced_selective_scan`.

    M(x)      = mean of x over the channels of each group        (batch, G*d, L) -> (batch, G, L)
    y_reduced = selective_scan(M(u), M(dt), M(A), B, C, ...)     one channel per group
    y         = M^-1(y_reduced), broadcast back to every channel, then D*u and silu(z)

`reduced_selective_scan` is the op itself (`vmeanba_compiler/reduced_op.py`): called with the
full op's arguments plus `groups`, `dt_mode` and `skip_mode`, it returns the full op's shapes and
dtypes, and the rewrite puts it into graphs as one node per site. Its readable definition, the
composition of means, the full scan and the broadcast, is `lowering/reduced_scan.py`.

Two choices are configurable (their names and defaults: vmeanba_compiler/rewrite_modes.py):
- dt_mode "effective" averages the step size actually used, softplus(delta + delta_bias);
  "raw" averages delta and delta_bias and applies softplus after the mean.
- skip_mode "exact" keeps the D*u skip and the silu(z) gate per channel (cheap elementwise work,
  outside the reduced scan); "mean" averages D and z too, so they run inside the reduced scan.
Both choices are exact when a group's channels are identical.
"""

from __future__ import annotations

import torch

from .. import reduced_op  # noqa: F401  (registers the op)
from ..lowering.reduced_scan import group_mean
from ..rewrite_modes import DT_MODES, SKIP_MODES

__all__ = ["DT_MODES", "SKIP_MODES", "group_mean", "reduced_selective_scan"]

reduced_selective_scan = torch.ops.vmeanba.reduced_selective_scan
