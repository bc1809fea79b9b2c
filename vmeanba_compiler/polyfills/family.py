"""`ScanFamily`: one third-party library's scan functions and how they map onto our op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ScanFamily:
    """name: shown in logs and docs.
    matches: whether a module (by its full name) is this library's module holding the functions.
    functions: the attribute names of those functions on the module.
    make_polyfill: (name, fallback) -> polyfill. The polyfill has the original's exact signature
        (parameter names, kinds, defaults: checked before anything is registered) and calls
        `fallback`, a copy of the original, for calls it declines.
    unwrap: follow a decorated attribute's `__wrapped__` chain to the function it wraps and
        substitute that one (the decorator's own code then still runs, e.g. transformers'
        kernel-hub dispatch).
    """

    name: str
    matches: Callable[[str], bool]
    functions: tuple[str, ...]
    make_polyfill: Callable[[str, Callable], Callable]
    unwrap: bool = False
