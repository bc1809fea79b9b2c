"""Trace-time stand-ins ("polyfills") for third-party scan functions, one module per library.

Each module defines a `ScanFamily`: which module names it matches, which of their functions it
maps, and a polyfill factory. `vmeanba_compiler.scan_substitutions` registers the polyfills with
Dynamo; `FAMILIES` is the list it reads. Adding a library means adding a module here (see
docs/SCAN_FORMS.md for what each one accepts and declines).
"""

from __future__ import annotations

from .csms6s import CSMS6S
from .family import ScanFamily
from .mamba_ssm import MAMBA_SSM
from .transformers_mamba import TRANSFORMERS_MAMBA

FAMILIES: tuple[ScanFamily, ...] = (MAMBA_SSM, CSMS6S, TRANSFORMERS_MAMBA)

__all__ = ["FAMILIES", "ScanFamily"]
