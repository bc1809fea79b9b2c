"""Trace third-party selective scans as one `vmeanba.selective_scan` node.

Vision SSMs call their scan through code that is not ours. Compiled as written, Dynamo inlines
those functions and unrolls their Python loop over L into thousands of graph nodes, and the
VMeanba passes (which look for `torch.ops.vmeanba.selective_scan`) find nothing. This module maps
them onto our op at trace time, leaving eager execution untouched.

The libraries and functions matched, with the exact forms each accepts, are defined in
`vmeanba_compiler.polyfills` (one module per library) and listed in docs/SCAN_FORMS.md; anything
else is left alone. A matched name is only substituted if it holds a plain Python function with
exactly the polyfill's signature (parameter names, kinds and defaults); otherwise it is left alone
with a warning.

Math is float32, or float64 when u is float64 (the originals use float32; ours is at least as
precise). Output dtypes follow each original, so compiled and eager agree.

Declined at trace time (the polyfill then traces the user's original code, a copy of the function
object so the substitution does not recurse): calls our op cannot represent, e.g. an argument
that is not a real floating tensor. Such calls trace as before, loop and all; the result is still
correct.

Mechanism: `torch.compiler.substitute_in_graph(original)(polyfill)`. It is public API (since
torch 2.5; its registration code reads the same in every PyTorch source version we compared; the
tests run on 2.13) and registers the polyfill by the identity of the original function object, in
Dynamo's id-dispatch table and trace rules. So:
- it fires wherever Dynamo meets that object, however the user reached it: a module-level
  `from mamba_ssm.ops.selective_scan_interface import selective_scan_fn` in the model's module
  (the case attribute patching misses: that module keeps its own reference), a module attribute,
  a closure or an `nn.Module` attribute, inside a compiled module's forward;
- it works for plain Python functions, not only C functions (the polyfill handler wraps the
  original; Dynamo inlines our polyfill in its place);
- eager calls still run the user's function object itself: nothing is patched;
- registering the same function twice raises ValueError in Dynamo, so this module keeps its own
  registry (and holds the function objects, so their ids stay unique) to make installation
  idempotent; a function that already has someone else's polyfill is left alone;
- `torch._dynamo.reset()` does not remove the registration.
Rejected alternatives: patching module attributes (misses `from x import f` copies and changes
eager behaviour); `allow_in_graph` (puts the user's function, not our op, in the graph); a
Dynamo compile-start callback for late imports (`torch._dynamo.reset()` clears those callbacks).

Modules imported after installation: `install_scan_substitutions()` also puts a small finder at
the front of `sys.meta_path` that reacts only to the matched module names; after such a module
has executed it substitutes its functions. The finder resolves the module with the remaining
finders and wraps the loader only for that import (the module's `__loader__`/`__spec__.loader`
are the real loader again before its code runs). A function defined before install but whose
frame Dynamo already compiled keeps that compiled code until `torch._dynamo.reset()` (guards do
not see the new rule).

The substitution is process-wide: once installed, every torch.compile backend (not only
`vmeanba`) sees `vmeanba.selective_scan` in place of these functions.
"""

from __future__ import annotations

import importlib.abc
import inspect
import logging
import sys
import threading
import types
from typing import Callable, Optional

import torch

from .polyfills import FAMILIES, ScanFamily

log = logging.getLogger("vmeanba_compiler.substitutions")


def _family_for_module(module_name: str) -> Optional[ScanFamily]:
    """The library family a module name belongs to, or None (module left alone)."""
    for family in FAMILIES:
        if family.matches(module_name):
            return family
    return None


def _signature_key(fn: Callable) -> tuple:
    params = inspect.signature(fn).parameters.values()
    return tuple((p.name, p.kind, p.default) for p in params)


def _clone_function(fn: types.FunctionType) -> types.FunctionType:
    """A distinct function object running the same code: what the polyfill traces when it declines
    (calling `fn` itself from the polyfill would dispatch back to the polyfill)."""
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = fn.__qualname__
    clone.__module__ = fn.__module__
    clone.__doc__ = fn.__doc__
    return clone


# --- registry --------------------------------------------------------------------------------------

_lock = threading.RLock()
# id(function) -> (function, family name); holding the function keeps its id from being reused.
_registered: dict[int, tuple[Callable, str]] = {}
# id(function) of matched functions we must not touch (wrong signature, foreign polyfill).
_declined: dict[int, Callable] = {}


