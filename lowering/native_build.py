"""Compile the C scan kernels once per machine and load them with ctypes.

Why not a torch C++ extension: those need torch's headers and take a minute to build; this kernel
is plain C over raw pointers, builds in well under a second with the system C compiler (the same
compiler torch.compile already needs on CPU) and is cached by content hash, so later processes
load it instantly. The build writes to a temporary file and renames it, so concurrent processes
never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
# One library: the full scan, the fused reduced site, and the header both include.
_SOURCES = (_HERE / "selective_scan_cpu.c", _HERE / "reduced_scan_cpu.c")
_HEADERS = (_HERE / "scan_math.h",)
# -ffast-math lets gcc reassociate the state update and call glibc's vectorised exp/log1p
# (libmvec). -fno-finite-math-only takes back its one unsafe assumption for our inputs, that no
# value is NaN or inf: NaN/inf inputs then give what the reference loop gives (tested). Without
# finite-math gcc stops defining __FAST_MATH__, which glibc's header needs to declare the libmvec
# variants; selective_scan_cpu.c defines it itself (those variants handle NaN and inf correctly).
# Measured with `vmeanba bench-scan`: no slower than plain -ffast-math. The flags go to the compile
# step only: linking a shared library with -ffast-math would pull in crtfastmath.o, which flips the
# whole process into flush-to-zero mode.
# -D_DEFAULT_SOURCE: reduced_scan_cpu.c calls madvise(MADV_HUGEPAGE), which glibc hides under
# -std=c11 without it; a flag rather than a #define in the source, because the deploy op library
# force-includes a header (and so the C library's feature setup) before the source's first line.
# -fopenmp: the reduced-site kernel runs its items on OpenMP threads; the library then needs
# libgomp.so.1, which in a process with torch resolves to the copy torch loaded (one thread pool).
# A compiler without OpenMP (clang without libomp) gets a build without it (`_build`).
_OPENMP = "-fopenmp"
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-std=c11",
                  "-D_DEFAULT_SOURCE", _OPENMP]
_LINK_FLAGS = ["-shared", _OPENMP]


def cache_dir() -> Path:
    """Where built kernels are kept: $VMEANBA_CACHE_DIR, else ~/.cache/vmeanba_compiler."""
    root = os.environ.get("VMEANBA_CACHE_DIR") or Path.home() / ".cache" / "vmeanba_compiler"
    return Path(root)


def c_compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        "vmeanba_compiler's CPU selective scan needs a C compiler (torch.compile on CPU needs one "
        "too): install gcc (e.g. `apt-get install gcc`) or point $CC at one."
    )


def compiler_identity(compiler: str) -> str:
    """The compiler's resolved path and its version banner: another gcc/clang (or an upgrade of
    the same one) may generate other code for the same flags."""
    path = shutil.which(compiler) or compiler
    try:
        banner = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        banner = ""
    return f"{os.path.realpath(path)}\0{banner.strip()}"


def cpu_identity() -> str:
    """-march=native code is only valid on a CPU with the same instruction set: key the cache on
    the CPU model and its feature flags (/proc/cpuinfo's "flags", "Features" on Arm)."""
    wanted = ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in wanted and key not in found:
                found[key] = value.strip()
    except OSError:
        pass
    if "flags" not in found and "Features" not in found:
        found["platform"] = f"{platform.system()} {platform.machine()} {platform.processor()}"
    return "\0".join(f"{k}: {v}" for k, v in sorted(found.items()))


def kernel_compile_flags(real: str) -> list[str]:
    return [*_COMPILE_FLAGS, f"-DREAL={real}"]


def library_path(real: str) -> Path:
    """Where the library for `real` is cached. The name hashes everything the machine code depends
    on: the sources, the compiler (path and version), the compile and link flags, and the CPU's
    model and feature flags, so a shared cache never hands out a build for another setup."""
    compiler = c_compiler()
    key = hashlib.sha256("\0".join([
        *(f.read_text() for f in (*_SOURCES, *_HEADERS)), compiler_identity(compiler), *kernel_compile_flags(real), "link:", *_LINK_FLAGS, cpu_identity(),
    ]).encode()).hexdigest()[:16]
    return cache_dir() / f"selective_scan_{real}_{key}.so"


def _build(real: str) -> Path:
    target = library_path(real)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = kernel_compile_flags(real)
    try:
        _compile_library(flags, _LINK_FLAGS, target)
    except RuntimeError as error:
        without = [f for f in flags if f != _OPENMP]
        try:
            _compile_library(without, [f for f in _LINK_FLAGS if f != _OPENMP], target)
        except RuntimeError:
            raise error from None
        log.warning("the C compiler cannot build OpenMP code, so the reduced-site CPU kernel runs on one thread "
                    "(install libgomp or libomp to use torch's threads):\n%s", error)
    return target


def _compile_library(compile_flags: list[str], link_flags: list[str], target: Path) -> None:
    compiler = c_compiler()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in _SOURCES]
        lib = Path(tmp) / "scan.so"
        commands = [[compiler, *compile_flags, "-c", str(source), "-o", obj] for source, obj in zip(_SOURCES, objects)]
        for cmd in (*commands, [compiler, *link_flags, *objects, "-o", str(lib), "-lm"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"building the CPU selective-scan kernel failed:\n$ {' '.join(cmd)}\n{done.stderr}"
                )
        os.replace(lib, target)


_PTR, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_PROJ = [_PTR, _I64, _I64, _I64, _I64]  # pointer, batch/group/time strides, channels per group
_FORWARD_ARGS = [_PTR] * 3 + _PROJ * 2 + [_PTR] * 3 + [_I32] + [_PTR] * 3 + [_I64] * 6
_BACKWARD_ARGS = [_PTR] * 5 + _PROJ * 2 + [_PTR] * 3 + [_I32] + [_PTR] * 9 + [_I64] * 6
_STRIDED_PROJ = [_PTR, _I64, _I64, _I64, _I64, _I64]  # pointer, batch/group/state/time strides, channels per group
_REDUCED_ARGS = [_PTR] * 3 + _STRIDED_PROJ * 2 + [_PTR] * 3 + [_I32] * 3 + [_PTR] * 2 + [_I64] * 7


@lru_cache(maxsize=None)
def load_kernels(real: str) -> ctypes.CDLL:
    """The kernel library for `real` in {"float", "double"}, built on first use."""
    lib = ctypes.CDLL(str(_build(real)))
    for name, argtypes in (("scan_forward", _FORWARD_ARGS), ("scan_backward", _BACKWARD_ARGS),
                           ("reduced_scan_forward", _REDUCED_ARGS)):
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib
