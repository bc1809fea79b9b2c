"""Helpers shared by the entry points that trace a user's model themselves (calibrate, explain,
the testing helpers): how a batch of inputs is passed, and how Dynamo is prepared and unwrapped.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .scan_substitutions import install_scan_substitutions


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


def fresh_trace(model: torch.nn.Module, backend: Any, **compile_kwargs: Any) -> Callable:
    """`torch.compile(model, backend=...)` traced anew: Mamba/VMamba scan functions are mapped
    onto the project's op first, and Dynamo's caches are reset so no earlier trace is reused."""
    install_scan_substitutions()
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, **compile_kwargs)


@contextlib.contextmanager
def backend_errors_unwrapped() -> Iterator[None]:
    """Re-raise our own errors from inside a backend as themselves, not as Dynamo's
    BackendCompilerFailed wrapper, so callers can catch e.g. ProfileMismatchError."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as failure:
        raise failure.inner_exception from None