def _substitute_module(module: types.ModuleType, family: ScanFamily) -> list[str]:
    """Substitute the family's functions found on `module`; return the qualified names that are
    substituted (now or before)."""
    done = []
    for attr in family.functions:
        fn = module.__dict__.get(attr)
        if fn is None:
            continue
        if family.unwrap:
            fn = inspect.unwrap(fn)
        qualname = f"{module.__name__}.{attr}"
        with _lock:
            entry = _registered.get(id(fn))
            if entry is not None and entry[0] is fn:
                if entry[1] == family.name:
                    done.append(qualname)
                continue
            if id(fn) in _declined and _declined[id(fn)] is fn:
                continue
            if _register(fn, family, qualname):
                _registered[id(fn)] = (fn, family.name)
                done.append(qualname)
                log.info("substituted %s (%s API) -> torch.ops.vmeanba.selective_scan", qualname, family.name)
            else:
                _declined[id(fn)] = fn
    return done


def _register(fn: Callable, family: ScanFamily, qualname: str) -> bool:
    if not isinstance(fn, types.FunctionType):
        log.warning("left %s alone: it is a %s, not a plain Python function", qualname, type(fn).__name__)
        return False
    polyfill = family.make_polyfill(qualname, _clone_function(fn))
    try:
        expected, actual = _signature_key(polyfill), _signature_key(fn)
    except (TypeError, ValueError) as exc:
        log.warning("left %s alone: cannot read its signature (%s)", qualname, exc)
        return False
    if actual != expected:
        log.warning(
            "left %s alone: signature %s differs from the %s API's %s",
            qualname, inspect.signature(fn), family.name, inspect.signature(polyfill),
        )
        return False
    polyfill.__module__ = __name__
    polyfill.__qualname__ = f"vmeanba_polyfill[{qualname}]"
    try:
        torch.compiler.substitute_in_graph(fn)(polyfill)
    except ValueError as exc:  # Dynamo already has a rule or polyfill for this object
        log.warning("left %s alone: Dynamo already has a rule for it (%s)", qualname, exc)
        return False
    return True


# --- late imports ----------------------------------------------------------------------------------


class _SubstituteAfterExec(importlib.abc.Loader):
    """Wraps the real loader of one matched module for one import; substitutes after exec."""

    def __init__(self, loader, family: ScanFamily) -> None:
        self._loader = loader
        self._family = family

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try:
            _substitute_module(module, self._family)
        except Exception:  # never break the user's import over an optimisation
            log.warning("could not substitute scans of %s", module.__name__, exc_info=True)

    def __getattr__(self, name):
        if name == "_loader":  # not yet set (e.g. during copy): do not recurse
            raise AttributeError(name)
        return getattr(self._loader, name)


class _ScanModuleFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the matched module names only, asks the other finders and wraps
    the loader they return."""

    _vmeanba_scan_finder = True

    def find_spec(self, fullname, path, target=None):
        family = _family_for_module(fullname)
        if family is None:
            return None
        for finder in list(sys.meta_path):
            if getattr(finder, "_vmeanba_scan_finder", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _SubstituteAfterExec(spec.loader, family)
            return spec
        return None


def _ensure_import_hook() -> None:
    with _lock:
        if not any(getattr(f, "_vmeanba_scan_finder", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _ScanModuleFinder())


# --- public API ------------------------------------------------------------------------------------


def install_scan_substitutions() -> list[str]:
    """Make Dynamo trace the matched third-party scans (module docstring) as one
    `torch.ops.vmeanba.selective_scan` node each.

    Substitutes them in every matching module now in `sys.modules` and in matching modules
    imported later. Idempotent and cheap (one pass over `sys.modules`' names); call it before
    Dynamo traces the model. Eager calls keep running the original functions.

    Returns the sorted qualified names ("module.function") of the matched functions currently
    substituted, whether by this call or an earlier one.
    """
    _ensure_import_hook()
    names: list[str] = []
    for module_name, module in list(sys.modules.items()):
        family = _family_for_module(module_name)
        if family is None or not isinstance(module, types.ModuleType):
            continue
        names.extend(_substitute_module(module, family))
    return sorted(names)
