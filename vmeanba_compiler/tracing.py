"""Helpers shared by the entry points that trace a user's model themselves (calibrate, explain,
the testing helpers): how a batch of inputs is passed, and how Dynamo is prepared and unwrapped.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .scan_substitutions import install_scan_substitutions

log = logging.getLogger(__name__)


def call_with_inputs(fn: Callable, inputs: Any) -> Any:
    """Call `fn` with one batch: a Tensor, a tuple/list of positional arguments or a dict of
    keyword arguments."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    if isinstance(inputs, dict):
        return fn(**inputs)
    raise TypeError(
        "model inputs must be a Tensor, a tuple/list of positional arguments or a dict of keyword "
        f"arguments, got {type(inputs).__name__}"
    )


# torch 2.13 counts recompiles per torch.compile call when asked; older releases share the count
_ISOLATE_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters
# without that, entries this module drops still count towards Dynamo's per-code recompile limit,
# so its own traces run with a higher one (only while they run)
_RECOMPILE_LIMIT_FLOOR = 64


class IsolatedTrace:
    """`torch.compile(model, backend=...)` traced anew, without touching the rest of the process.

    Dynamo caches compiled code on each Python code object it compiles, one entry per guard set
    and backend callable; an entry is only reused by a call with the same backend. Each
    IsolatedTrace compiles with a backend callable of its own (a new function wrapping `backend`),
    so it never reuses an earlier trace (the user's, or one of an earlier calibrate/explain) and
    the user's compiled functions never run its instrumented graphs. On torch versions that have
    it, the compile is also `isolate_recompiles=True`, so its recompiles are counted apart from
    the user's.

    `release()` (also by `with ... as traced`; a garbage-collected trace is released at the next
    new trace or release) removes what it left in Dynamo's caches: a code object that only holds its entries (or dead
    ones) is cleared, otherwise its entries are invalidated, which frees their graphs. Nothing else
    is reset; `torch._dynamo.reset()` is never called.
    """

    def __init__(self, model: Callable, backend: Any, **compile_kwargs: Any) -> None:
        install_scan_substitutions()

        def isolated_backend(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
            inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
            return inner(gm, example_inputs, **kwargs)

        if _ISOLATE_RECOMPILES:
            compile_kwargs.setdefault("isolate_recompiles", True)
        _drop_released()
        self._compiled = torch.compile(model, backend=isolated_backend, **compile_kwargs)
        # Garbage collection may run while Dynamo executes compiled code, where changing its
        # caches is unsafe (seen: a segfault). A collected trace only queues its backend; the
        # queue is emptied at the next safe point: a new trace or an explicit release.
        self._finalizer = weakref.finalize(self, _released_backends.append, isolated_backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._finalizer.alive:
            raise RuntimeError("this trace was released; trace the model again")
        if _ISOLATE_RECOMPILES:
            return self._compiled(*args, **kwargs)
        limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT_FLOOR)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return self._compiled(*args, **kwargs)

    def release(self) -> None:
        """Drop this trace's entries from Dynamo's caches (idempotent). Call it where no code
        compiled by it is running (not from inside the traced model)."""
        self._finalizer()
        _drop_released()

    def __enter__(self) -> "IsolatedTrace":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


_released_backends: list[Callable] = []


def _drop_released() -> None:
    while _released_backends:
        drop_cache_entries(_released_backends.pop())


def fresh_trace(model: Callable, backend: Any, **compile_kwargs: Any) -> IsolatedTrace:
    """`torch.compile(model, backend=...)` traced anew (see `IsolatedTrace`): Mamba/VMamba scan
    functions are mapped onto the project's op first, no earlier trace is reused, and the user's
    other compiled code is left alone. Call `.release()` (or use it in a `with`) when done."""
    return IsolatedTrace(model, backend, **compile_kwargs)


def _is_backend(candidate: Any, backend: Callable) -> bool:
    """Whether a cache entry's backend is `backend`, possibly inside torch.compile's wrappers."""
    for _ in range(8):
        if candidate is backend:
            return True
        for attribute in ("compiler_fn", "_torchdynamo_orig_backend", "__wrapped__"):
            inner = getattr(candidate, attribute, None)
            if inner is not None and inner is not candidate:
                candidate = inner
                break
        else:
            return False
    return False


def drop_cache_entries(backend: Callable) -> int:
    """Remove the Dynamo cache entries compiled by `backend`; returns how many code objects held
    some. Uses Dynamo's private cache introspection; on a torch without it, this does nothing
    (the entries then stay until their guarded objects die, as for any torch.compile call)."""
    try:
        from torch._C._dynamo import eval_frame as dynamo_frames
        from torch._dynamo.guards import DeletedGuardManagerWrapper
        from torch._dynamo.utils import orig_code_map

        codes = {id(code): code for code in list(orig_code_map.values.values())}
    except (ImportError, AttributeError) as error:
        log.debug("cannot inspect Dynamo's caches (%s); leaving the trace's entries in place", error)
        return 0
    touched = 0
    for code in codes.values():
        try:
            entries = list(dynamo_frames._debug_get_cache_entry_list(code))
            ours = [_is_backend(getattr(entry, "backend", None), backend) for entry in entries]
            if not any(ours):
                continue
            touched += 1
            dead = [isinstance(entry.guard_manager, DeletedGuardManagerWrapper) for entry in entries]
            if all(mine or gone for mine, gone in zip(ours, dead)):
                dynamo_frames.reset_code(code)  # nothing of anyone else's lives here
                continue
            for entry, mine, gone in zip(entries, ours, dead):
                if mine and not gone:
                    guards = entry.guard_manager
                    guards.extra_state.invalidate(entry, DeletedGuardManagerWrapper("released by vmeanba_compiler"))
                    # Dynamo would invalidate it again when a guarded object dies: tell it it is gone
                    guards.cache_entry = guards.extra_state = None
        except (AttributeError, TypeError, RuntimeError) as error:  # another torch's private API
            log.debug("could not drop Dynamo cache entries of %s: %s", code.co_name, error)
    return touched


@contextlib.contextmanager
def backend_errors_unwrapped() -> Iterator[None]:
    """Re-raise our own errors from inside a backend as themselves, not as Dynamo's
    BackendCompilerFailed wrapper, so callers can catch e.g. ProfileMismatchError."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as failure:
        raise failure.inner_exception from None
