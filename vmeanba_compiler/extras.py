"""Optional dependencies: what needs them, and the error that says how to install them.

The backend, calibrate, explain and the budget selector need only torch (and triton where CUDA
is used). The bundled digits demo needs scikit-learn (the data set) and matplotlib (the plots):
they come with the `demo` extra, `pip install "vmeanba-compiler[demo]"`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module to import -> the distribution that provides it
DEMO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def import_extra(module: str, purpose: str, extra: str = "demo") -> ModuleType:
    """Import `module` (e.g. "sklearn.datasets"), or raise MissingExtraError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = DEMO_PACKAGES.get(top, top)
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed ({error}). It comes with the "
            f"'{extra}' extra: pip install \"vmeanba-compiler[{extra}]\" (in a checkout: "
            f"pip install -e \".[{extra}]\")"
        ) from error
