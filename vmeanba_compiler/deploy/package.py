"""Compile an ExportedProgram into an AOTInductor package whose scan calls go to the op library.

`torch._inductor.aoti_compile_and_package` with two settings: `custom_ops_to_c_shims` (the ops'
C declarations, so the generated wrapper calls `aoti_torch_cpu_<op>` directly instead of the proxy
executor) and `custom_op_libs` (the compiled model links against libvmeanba_ops.so, found through
LIBRARY_PATH while it links). A project op without a C function would still go through the proxy
executor, i.e. need Python at run time: that is refused before compiling, naming the op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from . import op_library

log = logging.getLogger(__name__)

_NAMESPACE = "vmeanba"


def project_ops(program: torch.export.ExportedProgram) -> set[torch._ops.OpOverload]:
    """The project's ops (namespace vmeanba) the program calls."""
    return {node.target for node in program.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == _NAMESPACE}


def _check_devices(program: torch.export.ExportedProgram) -> None:
    devices = {value.device.type for node in program.graph.nodes
               for value in [node.meta.get("val")] if isinstance(value, torch.Tensor)}
    if devices - {"cpu"}:
        raise NotImplementedError(
            f"the program runs on {', '.join(sorted(devices))}; the op library has CPU functions only "
            "(docs/DEPLOY.md): export the model with CPU inputs and parameters"
        )


@contextlib.contextmanager
def _library_search_path(folder: Path) -> Iterator[None]:
    """Let the linker find lib<name>.so for `-l<name>` (gcc reads LIBRARY_PATH) while compiling."""
    before = os.environ.get("LIBRARY_PATH")
    os.environ["LIBRARY_PATH"] = os.pathsep.join(p for p in (str(folder), before) if p)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LIBRARY_PATH"]
        else:
            os.environ["LIBRARY_PATH"] = before


def package(
    program: torch.export.ExportedProgram,
    path: Union[str, os.PathLike],
    *,
    inductor_configs: Optional[Mapping[str, Any]] = None,
    op_library_calls: bool = True,
) -> Path:
    """Compile `program` into the AOTInductor package `path` (.pt2) and return its path.

    The package needs libvmeanba_ops.so (`op_library.build()`) loaded, or on LD_LIBRARY_PATH, when
    it is loaded. `op_library_calls=False` leaves the project's ops to AOTInductor's proxy executor
    (the package then needs Python with this project installed): the comparison point, not a
    deployment mode.
    """
    _check_devices(program)
    configs: dict[str, Any] = dict(inductor_configs or {})
    used = project_ops(program)
    if not op_library_calls:
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                             inductor_configs=configs))
    shims = op_library.shim_declarations()
    missing = sorted(str(op) for op in used - set(shims))
    if missing:
        raise NotImplementedError(
            f"the program calls {', '.join(missing)}, which the vmeanba op library has no C function for, so "
            "the package would call back into Python for it; export with a selection that does not emit it"
        )
    library = op_library.build()
    configs.update({"aot_inductor.custom_ops_to_c_shims": shims,
                    "aot_inductor.custom_op_libs": [op_library.LIBRARY_NAME]})
    log.info("packaging %s with direct calls of %s into %s", path, ", ".join(sorted(map(str, used))) or "no op",
             library)
    with _library_search_path(library.parent):
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                             inductor_configs=configs))
