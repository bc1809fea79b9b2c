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
- the frame's module: the `self` local of the frame being traced, if it is an `nn.Module` (for a
  resume function that no longer uses `self`: the `self` of the running frame it continues);
- every module's path in the root, by identity (Dynamo keys `nn_module_stack` entries by
  `id(module)`, with "@<n>" for the n-th further call of the same module in one graph).

A scan with no module at all (a plain function, traced as its own frame) is owned by a stable code
location, "<file stem>.<function>".

Two calls of the same module (weights shared) run the same code, so their k-th scans are one site:
when a graph break makes Dynamo compile the module's code once and reuse it for both calls, no
compiled graph could tell them apart, and a graph without breaks is numbered the same way. Scans at
different places of the module's code (or a loop's successive iterations) are different sites. A
call site is told apart by the source positions of its call stack, from the outermost frame that
runs the owner's own code (any method of its class or of a mixin, however bound or called) inward.
A graph that starts after a break in the middle of that code lacks the frames above the break, so
the running frames that called it (still on the Python stack while Dynamo compiles) are put in
front: the positions are then the same as in a graph that traced the owner whole.

Dynamo shares one compiled resume function between instances of a module class (it guards on
the type of `self`, not its identity). A graph with scan sites traced from a module's frame
therefore gets an identity guard on that `self` (`specialize_on_frame_module`): each instance then
compiles its own graph and keeps its own site ids. Dynamo counts recompile limits per guarded
module instance, so deep models do not hit them. When the resumed code no longer uses `self`
(then it is not a local to guard on), the owner is read from the running frame the resume function
continues, and the graph is marked shared (`SharedGraph`): calibration tells the instances apart
while it runs, and a selection must decide them all alike or is refused.

Nothing here changes the user's modules; the only state is a weak per-root table of the indices
handed out, so repeated traces of one model (calibrate, explain, compile) number alike.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx
from torch import nn

from .graph_utils import innermost_module, normalize_module_path

log = logging.getLogger("vmeanba_compiler.passes")

_FRAME_LINE = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>\S+)')
_RESUME = re.compile(r"^torch_dynamo_resume_in_(?P<function>.+)_at_\d+$")


class SiteIdCollisionError(ValueError):
    """Two different scan calls would get one site id; merging their statistics would be wrong."""


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
    # True when frame_module is a local of the traced frame, so Dynamo can guard on it; False when
    # it was found on the running frame a resume function continues (`self` unused after the break)
    guarded: bool
    location: str  # "<file stem>.<function>" of the traced frame's code
    callers: tuple[tuple[str, int], ...]  # (file, line) of the user frames calling it, outermost first

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


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CONVERT_FRAME = os.path.join("_dynamo", "convert_frame.py")


def _resumed_or_self(function_name: str) -> str:
    """The function a Dynamo resume function continues, or the name itself."""
    resumed = _RESUME.match(function_name)
    return resumed.group("function") if resumed else function_name


def _running_callers(f_code: Any) -> tuple[list[Any], Optional[Any]]:
    """The running user frames that called the frame being traced, outermost first, and the running
    frame of the function it resumes (when it is a resume function), or None.

    Callers are the frames beyond Dynamo's frame-conversion entry, without torch's own (Module
    `__call__`, `torch.compile` wrappers), which a node's stack trace leaves out too. The running
    frame of a resumed function (which called the resume function) is not a caller: the resumed
    graph's own stack already starts in that function, at the line it resumed from.
    """
    stack = []
    frame = sys._getframe(1)
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    entries = [i for i, f in enumerate(stack) if f.f_code.co_filename.endswith(_CONVERT_FRAME)]
    if not entries:
        return [], None
    callers = [f for f in reversed(stack[entries[-1] + 1:]) if not f.f_code.co_filename.startswith(_TORCH_DIR)]
    resumed_from = None
    if _RESUME.match(f_code.co_name):
        function = _resumed_or_self(f_code.co_name)
        while callers and _resumed_or_self(callers[-1].f_code.co_name) == function:
            resumed_from = callers.pop()
    return callers, resumed_from


def _root_module(frame_module: Optional[nn.Module]) -> Optional[nn.Module]:
    from torch._dynamo.eval_frame import OptimizedModule

    outermost = None
    for module in _modules_on_call_stack():
        if isinstance(module, OptimizedModule):
            return module._orig_mod
        outermost = module
    return outermost if outermost is not None else frame_module


def _location(code: Any) -> str:
    return f"<{Path(code.co_filename).stem}.{_resumed_or_self(code.co_name)}>"


