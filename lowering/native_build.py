"""Compile the C scan kernel once per machine and load it with ctypes.

Why not a torch C++ extension: those need torch's headers and take a minute to build; this kernel
is plain C over raw pointers, builds in well under a second with the system C compiler (the same
compiler torch.compile already needs on CPU) and is cached by content hash, so later processes
load it instantly. The build writes to a temporary file and renames it, so concurrent processes
never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

_SOURCE = Path(__file__).with_name("selective_scan_cpu.c")
# -ffast-math lets gcc call glibc's vectorised expf (libmvec) in the state update. It is passed to
# the compile step only: linking a shared library with it would pull in crtfastmath.o, which flips
# the whole process into flush-to-zero mode.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    """Where built kernels are kept: $VMEANBA_CACHE_DIR, else ~/.cache/vmeanba_compiler."""
    root = os.environ.get("VMEANBA_CACHE_DIR") or Path.home() / ".cache" / "vmeanba_compiler"
    return Path(root)


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        "vmeanba_compiler's CPU selective scan needs a C compiler (torch.compile on CPU needs one "
        "too): install gcc (e.g. `apt-get install gcc`) or point $CC at one."
    )


def _cpu_identity() -> str:
    """-march=native code is only valid on the CPU model that built it: key the cache on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(real: str) -> Path:
    compiler = _compiler()
    flags = [*_COMPILE_FLAGS, f"-DREAL={real}"]
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), compiler, *flags, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"selective_scan_{real}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / "scan.so"
        for cmd in (
            [compiler, *flags, "-c", str(_SOURCE), "-o", str(obj)],
            [compiler, "-shared", str(obj), "-o", str(lib), "-lm"],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"building the CPU selective-scan kernel failed:\n$ {' '.join(cmd)}\n{done.stderr}"
                )
        os.replace(lib, target)
    return target


_PTR, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_PROJ = [_PTR, _I64, _I64, _I64, _I64]  # pointer, batch/group/time strides, channels per group
_FORWARD_ARGS = [_PTR] * 3 + _PROJ * 2 + [_PTR] * 3 + [_I32] + [_PTR] * 3 + [_I64] * 6
_BACKWARD_ARGS = [_PTR] * 5 + _PROJ * 2 + [_PTR] * 3 + [_I32] + [_PTR] * 9 + [_I64] * 6


@lru_cache(maxsize=None)
def load_kernels(real: str) -> ctypes.CDLL:
    """The kernel library for `real` in {"float", "double"}, built on first use."""
    lib = ctypes.CDLL(str(_build(real)))
    lib.scan_forward.argtypes = _FORWARD_ARGS
    lib.scan_forward.restype = None
    lib.scan_backward.argtypes = _BACKWARD_ARGS
    lib.scan_backward.restype = None
    return lib
