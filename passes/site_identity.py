"""Name each scan site after the module that owns it, in whichever graph Dynamo traced it.

A site id is "<owner>:<call index>". The owner is the path of the innermost module whose code
made the scan call, written as in `model.named_modules()` of the model given to `torch.compile`
(the root). The call index numbers the distinct scan calls in one run of that module's forward,
in the order they first execute. Ids depend only on the user's model and its code, never on how
Dynamo split it into graphs, so a profile calibrated on one trace fits every later one.

Why this needs more than the node's `nn_module_stack`: a graph break makes Dynamo trace the rest
of a function as a separate frame (a "resume" function), and a module whose caller broke is traced
as its own frame. Those graphs' module paths are relative to the frame's own `self`, or empty when
the scan sits directly in the resumed code. So for each graph this module finds:

- the root: the model that `torch.compile` wraps (the innermost `OptimizedModule` on the Python
  call stack), else the outermost module whose method is on the stack, else the frame's `self`;
- the frame's module: the `self` local of the frame being traced, if it is an `nn.Module`;
- every module's path in the root, by identity (Dynamo keys `nn_module_stack` entries by
  `id(module)`, with "@<n>" for the n-th further call of the same module in one graph).

A scan with no module at all (a plain function, traced as its own frame) is owned by a stable code
location, "<file stem>.<function>".

Two calls of the same module (weights shared) run the same code, so their k-th scans are one site:
when a graph break makes Dynamo compile the module's code once and reuse it for both calls, no
compiled graph could tell them apart, and a graph without breaks is numbered the same way. Scans at
different places of the module's code (or a loop's successive iterations) are different sites. A
call site is told apart by the source positions of its call stack from the module's forward
inward, so it does not depend on where the graph started.

Dynamo shares one compiled resume function between instances of a module class (it guards on
the type of `self`, not its identity). A graph with scan sites traced from a module's frame
therefore gets an identity guard on that `self` (`specialize_on_frame_module`): each instance then
compiles its own graph and keeps its own site ids. Dynamo counts recompile limits per guarded
module instance, so deep models do not hit them.

Nothing here changes the user's modules; the only state is a weak per-root table of the indices
handed out, so repeated traces of one model (calibrate, explain, compile) number alike.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx
from torch import nn

log = logging.getLogger("vmeanba_compiler.passes")

_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]\.?")
_SUBSCRIPT = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")
_FRAME_LINE = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>\S+)')
_RESUME = re.compile(r"^torch_dynamo_resume_in_(?P<function>.+)_at_\d+$")


class SiteIdCollisionError(ValueError):
    """Two different scan calls would get one site id; merging their statistics would be wrong."""


def normalize_module_path(raw: str) -> str:
    """"L['self'].stages[0]._modules['1'].op" -> "stages.0.1.op" (as in named_modules())."""
    path = _ROOT.sub("", raw)
    path = _SUBSCRIPT.sub(r".\1", path).replace("._modules.", ".")
    return path.strip(".")


def _join(prefix: str, rest: str) -> str:
    return ".".join(p for p in (prefix, rest) if p)


# --- the frame Dynamo is tracing ---------------------------------------------------------------------


@dataclass(frozen=True)
class TraceFrame:
    """What the frame being compiled tells about who owns its scans."""

    root: Optional[nn.Module]
    paths: dict[int, str]  # id(module) -> path in root
    modules: dict[int, nn.Module]  # id(module) -> module, for the same modules
    frame_module: Optional[nn.Module]
    location: str  # "<file stem>.<function>" of the traced frame's code

    @property
    def frame_module_path(self) -> Optional[str]:
        if self.frame_module is None:
            return None
        return self.paths.get(id(self.frame_module))


def _dynamo_frame_locals() -> Optional[tuple[dict, Any]]:
    """(f_locals, f_code) of the frame Dynamo is tracing now, or None outside a Dynamo trace."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None
    if tx is None:
        return None
    return tx.f_locals, tx.f_code


def _modules_on_call_stack() -> list[nn.Module]:
    """`self` of every method frame on the Python stack that belongs to a module, innermost first."""
    found: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and (not found or found[-1] is not owner):
            found.append(owner)
        frame = frame.f_back
    return found


def _root_module(frame_module: Optional[nn.Module]) -> Optional[nn.Module]:
    from torch._dynamo.eval_frame import OptimizedModule

    outermost = None
    for module in _modules_on_call_stack():
        if isinstance(module, OptimizedModule):
            return module._orig_mod
        outermost = module
    return outermost if outermost is not None else frame_module


def _location(code: Any) -> str:
    name = code.co_name
    resumed = _RESUME.match(name)
    if resumed:
        name = resumed.group("function")
    return f"<{Path(code.co_filename).stem}.{name}>"


