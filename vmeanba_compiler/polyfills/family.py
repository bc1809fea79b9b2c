"""`ScanFamily`: one third-party library's scan functions and how they map onto our op."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("vmeanba_compiler.substitutions")

# (qualified name, fallback) -> polyfill; see ScanFamily.make_polyfill.
PolyfillFactory = Callable[[str, Callable], Callable]


@dataclass(frozen=True)
class ScanFamily:
    """name: shown in logs and docs.
    matches: whether a module (by its full name) is this library's module holding the functions.
    functions: the attribute names of those functions on the module.
    make_polyfill: (name, fallback) -> polyfill. The polyfill has the original's exact signature
        (parameter names, kinds, defaults: checked before anything is registered) and calls
        `fallback`, a copy of the original, for calls it declines. `name` is the qualified name
        ("module.function"). For a function published with several signatures, build this
        factory with `by_signature`, which picks the polyfill matching the original.
    unwrap: follow a decorated attribute's `__wrapped__` chain to the function it wraps and
        substitute that one (the decorator's own code then still runs, e.g. transformers'
        kernel-hub dispatch).
    """

    name: str
    matches: Callable[[str], bool]
    functions: tuple[str, ...]
    make_polyfill: PolyfillFactory
    unwrap: bool = False


def _signature_key(fn: Callable) -> tuple:
    return tuple((p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values())


def by_signature(*factories: PolyfillFactory) -> PolyfillFactory:
    """A `make_polyfill` for a function whose signature changed across releases.

    Why: a library can add parameters to a function between versions (mamba_ssm's
    `mamba_inner_fn` gained five in v2.2.3), and a user may have either installed. Each factory
    builds the polyfill for one published signature, newest first. The returned factory builds
    them all and keeps the one whose signature (parameter names, kinds, defaults) equals that of
    `fallback`, which is a copy of the original and so has its signature. When none does, it
    returns the first; the registration's signature check then leaves the original alone with a
    warning (an unknown signature may mean unknown semantics, so nothing is guessed).
    """
    if not factories:
        raise ValueError("by_signature needs at least one polyfill factory")

    def make_polyfill(name: str, fallback: Callable) -> Callable:
        polyfills = [factory(name, fallback) for factory in factories]
        try:
            wanted = _signature_key(fallback)
        except (TypeError, ValueError):
            return polyfills[0]
        for polyfill in polyfills:
            if _signature_key(polyfill) == wanted:
                return polyfill
        log.debug("%s matches none of the %d known signatures", name, len(polyfills))
        return polyfills[0]

    return make_polyfill
