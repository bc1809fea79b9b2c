"""The vmeanba op library: the C functions an AOTInductor package calls for the project's ops.

AOTInductor calls a custom op through its proxy executor (back into Python for an op defined in
Python) unless `aot_inductor.custom_ops_to_c_shims` declares a C function for it; then the package
calls `aoti_torch_<device>_<op name>(...)` directly. `shim_declarations()` writes those
declarations from the ops' schemas (one schema: vmeanba_compiler/ops.py's definition), and
`build()` compiles `vmeanba_ops.cpp` (which includes the generated declarations, so a signature
that disagrees with the schema fails to compile) together with the C kernels of lowering/ (one
kernel: the files the Python CPU path runs; `kernel_abi.h`, force-included, makes a change of their
signatures a build error).

Why no dispatcher registration (TORCH_LIBRARY_IMPL): the package calls these functions directly,
and a C++ CPU kernel for the ops the Python side defines would replace the Python CPU kernel
(same dispatch key) in every process that loads the library.

Built on first use, never at import: `import vmeanba_compiler` needs no C++ compiler. The build
(a few seconds) is cached under `native_build.cache_dir()` in a folder whose name hashes what the
machine code depends on (sources, generated header, compilers and flags, CPU, torch version and
headers), and is written to a temporary folder then renamed, so concurrent processes never load a
half-written library. Inside the folder the file is always `libvmeanba_ops.so` (its soname), which
is the name a package records as a dependency: load the library before the package
(`load()`, or `torch.ops.load_library(path)` in a process without this project, or the runner's
`--op-library`), or put its folder on LD_LIBRARY_PATH.

CPU only: the CUDA scan is Triton code that Inductor inlines; no C function is provided for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from .. import ops, reduced_op  # noqa: F401  (define torch.ops.vmeanba.selective_scan, .reduced_selective_scan)
from ..lowering import native_build

log = logging.getLogger(__name__)

LIBRARY_NAME = "vmeanba_ops"  # -l name: the file is lib<name>.so
LIBRARY_FILE = f"lib{LIBRARY_NAME}.so"
_SOURCE = Path(__file__).with_name("vmeanba_ops.cpp")
_KERNEL_ABI = Path(__file__).with_name("kernel_abi.h")
_LOWERING = Path(native_build.__file__).parent
# The C kernel sources compiled into the library, and their entry points: each precision's copy
# gets its own names (vmeanba_<entry>_<real>), as kernel_abi.h declares them.
_KERNEL_SOURCES = ("selective_scan_cpu.c", "reduced_scan_cpu.c")
_KERNEL_ENTRIES = ("scan_forward", "scan_backward", "reduced_scan_forward")
_PRECISIONS = ("float", "double")
_CXX_FLAGS = ["-O2", "-std=c++17", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]

# Schema types and the C types AOTInductor's generated wrapper passes for them (an optional tensor
# is a pointer to a handle, nullptr when None; a bool is an int32_t 0/1; a string a C string literal).
# Only types the ops use and the tests exercise are listed; another is refused with its name.
_C_TYPES = {"Tensor": "AtenTensorHandle", "Optional[Tensor]": "AtenTensorHandle*", "bool": "int32_t",
            "int": "int64_t", "str": "const char*"}


def shim_ops() -> tuple[torch._ops.OpOverload, ...]:
    """The ops the library implements as C functions."""
    return (torch.ops.vmeanba.selective_scan.default, torch.ops.vmeanba.reduced_selective_scan.default)


def shim_name(op: torch._ops.OpOverload, device: str = "cpu") -> str:
    """The C function AOTInductor calls for `op` (its codegen's rule: aoti_torch_<device>_<name>)."""
    return f"aoti_torch_{device}_{op._schema.name.split('::')[-1]}"


def shim_declaration(op: torch._ops.OpOverload) -> str:
    """The C declaration of `op`'s shim, from its schema: arguments in order, then one output
    handle per returned tensor."""
    params = []
    for arg in op._schema.arguments:
        kind = str(arg.type)
        if kind not in _C_TYPES:
            raise NotImplementedError(
                f"{op}: argument {arg.name!r} has type {kind}, which the op library's C functions do not "
                f"pass yet (supported: {', '.join(_C_TYPES)})"
            )
        params.append(f"{_C_TYPES[kind]} {arg.name}")
    for index, ret in enumerate(op._schema.returns):
        if str(ret.type) != "Tensor":
            raise NotImplementedError(f"{op}: return {index} has type {ret.type}; only tensors are supported")
        params.append(f"AtenTensorHandle* ret{index}")
    return f"AOTITorchError {shim_name(op)}({', '.join(params)})"


def shim_declarations() -> dict[torch._ops.OpOverload, list[str]]:
    """`aot_inductor.custom_ops_to_c_shims`: each op with the declaration of its C function."""
    return {op: [shim_declaration(op)] for op in shim_ops()}


def _header() -> str:
    lines = "\n".join(f"AOTI_TORCH_EXPORT {decl};" for decls in shim_declarations().values() for decl in decls)
    return ("// Generated by vmeanba_compiler/deploy/op_library.py from the ops' schemas; do not edit.\n"
            "#pragma once\n#include <torch/csrc/inductor/aoti_torch/c/shim.h>\n"
            f'extern "C" {{\n{lines}\n}}\n')


def cxx_compiler() -> str:
    """The C++ compiler: $CXX, else c++, g++ or clang++; an error saying what to install if none."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        "building the vmeanba op library (what an exported package calls for the scan) needs a C++ "
        "compiler: install g++ (e.g. `apt-get install g++`) or point $CXX at one"
    )


def torch_paths() -> tuple[Path, Path]:
    """torch's include and lib folders (the headers and libraries the wheel ships)."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "csrc" / "inductor" / "aoti_torch" / "c" / "shim.h").exists():
        raise RuntimeError(
            f"torch's C++ headers are missing under {include}: the op library builds against the headers "
            "the torch wheel ships; install a torch wheel that includes them"
        )
    return include, lib


def _kernel_flags(real: str) -> list[str]:
    renames = [f"-D{entry}=vmeanba_{entry}_{real}" for entry in _KERNEL_ENTRIES]
    return [*native_build.kernel_compile_flags(real), *renames, f"-I{_LOWERING}", "-include", str(_KERNEL_ABI)]


def library_path() -> Path:
    """Where the library is (or will be) cached: `<cache>/oplib-<hash>/libvmeanba_ops.so`."""
    include, _ = torch_paths()
    cc, cxx = native_build.c_compiler(), cxx_compiler()
    parts = [
        _SOURCE.read_text(), _KERNEL_ABI.read_text(), _header(),
        *(p.read_text() for p in sorted(_LOWERING.glob("*.h"))),
        *((_LOWERING / s).read_text() for s in _KERNEL_SOURCES),
        native_build.compiler_identity(cc), native_build.compiler_identity(cxx),
        *(flag for real in _PRECISIONS for flag in _kernel_flags(real)), *_CXX_FLAGS,
        native_build.cpu_identity(), torch.__version__, str(include),
    ]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return native_build.cache_dir() / f"oplib-{key}" / LIBRARY_FILE


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the vmeanba op library failed:\n$ {' '.join(cmd)}\n{done.stderr}")


@lru_cache(maxsize=None)
def build() -> Path:
    """The library's path, compiled on first use (cached across processes)."""
    target = library_path()
    if target.exists():
        return target
    include, torch_lib = torch_paths()
    cc, cxx = native_build.c_compiler(), cxx_compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the vmeanba op library into %s", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        (work / "vmeanba_shims.h").write_text(_header())
        objects = []
        for real in _PRECISIONS:
            for source in _KERNEL_SOURCES:
                obj = work / f"{Path(source).stem}_{real}.o"
                _run([cc, *_kernel_flags(real), "-c", str(_LOWERING / source), "-o", str(obj)])
                objects.append(str(obj))
        wrapper = work / "vmeanba_ops.o"
        _run([cxx, *_CXX_FLAGS, f"-I{work}", f"-I{_SOURCE.parent}", f"-I{include}", "-c", str(_SOURCE), "-o",
              str(wrapper)])
        lib = work / LIBRARY_FILE
        _run([cxx, "-shared", "-fopenmp", str(wrapper), *objects, "-o", str(lib), f"-Wl,-soname,{LIBRARY_FILE}",
              f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch_cpu", "-lc10", "-lm"])
        os.replace(lib, target)
    return target


@lru_cache(maxsize=None)
def load() -> Path:
    """Build (if needed) and load the library into this process; returns its path. A package's
    scan calls resolve to this loaded copy (it matches the package's recorded dependency by name)."""
    path = build()
    torch.ops.load_library(str(path))
    return path