def current_trace_frame() -> Optional[TraceFrame]:
    """The ownership context of the graph Dynamo is compiling now; None outside Dynamo (then ids
    come from each node's `nn_module_stack` alone)."""
    current = _dynamo_frame_locals()
    if current is None:
        return None
    f_locals, f_code = current
    callers, resumed_from = _running_callers(f_code)
    frame_module = f_locals.get("self")
    guarded = isinstance(frame_module, nn.Module)
    if not guarded:
        frame_module = resumed_from.f_locals.get("self") if resumed_from is not None else None
        if not isinstance(frame_module, nn.Module):
            frame_module = None
    positions = tuple((f.f_code.co_filename, f.f_lineno) for f in callers)
    del callers, resumed_from  # hold no frames
    root = _root_module(frame_module)
    paths: dict[int, str] = {}
    modules: dict[int, nn.Module] = {}
    if root is not None:
        for name, module in root.named_modules():
            paths[id(module)] = name
            modules[id(module)] = module
    return TraceFrame(root, paths, modules, frame_module, guarded, _location(f_code), positions)


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
    innermost = innermost_module(node)
    if innermost is not None:
        key, source = innermost
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


@functools.lru_cache(maxsize=1024)
def _class_spans(cls: type) -> tuple[tuple[str, int, int], ...]:
    """(file, first line, last line) of the source of every class in `cls`'s MRO outside torch
    (mixins included): a frame whose position falls in one runs the module's own code (a method,
    however it is bound or called, or a closure defined in one)."""
    spans = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        try:
            lines, first = inspect.getsourcelines(klass)
            file = inspect.getsourcefile(klass)
        except (OSError, TypeError):
            continue
        if file:
            spans.append((_real(file), first, first + len(lines) - 1))
    return tuple(spans)


@functools.lru_cache(maxsize=4096)
def _real(file: str) -> str:
    return os.path.realpath(file)


def _in_spans(position: tuple[str, int], spans: tuple[tuple[str, int, int], ...]) -> bool:
    file, line = position
    return any(first <= line <= last and _real(file) == span_file for span_file, first, last in spans)


def call_site(node: torch.fx.Node, owner: Owner, frame: Optional[TraceFrame]) -> tuple[tuple[str, int], ...]:
    """The source positions of the call stack from the outermost frame of the owner's own code
    inward. The frames of the graph's callers that are still running (`TraceFrame.callers`) are put
    before the node's own stack, so a graph that starts after a break in the middle of the owner's
    code gives the same positions as a graph that traced the owner whole."""
    frames = list(frame.callers if frame is not None else ()) + _stack_frames(node)
    spans = _class_spans(type(owner.module)) if owner.module is not None else ()
    for i, position in enumerate(frames):
        if _in_spans(position, spans):
            return tuple(frames[i:])
    return tuple(_stack_frames(node))


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
        site = call_site(node, owner, self._frame)
        repeat_key = (owner.path, owner.invocation, site)
        ordinal = self._ordinals.get(repeat_key, 0)
        self._ordinals[repeat_key] = ordinal + 1
        with _lock:
            per_owner = self._table.setdefault(owner.path, {})
            index = per_owner.setdefault((site, ordinal), len(per_owner))
        return owner, index


# --- graphs Dynamo shares between module instances ---------------------------------------------------


@dataclass(frozen=True)
class SharedGraph:
    """A site in a graph that Dynamo runs for every instance of a module class.

    A resume function whose code no longer uses `self` cannot be guarded on the instance, so Dynamo
    compiles it once and runs it for every instance that reaches it. Its sites are named after the
    instance it was traced for; `sibling_ids` are the ids of the same call in the other instances.
    Calibration tells them apart while it runs (`running_site_id`); a selection must decide all of
    them alike, as one compiled graph cannot do both."""

    module_type: type
    suffix: str  # the site's owner path below the instance ("" or ".sub.module")
    call_index: int
    sibling_ids: tuple[str, ...]
    paths: dict[int, str] = field(compare=False, repr=False)

    def running_site_id(self) -> Optional[str]:
        """The id of this call in the instance running it now: the innermost running frame whose
        `self` is an instance of the module class."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, self.module_type) and id(owner) in self.paths:
                return f"{self.paths[id(owner)]}{self.suffix}:{self.call_index}"
            frame = frame.f_back
        return None


def shared_graph(frame: Optional[TraceFrame], owner_path: str, call_index: int) -> Optional[SharedGraph]:
    """The sharing of a site traced in `frame`, or None when Dynamo compiles its graph for one
    module instance only (guarded frames, frames of the root or of no module)."""
    if frame is None or frame.guarded or frame.frame_module is None:
        return None
    frame_path = frame.frame_module_path
    if not frame_path:
        return None
    if owner_path == frame_path:
        suffix = ""
    elif owner_path.startswith(frame_path + "."):
        suffix = owner_path[len(frame_path):]
    else:
        return None
    module_type = type(frame.frame_module)
    siblings = tuple(
        f"{frame.paths[key]}{suffix}:{call_index}"
        for key, module in frame.modules.items()
        if type(module) is module_type and module is not frame.frame_module
    )
    return SharedGraph(module_type, suffix, call_index, siblings, frame.paths)