def current_trace_frame() -> Optional[TraceFrame]:
    """The ownership context of the graph Dynamo is compiling now; None outside Dynamo (then ids
    come from each node's `nn_module_stack` alone)."""
    current = _dynamo_frame_locals()
    if current is None:
        return None
    f_locals, f_code = current
    frame_module = f_locals.get("self")
    if not isinstance(frame_module, nn.Module):
        frame_module = None
    root = _root_module(frame_module)
    paths: dict[int, str] = {}
    modules: dict[int, nn.Module] = {}
    if root is not None:
        for name, module in root.named_modules():
            paths[id(module)] = name
            modules[id(module)] = module
    return TraceFrame(root, paths, modules, frame_module, _location(f_code))


def specialize_on_frame_module() -> None:
    """Make Dynamo guard the compiled frame on the identity of its `self`, so another instance of
    the same module class compiles its own graph instead of reusing this one (and its site ids)."""
    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import LocalSource
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    tx.output.guards.add(LocalSource("self").make_guard(GuardBuilder.ID_MATCH))


# --- owners and call sites of nodes ------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    path: str
    module: Optional[nn.Module]
    invocation: str  # tells apart calls of the same module within one graph


def _module_id(stack_key: str) -> Optional[int]:
    head = stack_key.split("@")[0]
    return int(head) if head.isdigit() else None


def node_owner(node: torch.fx.Node, frame: Optional[TraceFrame]) -> Owner:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        key, (source, _) = list(stack.items())[-1]
        module_id = _module_id(key)
        if frame is not None and module_id in frame.paths:
            return Owner(frame.paths[module_id], frame.modules[module_id], key)
        relative = normalize_module_path(source)
        frame_path = frame.frame_module_path if frame is not None else None
        if frame_path and source.startswith(("L['self']", 'L["self"]')):
            return Owner(_join(frame_path, relative), None, key)
        return Owner(relative, None, key)
    if frame is None:
        return Owner("", None, "")
    if frame.frame_module is not None:
        path = frame.frame_module_path
        if path is not None:
            return Owner(path, frame.frame_module, "frame")
    return Owner(frame.location, None, "frame")


def _stack_frames(node: torch.fx.Node) -> list[tuple[str, int]]:
    frames = []
    for line in (node.meta.get("stack_trace") or "").splitlines():
        match = _FRAME_LINE.match(line)
        if match:
            frames.append((match.group("file"), int(match.group("line"))))
    return frames


def _forward_span(module: nn.Module) -> Optional[tuple[str, int, int]]:
    try:
        code = inspect.unwrap(type(module).forward).__code__
    except (AttributeError, ValueError):
        return None
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return code.co_filename, min([code.co_firstlineno, *lines]), max([code.co_firstlineno, *lines])


def call_site(node: torch.fx.Node, owner: Owner) -> tuple[tuple[str, int], ...]:
    """The source positions of the call stack from the owner's forward inward: the same in a
    graph that starts at the model's forward and in one that starts at the owner's."""
    frames = _stack_frames(node)
    span = _forward_span(owner.module) if owner.module is not None else None
    if span is not None:
        file, first, last = span
        for i, (frame_file, line) in enumerate(frames):
            if frame_file == file and first <= line <= last:
                return tuple(frames[i:])
    return tuple(frames)


# --- index registry ----------------------------------------------------------------------------------

_lock = threading.Lock()
# root module -> owner path -> (call site, ordinal) -> call index
_indices: "weakref.WeakKeyDictionary[nn.Module, dict[str, dict[tuple, int]]]" = weakref.WeakKeyDictionary()


class SiteNamer:
    """Hands out call indices for one graph: per owner, in the order call sites first execute, and
    the same index for the same call site in every later graph of the same root model."""

    def __init__(self, frame: Optional[TraceFrame]) -> None:
        self._frame = frame
        self._ordinals: dict[tuple, int] = {}
        root = frame.root if frame is not None else None
        if root is None:
            self._table: dict[str, dict[tuple, int]] = {}
        else:
            with _lock:
                self._table = _indices.setdefault(root, {})

    def name(self, node: torch.fx.Node) -> tuple[Owner, int]:
        owner = node_owner(node, self._frame)
        site = call_site(node, owner)
        repeat_key = (owner.path, owner.invocation, site)
        ordinal = self._ordinals.get(repeat_key, 0)
        self._ordinals[repeat_key] = ordinal + 1
        with _lock:
            per_owner = self._table.setdefault(owner.path, {})
            index = per_owner.setdefault((site, ordinal), len(per_owner))
        return owner, index
