"""The C++ runner (`runner.cpp`): loads an AOTInductor package and runs it with libtorch alone.

It is the example of Python-free deployment: a program built with the system C++ compiler against
the headers and libraries the torch wheel ships (torch/include, torch/lib), that loads the op
library, loads the package with `torch::inductor::AOTIModelPackageLoader` and runs it on tensors
read from a `torch.save` file. Built on first use (about 20 s) and cached like the op library:
`<cache>/runner-<hash>/vmeanba-runner`, the hash covering the source, the compiler, the flags and
torch's version and headers. The binary finds libtorch through an rpath to this torch's lib folder;
on a machine without this Python environment build it against a libtorch there (the command is
`build_command()`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..lowering import native_build
from . import op_library

log = logging.getLogger(__name__)

RUNNER_FILE = "vmeanba-runner"
_SOURCE = Path(__file__).with_name("runner.cpp")
_FLAGS = ["-O2", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def build_command(output: Union[str, os.PathLike]) -> list[str]:
    """The compiler command that builds the runner into `output`."""
    include, lib = op_library.torch_paths()
    return [op_library.cxx_compiler(), *_FLAGS, f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
            str(_SOURCE), "-o", str(output), f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]


def runner_path() -> Path:
    """Where the runner is (or will be) cached."""
    include, _ = op_library.torch_paths()
    parts = [_SOURCE.read_text(), native_build.compiler_identity(op_library.cxx_compiler()), *_FLAGS,
             torch.__version__, str(include)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return native_build.cache_dir() / f"runner-{key}" / RUNNER_FILE


@lru_cache(maxsize=None)
def build() -> Path:
    """The runner's path, compiled on first use (cached across processes)."""
    target = runner_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the vmeanba runner into %s", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        binary = Path(tmp) / RUNNER_FILE
        cmd = build_command(binary)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the vmeanba runner failed:\n$ {' '.join(cmd)}\n{done.stderr}")
        os.replace(binary, target)
    return target


def run(
    package: Union[str, os.PathLike],
    inputs: Sequence[Tensor],
    *,
    op_library_path: Optional[Union[str, os.PathLike]] = None,
    threads: Optional[int] = None,
    repeats: int = 0,
) -> tuple[tuple[Tensor, ...], Optional[float]]:
    """Run `package` on `inputs` in the C++ runner (a subprocess); returns its outputs and, with
    `repeats`, the median milliseconds of that many timed runs after the first."""
    command = [str(build()), str(package)]
    library = op_library_path if op_library_path is not None else op_library.build()
    with tempfile.TemporaryDirectory() as tmp:
        inputs_file, outputs_file = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save(list(inputs), inputs_file)
        command += [str(inputs_file), str(outputs_file), "--op-library", str(library)]
        if threads is not None:
            command += ["--threads", str(threads)]
        if repeats:
            command += ["--repeats", str(repeats)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the vmeanba runner failed (exit {done.returncode}):\n$ {' '.join(command)}\n"
                               f"{done.stderr}")
        outputs = tuple(torch.load(outputs_file))
    median = None
    if repeats:
        fields = done.stdout.split()
        median = float(fields[fields.index("median_ms") + 1])
    return outputs, median
