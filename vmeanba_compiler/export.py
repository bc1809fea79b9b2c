"""`export(model, args, **options)`: the model as `backend="vmeanba"` rewrites it, as an ExportedProgram.

`torch.export` does not run torch.compile backends, so an exported model would never contain the
VMeanba rewrite. This function runs the backend's own passes on the exported graph:

1. `torch.export.export` the model (the scan is a custom op, so it stays one node per call, with
   the `nn_module_stack` its site id is read from);
2. options -> `VMeanbaConfig` and `passes.run_passes` on the exported module: the same
   canonicalisation, site discovery and ids (`"<module path>:<call index>"`), selection and
   rewrite as the backend, with the same refusals and messages. The exported graph is the whole
   model, so every named site must be in it (as `explain` checks);
3. `torch.export.export` of the rewritten module again with the same inputs and `dynamic_shapes`,
   which traces each rewritten site's mean -> reduced scan -> expand into the program.

Only the inference graph is exported (as `torch.export` does); `inductor` and `inductor_config`
belong to the package build (vmeanba_compiler.deploy.package), not to the program.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from .config import VMeanbaConfig
from .passes import run_passes

log = logging.getLogger(__name__)


def export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Optional[dict[str, Any]] = None,
    *,
    dynamic_shapes: Any = None,
    **options: Any,
) -> torch.export.ExportedProgram:
    """Export `model` with the sites `backend="vmeanba"` and `options` select already rewritten.

    args, kwargs, dynamic_shapes: as `torch.export.export` takes them (e.g.
    `dynamic_shapes={"x": {0: torch.export.Dim("batch")}}` for a dynamic batch).
    options: the backend's options (`VMeanbaConfig`): `sites`, or `profile` with `top_k` or
    `threshold`/`metric`, and `dt_mode`/`skip_mode`.
    """
    config = VMeanbaConfig.from_options(options)
    if config.inductor_config:
        log.warning("export: inductor_config does not change the exported program; pass Inductor settings to "
                    "vmeanba_compiler.deploy.package.package(..., inductor_configs=...)")
    if not isinstance(args, tuple):
        raise TypeError(f"export: args must be a tuple of positional inputs, e.g. (x,), got {type(args).__name__}")
    traced = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    rewritten = run_passes(traced.module(), config)
    program = torch.export.export(rewritten, args, kwargs, dynamic_shapes=dynamic_shapes)
    log.info("export: %d scan call(s) in the exported program", _scan_calls(program))
    return program


def _scan_calls(program: torch.export.ExportedProgram) -> int:
    return sum(1 for node in program.graph.nodes
               if node.op == "call_function" and getattr(node.target, "namespace", None) == "vmeanba")
