"""How the command line finds a user's model and data: `module:attribute` specs and checkpoints.

A spec names an importable module and an attribute in it ("my_pkg.models:build" or
"my_pkg.data:batches"; dotted attributes are followed, and the current directory is importable,
as for `python -m`). A model spec may name an nn.Module or a factory called without arguments;
a data spec names an iterable of batches or a function returning one.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


def load_object(spec: str) -> Any:
    """The attribute `spec` = "module:attr[.attr...]" names; errors say what is missing."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'module:attribute' (e.g. 'my_pkg.models:build'), got {spec!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"{spec!r}: cannot import module {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


def _call_if_factory(obj: Any) -> Any:
    return obj() if callable(obj) and not isinstance(obj, nn.Module) else obj


def load_model(model_spec: Optional[str], checkpoint: Optional[str]) -> nn.Module:
    """The model in eval mode: built by `model_spec`, weights from `checkpoint` when given.

    checkpoint alone must be one written by `vmeanba train-demo` (either task; it names its
    config); with `model_spec` it may be any state_dict file or a dict holding one under
    "state_dict". Files are read with weights_only=True: no code from them is run.
    """
    from .training import load_trained_model

    if model_spec is None and checkpoint is None:
        raise ValueError("give --model module:factory, --checkpoint PATH, or both")
    if model_spec is None:
        return load_trained_model(checkpoint)
    model = _call_if_factory(load_object(model_spec))
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {model_spec!r} gave {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def load_batches(spec: str) -> list[Any]:
    """The batches `spec` names (an iterable, or a function returning one), as a list."""
    batches = list(_call_if_factory(load_object(spec)))
    if not batches:
        raise ValueError(f"--data {spec!r} gave no batches")
    return batches
