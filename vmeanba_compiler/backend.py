"""The `vmeanba` torch.compile backend.

Registered through the `torch_dynamo_backends` entry point only (registering it again with
`register_backend` at import would make Dynamo's lazy loader see a duplicate name), so
`torch.compile(model, backend="vmeanba")` works in a fresh interpreter without an import.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx

from .config import VMeanbaConfig
from .inductor_cache import with_versioned_cache_key
from .passes import run_passes
from .scan_substitutions import install_scan_substitutions

# Map Mamba's / VMamba's scan functions onto our op before Dynamo traces anything: this module is
# imported when torch.compile(..., backend="vmeanba") is called, ahead of the first trace.
install_scan_substitutions()


def vmeanba_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> Callable:
    """Dynamo backend: validate options, run the VMeanba passes, lower through Inductor.

    `mode` ("reduce-overhead", "max-autotune", ...) is passed to Inductor as torch.compile would;
    `options` are the backend's own (see `VMeanbaConfig`).
    """
    config = VMeanbaConfig.from_options(options)
    gm = run_passes(gm, config)
    if not config.inductor:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    mode_patches = list_mode_options(mode) if mode else {}
    patches = with_versioned_cache_key({**mode_patches, **config.inductor_config})
    return compile_fx(gm, list(example_inputs), config_patches=patches)
