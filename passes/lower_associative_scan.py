"""Canonicalise selective scans written with `associative_scan` into `vmeanba.selective_scan`.

Model code can write the Mamba recurrence h_t = exp(dt_t*A) * h_{t-1} + dt_t*B_t*u_t as a parallel
scan with `torch._higher_order_ops.associative_scan.associative_scan` (Hugging Face transformers'
`mamba_selective_scan(..., use_associative_scan=True)` does). Later passes (`scan_sites.py`, the
VMeanba rewrite) only see `torch.ops.vmeanba.selective_scan` nodes, so this pass replaces such a
scan, its prologue and its C contraction by one call of the op producing the same y (docs/DESIGN.md
section 1) and, where h's last time step is read, the same last state; it rewires their users.

API: `lower_associative_scan(gm, config=None) -> gm` (the pass; `config` is unused) and
`match_associative_scans(gm) -> list[Match | Declined]` (the report, in graph order; changes
nothing). Each entry names the scan node, its form, the calling module's path and, for `Declined`,
the reason in words. The pass logs one INFO line per entry and the graph after the change at
DEBUG, under the logger "vmeanba_compiler.passes".

How the scan reaches the Dynamo graph (torch 2.13, both checked by the tests):

- `combine_mode="pointwise"` (the default; the frontend accepts CUDA/XPU tensors only) records one
  node `torch.ops.higher_order.associative_scan(combine_graph, [x0, x1], additional_inputs)`:
  `combine_graph` is a `get_attr` of a GraphModule whose first 4 placeholders are the flattened
  left leaves, then the right leaves (with dynamic shapes Dynamo appends the symbolic sizes as
  unused inputs, also passed in `additional_inputs`); the frontend emits
  `xi = torch.movedim(leaf_i, dim, 0)` before the node, `torch.movedim(node[i], 0, dim)` after it
  and two unused `select_copy` probes.
- `combine_mode="generic"` (any device): Dynamo inlines the frontend's recursive odd/even scan, so
  there is NO associative_scan node. The graph holds the same movedims around an unrolled region
  of `aten.slice` / `cat` / `stack` / `flatten` / `pad` on dim 0 and vmapped combine calls
  (`_add_batch_dim` -> mul/add -> `_remove_batch_dim`, between `_vmap_increment_nesting` /
  `_vmap_decrement_nesting` markers). It is recognised walking back from the movedim to dim 0.
  With dynamic shapes the region also computes sizes; it is then declined.

  Making the generic frontend record the HOP node instead (a `torch.compiler.substitute_in_graph`
  of `associative_scan` that calls `associative_scan_op` as the pointwise path does; Dynamo has no
  rule of its own for the frontend, it inlines it) was tried on torch 2.13 and rejected: the
  substitution is global, and the HOP changes what every backend gets. Inductor cannot lower it on
  CPU ("LoweringException: RuntimeError: Unable to generate code for associative_scan op": the C++
  backend has no scan codegen and the lowering has no ATen fallback), so backend="inductor" and
  every scan this pass declines would stop compiling; Dynamo's rule for the HOP demands a
  pointwise combine ("For combine_mode='pointwise', the combine_fn needs to be pointwise"), which
  generic mode exists to lift; and the HOP's autograd treats the leaves independently, so its
  gradient with respect to the decay is wrong (off by O(1) against a sequential loop, where the
  unrolled scan's is exact). Hence the abstract interpreter of the unrolled form below.

Both forms are checked by abstract interpretation: leaf position t starts as the one-step element
decay[t..t] or drive[t..t]; `mul` may only join decays of adjacent intervals
(decay[i..j] * decay[j+1..k], either operand order) or scale an earlier drive by a later decay
(decay[j+1..k] * drive[i..j]); `add` may only complete that into drive[i..k]; slices, concats,
interleaves and padding move elements; vmap levels must match. The scan is accepted only if its
output at every t is drive[0..t]: exactly the inclusive scan under
(a1, b1) . (a2, b2) = (a1*a2, a2*b1 + b2). For the HOP form the combine graph must moreover be
exactly those 3 nodes. A cumsum, (a1+a2, b1*b2), the reversed recurrence (a1*a2, a1*b2 + b1), a
combine with any extra operation, and combines that read other tensors are declined.

Accepted pattern (axis names b, c, l, n for the 4 axes of the scanned tensors, in any order):

    decay = exp(P)                  P: a product of broadcast views of dt (axes b, c, l) and A (c, n)
    drive = Q                       Q: a product of the same dt, u (b, c, l) and B (n, ...)
    ..., h = associative_scan(combine, (decay, drive), dim=<l>)    # or (drive, decay); tuple,
                                    # list or dict; the cumulative-decay output must be unused
    y = (h' * C').sum(<n>)          # h': h through broadcast views and casts, C': a product of
    y = torch.einsum("<h'>,<C'>-><h' minus n>", h', C')            # broadcast views of C; or
    y = torch.matmul(h', C')        # matmul / bmm / @ summing n, e.g. transformers'
                                    # torch.matmul(h.transpose(1, 2).to(dtype), C.unsqueeze(-1))
    state = h'[..., -1, ...]        # optional, any number: h' indexed at its last time step
                                    # (-1 or L-1), or h'.select(<l>, -1); h' views and casts only

y keeps b, c, l (in any order; size-1 axes such as matmul's column may be added). A "product" is
a tree of `*` / `torch.mul` nodes and einsums that sum no label (for example
`torch.einsum("bdl,dn->bdln", dt, A)` or `torch.einsum("bdl,bnl,bdl->bdln", dt, B, u)`, as
mamba_ssm's `selective_scan_ref` writes them). "Broadcast views" are chains of indexing with None /
full slices / one Ellipsis, `unsqueeze`, `squeeze`, `transpose`, `permute`, `movedim`, `expand`,
`contiguous`, `view`/`reshape` that only add or drop size-1 axes, `repeat_interleave(int, dim)`,
and casts that keep every value (below). dt, u, A, B and C are whatever tensors those views start
from (dt may be `softplus(delta + bias)`, A may be `-exp(A_log)`); a role made of several factors
must be one node of its product tree. The roles must map onto the op's forms, after dropping size-1
broadcast axes and permuting (the pass then creates `torch.squeeze` / `torch.permute` argument
nodes):

    u, dt : (batch, dim, L)        A : (dim, N)
    B, C  : shared   (batch, N, L)       no channel axis
            grouped  (batch, G, N, L)    whose G axis is repeat_interleave'd dim/G times to dim
            fixed    (dim, N)            no batch axis and no time axis

Dtypes. selective_scan carries its states in float32 (float64 for float64 u), returns y in u's
dtype and last_state in the state dtype, and needs u and dt in one dtype. Accepted when the scan
(decay and drive) runs in float32 or float64 and each of u, dt, A, B, C converts to that dtype
exactly, e.g. transformers' bfloat16 Mamba: bfloat16 u, dt, B, C and float32 A, states float32.
Casts inside the prologue and on C that keep every value (`.float()`, `.to(wider)`, a no-op
`.type_as`) are seen through: the op makes them itself. Casts of h before the contraction:
- to the state dtype or wider: harmless, y comes from the same states;
- narrowing (transformers' `.to(bfloat16)` of the states): accepted. The original rounds each
  state before contracting, the op contracts unrounded states and rounds y once: at least as
  accurate, and different from the original by its own rounding (|dy| <= 2^-8 * sum_n |h_n C_n|
  in bfloat16, plus one rounding of y);
- to a non-float dtype: declined.
Each replaced value keeps its dtype exactly: when y is wanted in another dtype than u's, or u and
dt differ, u and dt are cast to the state dtype first (exact) so y leaves the op unrounded; an
output whose dtype differs from the replaced node's is cast to it (a last state read after a cast
gets the same cast of the same state).

Replacement: `selective_scan(u, dt, A, B, C, None, None, None, False)`; output 0 replaces the
contraction and output 1 each last-step read, each permuted, unsqueezed (the replaced node's
size-1 axes) and cast into that node's layout and dtype; views after the contraction (transformers'
`.squeeze(-1).transpose(1, 2)`) stay. dt is passed as delta, so a softplus(delta + bias) in the
prologue stays where it was; D and z applied to y afterwards stay too. New nodes go before the
first replaced node and carry the scan's `nn_module_stack` (site ids are built from it) and
`stack_trace`, and fake `example_value`s computed with the op's fake kernel in the graph's fake
mode. Prologue, contraction and read nodes are erased only when nothing else uses them.

Left alone, each with its reason: a combine other than the affine recurrence; reverse=True; more
or fewer than 2 leaves; h used by anything but one C contraction and reads of its last time step
(not rewritten: the scan would have to stay for that consumer, so nothing would be saved), which
includes a read of another step, the last step of another axis, a last state read through a
product, no contraction or two; the cumulative decay used at all; B or C that truly varies per
channel, (batch, dim, N, L) with dim > 1 and no repeat_interleave of a grouped tensor (it would be
exact as grouped with G = dim, but the op's per-channel forms are only broadcasts, so it is
declined); a B/C without batch or time axis other than fixed; constant factors
(`0.5 * dt * u * B`); roles that are not one tensor; a scan run in float16/bfloat16, or an
argument wider than the scan's dtype (the op would not compute the same states); C computed after
h's first read; graphs without fake example values. Every scan is validated before the first
mutation, and a declined scan leaves the graph untouched. An unexpected failure of the analysis
itself declines that scan and logs a warning: the pass never breaks a compilation.
"""
from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx
from torch.fx import Node

from .. import ops  # noqa: F401  (defines torch.ops.vmeanba.selective_scan)
from ..scan_schema import compute_dtype_for
from .graph_utils import finish_graph
from .graph_utils import meta_value as _val
from .graph_utils import module_path as _module_path

log = logging.getLogger("vmeanba_compiler.passes")

__all__ = ["Declined", "Match", "lower_associative_scan", "match_associative_scans"]

_SCAN_OP = torch.ops.vmeanba.selective_scan.default
_ROLES = ("u", "delta", "A", "B", "C")  # the op's tensor arguments, in order
_HOP = getattr(getattr(torch.ops, "higher_order", None), "associative_scan", None)

# ---------------------------------------------------------------------------------------------
# Operator vocabulary: graph targets (Dynamo torch functions, methods, aten ops) -> one name.
# ---------------------------------------------------------------------------------------------


def _aten(name: str) -> Any:
    return getattr(torch.ops.aten, name, None)


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_FUNCTIONS: dict[Any, str] = {}
for _name, _targets in {
    "mul": (operator.mul, torch.mul, _aten("mul")),
    "add": (operator.add, torch.add, _aten("add")),
    "exp": (torch.exp, _aten("exp")),
    "movedim": (torch.movedim, torch.moveaxis, _aten("movedim"), _aten("moveaxis")),
    "unsqueeze": (torch.unsqueeze, _aten("unsqueeze")),
    "transpose": (torch.transpose, torch.swapaxes, torch.swapdims, _aten("transpose")),
    "permute": (torch.permute, _aten("permute")),
    "expand": (_aten("expand"),),
    "reshape": (
        torch.reshape, torch.squeeze, _aten("reshape"), _aten("view"), _aten("_unsafe_view"), _aten("squeeze"),
    ),
    "repeat_interleave": (torch.repeat_interleave, _aten("repeat_interleave")),
    "getitem": (operator.getitem,),
    "sum": (torch.sum, _aten("sum")),
    "einsum": (torch.einsum, _aten("einsum")),
    "matmul": (operator.matmul, torch.matmul, torch.bmm, _aten("matmul"), _aten("bmm")),
    "select": (torch.select, _aten("select")),
    "flip": (torch.flip, _aten("flip")),
    "select_copy": (torch.select_copy, _aten("select_copy")),
    "contiguous": (_aten("contiguous"),),
    # the unrolled combine_mode="generic" scan
    "slice": (_aten("slice"),),
    "cat": (torch.cat, torch.concat, _aten("cat")),
    "stack": (torch.stack, _aten("stack")),
    "flatten": (torch.flatten, _aten("flatten")),
    "pad": (torch._C._nn.pad, torch.nn.functional.pad, _aten("pad"), _aten("constant_pad_nd")),
    "add_batch_dim": (
        _attr(torch, "_functorch.predispatch._add_batch_dim"), _attr(torch, "_C._functorch._add_batch_dim"),
    ),
    "remove_batch_dim": (
        _attr(torch, "_functorch.predispatch._remove_batch_dim"),
        _attr(torch, "_C._functorch._remove_batch_dim"),
    ),
    "vmap_marker": (
        _attr(torch, "_functorch.predispatch._vmap_increment_nesting"),
        _attr(torch, "_functorch.predispatch._vmap_decrement_nesting"),
        _attr(torch, "_functorch.predispatch.lazy_load_decompositions"),
        _attr(torch, "_C._functorch._vmap_increment_nesting"),
        _attr(torch, "_C._functorch._vmap_decrement_nesting"),
    ),
}.items():
    for _target in _targets:
        if _target is not None:
            _FUNCTIONS[_target] = _name

_METHODS = {
    "mul": "mul", "add": "add", "exp": "exp", "movedim": "movedim", "moveaxis": "movedim",
    "unsqueeze": "unsqueeze", "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
    "permute": "permute", "expand": "expand", "expand_as": "expand", "view": "reshape",
    "reshape": "reshape", "repeat_interleave": "repeat_interleave", "sum": "sum", "flip": "flip",
    "contiguous": "contiguous", "flatten": "flatten", "squeeze": "reshape", "matmul": "matmul", "bmm": "matmul",
    "select": "select",
    # dtype casts; which of them the pass sees through is decided by `_cast_kind`
    "to": "cast", "type": "cast", "type_as": "cast", "float": "cast", "double": "cast", "half": "cast",
    "bfloat16": "cast",
}

# Every op above but the vmap markers is pure: a user made of these with no live users of its own
# does not count.
_PURE = (set(_FUNCTIONS.values()) | set(_METHODS.values())) - {"vmap_marker"}
# Ops that only move, broadcast or convert values; `_view_axes` says how their axes map.
_VIEWS = {"getitem", "select", "unsqueeze", "transpose", "permute", "movedim", "expand", "reshape",
          "repeat_interleave", "contiguous", "cast"}


def _op(node: Any) -> Optional[str]:
    """The canonical name of a node's operation, or None if it is not one this pass knows."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op != "call_function":
        return None
    if _HOP is not None and node.target is _HOP:
        return "associative_scan"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def _named(node: Node) -> str:
    """A node for a decline reason: its name and what it calls."""
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_tensor_node(node: Any) -> bool:
    return isinstance(node, Node) and isinstance(_val(node), torch.Tensor)


def _shape(node: Node) -> tuple:
    return tuple(_val(node).shape)


def _norm_dim(dim: Any, rank: int) -> Optional[int]:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < max(rank, 1):
        return None
    return dim % rank if rank else 0


class _Liveness:
    """'Live' users: a pure user with no live users of its own (Dynamo leaves `select_copy` probes
    and the unused cumulative-decay movedim in the graph) does not count."""

    def __init__(self) -> None:
        self._dead: dict[Node, bool] = {}

    def dead(self, node: Node) -> bool:
        if node not in self._dead:
            self._dead[node] = False  # cycle guard (graphs are acyclic)
            self._dead[node] = (
                node.op in ("call_function", "call_method")
                and _op(node) in _PURE
                and all(self.dead(u) for u in node.users)
            )
        return self._dead[node]

    def users(self, node: Node) -> list[Node]:
        return [u for u in node.users if not self.dead(u)]


class _Decline(Exception):
    """Raised inside matching; becomes a `Declined` entry with the message as the reason."""


# ---------------------------------------------------------------------------------------------
# Abstract interpretation of the combine: is the scan exactly the inclusive affine scan?
# ---------------------------------------------------------------------------------------------
# An element is ("a", i, j): decays a_i*...*a_j; ("b", i, j): the recurrence's state over
# steps i..j started from zero; ("ab", i, j, k): a[j+1..k] * b[i..j]; ("pad",): padding.
# A value is ("seq", elements along the scan axis), ("stk", rows) after stack(dim=1), or
# ("bat", elements, level) inside a vmap over the scan axis (only elementwise mul/add apply there).


def _mul(x: tuple, y: tuple) -> tuple:
    for p, q in ((x, y), (y, x)):
        if p[0] == "a" and q[0] == "a" and p[2] + 1 == q[1]:
            return ("a", p[1], q[2])
        if p[0] == "a" and q[0] == "b" and q[2] + 1 == p[1]:
            return ("ab", q[1], q[2], p[2])
    raise _Decline(f"combine multiplies {_show(x)} by {_show(y)}, which the affine recurrence never does")


def _add(x: tuple, y: tuple) -> tuple:
    for p, q in ((x, y), (y, x)):
        if p[0] == "ab" and q[0] == "b" and (q[1], q[2]) == (p[2] + 1, p[3]):
            return ("b", p[1], p[3])
    raise _Decline(f"combine adds {_show(x)} and {_show(y)}, which the affine recurrence never does")


def _show(element: tuple) -> str:
    kind = element[0]
    if kind == "a":
        return f"decay[{element[1]}..{element[2]}]"
    if kind == "b":
        return f"drive[{element[1]}..{element[2]}]"
    if kind == "ab":
        return f"decay[{element[2] + 1}..{element[3]}]*drive[{element[1]}..{element[2]}]"
    return "padding"


def _seq(value: Any, node: Node, kind: str = "seq") -> tuple:
    if not (isinstance(value, tuple) and value[0] == kind):
        raise _Decline(f"{_named(node)} is applied to a value that is not a scan sequence")
    return value[1]


def _check_same_shape(node: Node, operands: list) -> None:
    out = _val(node)
    for operand in operands:
        v = _val(operand)
        if out is not None and v is not None and tuple(v.shape) != tuple(out.shape):
            raise _Decline(f"combine op {node.name} broadcasts {tuple(v.shape)} to {tuple(out.shape)}")


def _interpret(node: Node, env: dict[Node, Any]) -> Any:
    """Abstract value of one region node from its inputs' values (in `env`)."""
    name = _op(node)

    def value(arg: Any) -> Any:
        if not isinstance(arg, Node) or arg not in env:
            raise _Decline(f"{node.name} ({name}) reads {arg!r}, which is not part of the scan")
        return env[arg]

    if name in ("mul", "add"):
        if set(node.kwargs) - {"other"} or len(node.args) + len(node.kwargs) != 2:
            raise _Decline(f"combine op {node.name} has extra arguments {node.kwargs}")
        lhs, rhs = node.args[0], _arg(node, 1, "other")
        vx, vy = value(lhs), value(rhs)
        if vx[0] not in ("seq", "bat") or vx[0] != vy[0] or vx[2:] != vy[2:]:
            raise _Decline(f"{node.name} combines values from different vmap levels")
        x, y = vx[1], vy[1]
        _check_same_shape(node, [lhs, rhs])
        if len(x) != len(y):
            raise _Decline(f"{node.name} combines sequences of lengths {len(x)} and {len(y)}")
        combine = _mul if name == "mul" else _add
        return (vx[0], tuple(combine(p, q) for p, q in zip(x, y)), *vx[2:])
    if name == "slice":
        dim = _arg(node, 1, "dim", 0)
        start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
        if dim != 0 or not all(v is None or isinstance(v, int) for v in (start, end, step)):
            raise _Decline(f"{node.name} slices dim {dim} with ({start}, {end}, {step})")
        return ("seq", _seq(value(node.args[0]), node)[slice(start, end, step)])
    if name == "cat":
        tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if dim != 0 or not isinstance(tensors, (list, tuple)):
            raise _Decline(f"{node.name} concatenates along dim {dim}")
        return ("seq", tuple(e for t in tensors for e in _seq(value(t), node)))
    if name == "stack":
        tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if dim != 1 or not isinstance(tensors, (list, tuple)):
            raise _Decline(f"{node.name} stacks along dim {dim}")
        columns = [_seq(value(t), node) for t in tensors]
        if len({len(c) for c in columns}) != 1:
            raise _Decline(f"{node.name} stacks sequences of different lengths")
        return ("stk", tuple(zip(*columns)))
    if name == "flatten":
        x = value(node.args[0])
        if (_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)) != (0, 1) or x[0] != "stk":
            raise _Decline(f"{node.name} flattens something other than a (dim 0, dim 1) stack")
        return ("seq", tuple(e for row in x[1] for e in row))
    if name == "pad":
        pad = _arg(node, 1, "pad")
        mode, fill = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value")
        x = _seq(value(node.args[0]), node)
        rank = len(_shape(node))
        if (
            not isinstance(pad, (list, tuple)) or len(pad) != 2 * rank or any(pad[:-2])
            or mode != "constant" or fill not in (None, 0, 0.0)
        ):
            raise _Decline(f"{node.name} pads with {pad}, mode {mode!r}")
        return ("seq", (("pad",),) * pad[-2] + x + (("pad",),) * pad[-1])
    if name == "add_batch_dim":
        if _arg(node, 1, "batch_dim") != 0:
            raise _Decline(f"{node.name} vmaps over dim {_arg(node, 1, 'batch_dim')}, not the scan dim")
        return ("bat", _seq(value(node.args[0]), node), _arg(node, 2, "level"))
    if name == "remove_batch_dim":
        x = value(node.args[0])
        if _arg(node, 3, "out_dim") != 0 or x[0] != "bat" or x[2] != _arg(node, 1, "level"):
            raise _Decline(f"{node.name} does not put the vmapped scan dim back at 0")
        return ("seq", x[1])
    raise _Decline(f"{_named(node)} is not an operation of the affine scan")


def _leaf_inputs(n_leaves: int, roles: tuple[str, ...], length: int, offset: int = 0) -> list[tuple]:
    return [("seq", tuple((roles[i], t + offset, t + offset) for t in range(length))) for i in range(n_leaves)]


def _check_combine_graph(combine: torch.fx.GraphModule) -> int:
    """Index of the decay leaf if `combine` is exactly (a1*a2, a2*b1 + b2) (leaves in either order)."""
    placeholders = [n for n in combine.graph.nodes if n.op == "placeholder"]
    calls = [n for n in combine.graph.nodes if n.op not in ("placeholder", "output")]
    outputs = [n for n in combine.graph.nodes if n.op == "output"]
    # With dynamic shapes Dynamo lifts the symbolic sizes into the combine: unused extra inputs.
    extra = placeholders[4:]
    if any(p.users or isinstance(_val(p), torch.Tensor) for p in extra):
        raise _Decline("combine reads tensors or sizes besides its two pairs; the affine recurrence reads none")
    placeholders = placeholders[:4]
    if len(placeholders) != 4:
        raise _Decline(f"combine takes {len(placeholders)} tensors; the affine recurrence takes 2 + 2")
    if len(calls) != 3:
        raise _Decline(
            f"combine is not the affine recurrence (a1*a2, a2*b1 + b2): it has {len(calls)} operations "
            f"({', '.join(getattr(n.target, '__name__', str(n.target)) for n in calls)}), not exactly one mul "
            "of the decays and one mul + one add for the drive"
        )
    result = outputs[0].args[0]
    while isinstance(result, (list, tuple)) and len(result) == 1 and isinstance(result[0], (list, tuple)):
        result = result[0]
    if not isinstance(result, (list, tuple)) or len(result) != 2:
        raise _Decline(f"combine returns {result!r}, not a pair")
    last: Optional[_Decline] = None
    for decay_index in (0, 1):
        roles = ("a", "b") if decay_index == 0 else ("b", "a")
        left, right = _leaf_inputs(2, roles, 1, 0), _leaf_inputs(2, roles, 1, 1)
        env: dict[Node, Any] = dict(zip(placeholders, left + right))
        try:
            for n in calls:
                env[n] = _interpret(n, env)
            got = [env.get(r) if isinstance(r, Node) else None for r in result]
            want = [("seq", ((roles[i], 0, 1),)) for i in range(2)]
            if got != want:
                raise _Decline(f"combine returns {got}, not (decay[0..1], drive[0..1])")
            return decay_index
        except _Decline as exc:
            last = exc
    raise _Decline(f"combine is not the affine recurrence (a1*a2, a2*b1 + b2): {last}")


# ---------------------------------------------------------------------------------------------
# The scan core: where the two scanned tensors come from and where h goes.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Core:
    form: str  # "hop" or "unrolled"
    anchor: Node  # carries nn_module_stack / stack_trace for the new nodes
    scan_dim: int
    decay: Node  # the leaves as the user built them (before the frontend's movedim)
    drive: Node
    h: Node  # the frontend's movedim back for the drive leaf: h in the user's layout
    erase: list[Node] = field(default_factory=list)  # core nodes (dead once y is rewired)
    markers: list[Node] = field(default_factory=list)  # vmap nesting markers of the unrolled form


def _movedim_args(node: Any) -> Optional[tuple[Node, int, int]]:
    if _op(node) != "movedim" or not _is_tensor_node(node.args[0]):
        return None
    rank = len(_shape(node))
    src, dst = _norm_dim(_arg(node, 1, "source"), rank), _norm_dim(_arg(node, 2, "destination"), rank)
    if src is None or dst is None:
        return None
    return node.args[0], src, dst


def _sources(xs: list[Node]) -> tuple[list[Node], int]:
    """The user's leaves and the scan dim from the frontend's `movedim(leaf, dim, 0)` nodes."""
    leaves, dims = [], set()
    for x in xs:
        if _op(x) == "flip":
            raise _Decline("the scan is reversed (reverse=True); selective_scan only scans forward")
        moved = _movedim_args(x)
        if moved is None or moved[2] != 0:
            raise _Decline(f"scan input {x.name} is not the frontend's movedim(leaf, dim, 0)")
        leaves.append(moved[0])
        dims.add(moved[1])
    if len(dims) != 1:
        raise _Decline(f"scan leaves are moved from different dims {sorted(dims)}")
    return leaves, dims.pop()


def _hop_core(gm: torch.fx.GraphModule, node: Node, live: _Liveness) -> _Core:
    if len(node.args) != 3 or node.kwargs:
        raise _Decline(f"unrecognised associative_scan signature args={node.args} kwargs={node.kwargs}")
    combine_attr, xs, additional = node.args
    if not (isinstance(combine_attr, Node) and combine_attr.op == "get_attr"):
        raise _Decline(f"combine {combine_attr!r} is not a subgraph attribute")
    try:
        combine = gm.get_submodule(combine_attr.target)
    except AttributeError:
        combine = getattr(gm, combine_attr.target, None)
    if not isinstance(combine, torch.fx.GraphModule):
        raise _Decline(f"combine attribute {combine_attr.target} is not a GraphModule")
    if not isinstance(xs, (list, tuple)) or not all(_is_tensor_node(x) for x in xs):
        raise _Decline(f"scanned tensors {xs!r} are not a list of tensors")
    if len(xs) != 2:
        raise _Decline(f"scans {len(xs)} tensors; the selective-scan pattern scans exactly 2 (decay, drive)")
    if not isinstance(additional, (list, tuple)) or any(
        not isinstance(a, (Node, int)) or _is_tensor_node(a) for a in additional
    ):
        raise _Decline("combine closes over tensors (additional_inputs); the affine recurrence needs none")
    decay_index = _check_combine_graph(combine)
    leaves, scan_dim = _sources(list(xs))
    for x in xs:
        if any(u is not node for u in live.users(x)):
            raise _Decline(f"scan input {x.name} has other consumers")
    outs: dict[int, list[Node]] = {0: [], 1: []}
    for user in live.users(node):
        index = user.args[1] if _op(user) == "getitem" else None
        if index not in (0, 1):
            raise _Decline(f"associative_scan result is used by {_named(user)}")
        outs[index].append(user)
    if outs[decay_index]:
        raise _Decline("the cumulative decay (first scan output) is used; selective_scan does not return it")
    if len(outs[1 - decay_index]) != 1:
        raise _Decline("the scanned state h is not read (or read twice) from the associative_scan result")
    (h_item,) = outs[1 - decay_index]
    h_users = live.users(h_item)
    moved = _movedim_args(h_users[0]) if len(h_users) == 1 else None
    if moved is None or moved[1:] != (0, scan_dim):
        raise _Decline(f"h ({h_item.name}) is not moved back to dim {scan_dim} by the frontend's movedim only")
    erase = [combine_attr, node, *list(node.users), *list(xs)]
    return _Core("hop", node, scan_dim, leaves[decay_index], leaves[1 - decay_index], h_users[0], erase)


_REGION = {"slice", "cat", "stack", "flatten", "pad", "add_batch_dim", "remove_batch_dim", "mul", "add"}


def _unrolled_region(out: Node, scan_dim: int) -> tuple[set[Node], set[Node], list[Node]]:
    """Nodes between `out` and the frontend's `movedim(leaf, scan_dim, 0)` sources (walking back)."""
    region: set[Node] = set()
    sources: set[Node] = set()
    unsupported: list[Node] = []
    stack = [out]
    while stack:
        n = stack.pop()
        if n in region or n in sources:
            continue
        moved = _movedim_args(n)
        if moved is not None and moved[1:] == (scan_dim, 0):
            sources.add(n)
        elif _op(n) in _REGION:
            region.add(n)
            stack.extend(a for a in n.all_input_nodes)
        else:
            unsupported.append(n)
    return region, sources, unsupported


def _unrolled_cores(gm: torch.fx.GraphModule, live: _Liveness) -> list[Union[_Core, "Declined"]]:
    """Scans written with combine_mode="generic", which Dynamo unrolls (no associative_scan node)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # One associative_scan call is one contiguous stretch of the graph: candidates whose regions
    # overlap in graph order (or share a source) are the outputs of the same call.
    groups: list[dict] = []
    for node in gm.graph.nodes:
        moved = _movedim_args(node)
        if moved is None or moved[1] != 0:
            continue
        inner, flipped = moved[0], False
        if _op(inner) == "flip" and _op(inner.args[0]) in _REGION:
            inner, flipped = inner.args[0], True
        if _op(inner) not in _REGION:
            continue
        region, sources, unsupported = _unrolled_region(inner, moved[2])
        if not any(_op(n) == "add_batch_dim" for n in region):
            continue  # no vmapped combine: not the generic associative_scan
        span = (min(order[n] for n in region), max(order[n] for n in region))
        group = {"outs": [node], "region": region, "sources": sources, "unsupported": unsupported,
                 "dims": {moved[2]}, "span": span, "flipped": flipped}
        for other in [
            g for g in groups
            if g["sources"] & sources or (g["span"][0] <= span[1] and span[0] <= g["span"][1])
        ]:
            groups.remove(other)
            for key in ("outs", "unsupported"):
                group[key] = other[key] + group[key]
            for key in ("region", "sources", "dims"):
                group[key] = other[key] | group[key]
            group["span"] = (min(span[0], other["span"][0]), max(span[1], other["span"][1]))
            group["flipped"] = group["flipped"] or other["flipped"]
        groups.append(group)
    results: list[Union[_Core, Declined]] = []
    for group in groups:
        outs, sources = group["outs"], group["sources"]
        group["dim"] = next(iter(group["dims"])) if len(group["dims"]) == 1 else None
        anchor = max(outs, key=order.__getitem__)
        try:
            if group["flipped"]:
                raise _Decline("the scan is reversed (reverse=True); selective_scan only scans forward")
            if group["unsupported"]:
                n = group["unsupported"][0]
                if isinstance(_val(n), (int, torch.SymInt)):
                    raise _Decline(
                        f"unrolled associative_scan computes with sizes ({n.name}): with dynamic shapes the "
                        "generic scan is traced size-dependently; compile with static shapes to rewrite it"
                    )
                raise _Decline(f"unrolled associative_scan reads {_named(n)}, not an op of the affine scan")
            if group["dim"] is None:
                raise _Decline(f"unrolled associative_scan outputs are moved back to dims {sorted(group['dims'])}")
            if len(sources) != 2:
                raise _Decline(
                    f"unrolled associative_scan scans {len(sources)} tensor(s) or each output depends on one "
                    "of them; the affine recurrence (a1*a2, a2*b1 + b2) scans a decay and a drive together"
                )
            results.append(_unrolled_core(gm, live, sorted(sources, key=order.__getitem__), group, order))
        except _Decline as exc:
            results.append(Declined(anchor, "unrolled", _module_path(anchor), str(exc)))
    return results


def _unrolled_core(gm, live: _Liveness, sources: list[Node], group: dict, order: dict) -> _Core:
    outs, region, scan_dim = group["outs"], group["region"], group["dim"]
    shapes = [_shape(s) for s in sources]
    if any(len(shape) != len(shapes[0]) or any(x != y for x, y in zip(shape, shapes[0])) for shape in shapes):
        raise _Decline(f"scanned tensors have different shapes {shapes}")
    length = shapes[0][0]
    if not isinstance(length, int):
        raise _Decline("scan length is symbolic")
    ordered = sorted(region, key=order.__getitem__)
    failures: list[tuple[int, _Decline]] = []
    for roles in (("a", "b"), ("b", "a")):
        env: dict[Node, Any] = dict(zip(sources, _leaf_inputs(2, roles, length)))
        try:
            for n in ordered:
                env[n] = _interpret(n, env)
        except _Decline as exc:
            failures.append((len(env), exc))  # report the assignment that got furthest
            continue
        kinds = {}
        for out in outs:
            value = env[out.args[0]]
            for kind in ("a", "b"):
                if value == ("seq", tuple((kind, 0, t) for t in range(length))):
                    kinds[out] = kind
            if out not in kinds:
                raise _Decline(f"{out.name} is not the inclusive scan of either leaf")
        h_outs = [o for o in outs if kinds[o] == "b"]
        if len(h_outs) != 1:
            raise _Decline(f"the scanned state h is moved back {len(h_outs)} times")
        if any(live.users(o) for o in outs if kinds[o] == "a"):
            raise _Decline("the cumulative decay (first scan output) is used; selective_scan does not return it")
        allowed = region | set(outs)
        for n in list(region) + list(sources):
            bad = [u for u in live.users(n) if u not in allowed]
            if bad:
                raise _Decline(f"scan intermediate {n.name} is also used by {bad[0].name} ({bad[0].target})")
        first = min(order[n] for n in region)
        last_index = max(order[n] for n in region)
        markers = [
            n for n in gm.graph.nodes
            if first <= order[n] <= last_index and _op(n) == "vmap_marker" and not n.users
        ]
        pushes = sum("increment" in getattr(n.target, "__name__", "") for n in markers)
        pops = sum("decrement" in getattr(n.target, "__name__", "") for n in markers)
        if pushes != pops:
            raise _Decline(f"the unrolled scan enters {pushes} vmap levels but leaves {pops}")
        decay = sources[roles.index("a")]
        drive = sources[roles.index("b")]
        erase = [*ordered, *outs, *sources]
        return _Core("unrolled", h_outs[0], scan_dim, decay.args[0], drive.args[0], h_outs[0], erase, markers)
    furthest = max(failures, key=lambda f: f[0])[1]
    raise _Decline(f"the unrolled scan is not the affine recurrence (a1*a2, a2*b1 + b2): {furthest}")


# ---------------------------------------------------------------------------------------------
# Prologue and epilogue: products of broadcast views, each axis labelled with a logical axis id.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rep:
    """An axis that `repeat_interleave(repeats)` spreads over the axis `axis` (groups -> channels)."""

    axis: Any
    repeats: int


@dataclass
class _Tree:
    node: Node
    axes: tuple  # per axis of node: an axis id, None (size-1 broadcast) or _Rep
    children: tuple = ()
    kind: str = "leaf"  # "leaf", "mul" or "view"

    def leaves(self) -> list["_Tree"]:
        if self.kind == "leaf":
            return [self]
        return [leaf for child in self.children for leaf in child.leaves()]

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def _leaf_key(tree: _Tree) -> tuple:
    return (tree.node, tree.axes)


def _broadcast_axes(operand: Node, out_shape: tuple, axes: tuple) -> Optional[tuple]:
    shape = _shape(operand)
    offset = len(out_shape) - len(shape)
    if offset < 0:
        return None
    result = []
    for i, size in enumerate(shape):
        out_size = out_shape[offset + i]
        if size == out_size:
            result.append(axes[offset + i])
        elif size == 1:
            result.append(None)
        else:
            return None
    return tuple(result)


_LAST = "last step"  # marks the axis a last-step read (`h[..., -1, ...]`) indexes away

_WIDENING = {
    (torch.float16, torch.float32), (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64), (torch.float32, torch.float64),
}


def _preserves_values(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every `src` value is exactly a `dst` value (float16 and bfloat16 are incomparable)."""
    return src == dst or (src, dst) in _WIDENING


def _cast_kind(node: Node) -> Optional[str]:
    """"exact" for a float -> float cast that keeps every value (a widening cast or a no-op), "rounds"
    for a narrowing float cast; None for anything else (a device move, a non-float dtype)."""
    x, out = _val(node.args[0]) if node.args else None, _val(node)
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if x.device != out.device or x.shape != out.shape or not (x.is_floating_point() and out.is_floating_point()):
        return None
    return "exact" if _preserves_values(x.dtype, out.dtype) else "rounds"


def _is_last(index: Any, size: Any) -> bool:
    return not isinstance(index, bool) and isinstance(index, int) and (index == -1 or index == size - 1)


def _index_axes(node: Node, axes: tuple) -> Optional[tuple]:
    """Input axes of `x[idx]` where idx holds None, full slices, one Ellipsis and ints that pick
    the last step of an axis (that input axis becomes `_LAST`)."""
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    in_shape = _shape(node.args[0])
    if sum(i is Ellipsis for i in idx) > 1:
        return None
    consumed = sum(i is not None and i is not Ellipsis for i in idx)
    items: list = []
    for i in (*idx, *(() if Ellipsis in idx else (Ellipsis,))):
        items.extend([slice(None)] * (len(in_shape) - consumed) if i is Ellipsis else [i])
    result, out = [], list(axes)
    for i in items:
        if i is None:  # a new size-1 output axis: nothing in the input
            if not out:
                return None
            out.pop(0)
        elif isinstance(i, slice) and (i.start, i.stop, i.step) == (None,) * 3 and out:
            result.append(out.pop(0))
        elif len(result) < len(in_shape) and _is_last(i, in_shape[len(result)]):
            result.append(_LAST)
        else:
            return None
    return tuple(result) if len(result) == len(in_shape) and not out else None


def _view_axes(node: Node, name: str, axes: tuple) -> Optional[tuple]:
    """Axes of a view's input, given the axes of its output (None if the view is not understood)."""
    x = node.args[0] if node.args else None
    if not _is_tensor_node(x) or not _is_tensor_node(node):
        return None
    if name == "cast":
        return axes if _cast_kind(node) is not None else None
    if _val(node).dtype != _val(x).dtype:  # e.g. x.view(torch.int32) reinterprets bits
        return None
    in_shape, out_shape = _shape(x), _shape(node)
    rank = len(out_shape)
    if name == "contiguous":
        return axes if len(node.args) == 1 and not node.kwargs else None
    if name == "getitem":
        return _index_axes(node, axes)
    if name == "select":
        d = _norm_dim(_arg(node, 1, "dim"), len(in_shape))
        if d is None or not _is_last(_arg(node, 2, "index"), in_shape[d]):
            return None
        return axes[:d] + (_LAST,) + axes[d:]
    if name == "unsqueeze":
        d = _norm_dim(_arg(node, 1, "dim"), rank)
        return None if d is None else axes[:d] + axes[d + 1:]
    if name == "transpose":
        d0, d1 = _norm_dim(_arg(node, 1, "dim0"), rank), _norm_dim(_arg(node, 2, "dim1"), rank)
        if d0 is None or d1 is None:
            return None
        result = list(axes)
        result[d0], result[d1] = axes[d1], axes[d0]
        return tuple(result)
    if name in ("permute", "movedim"):
        perm = list(range(rank))
        if name == "permute":
            dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
            dims = [_norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            if sorted(d for d in dims if d is not None) != perm:
                return None
            perm = dims
        else:
            src, dst = _norm_dim(_arg(node, 1, "source"), rank), _norm_dim(_arg(node, 2, "destination"), rank)
            if src is None or dst is None:
                return None
            perm.insert(dst, perm.pop(src))
        result = [None] * rank
        for out_axis, in_axis in enumerate(perm):
            result[in_axis] = axes[out_axis]
        return tuple(result)
    if name == "expand":
        return _broadcast_axes(x, out_shape, axes)
    if name == "reshape":  # only adding or dropping size-1 axes (squeeze, unsqueeze-like views)
        result, i, j = [], 0, 0
        while i < len(in_shape) or j < rank:
            if i < len(in_shape) and j < rank and in_shape[i] == out_shape[j]:
                result.append(axes[j])
                i, j = i + 1, j + 1
            elif i < len(in_shape) and in_shape[i] == 1:
                result.append(None)
                i += 1
            elif j < rank and out_shape[j] == 1:
                j += 1
            else:
                return None
        return tuple(result)
    if name == "repeat_interleave":
        repeats, dim = _arg(node, 1, "repeats"), _norm_dim(_arg(node, 2, "dim"), rank)
        if isinstance(repeats, Node) and isinstance(_val(repeats), torch.SymInt):
            repeats = _val(repeats)  # a symbolic count (dynamic shapes)
        elif not isinstance(repeats, int) or isinstance(repeats, bool):
            return None
        if dim is None or axes[dim] is None or isinstance(axes[dim], _Rep):
            return None
        if in_shape[dim] * repeats != out_shape[dim]:
            return None
        return axes[:dim] + (_Rep(axes[dim], repeats),) + axes[dim + 1:]
    return None


_Parts = tuple[list[str], str, list[Node]]  # einsum form: operand label strings, output labels, operands


def _einsum_parts(node: Node) -> Optional[_Parts]:
    """An explicit-output einsum without ellipsis or repeated labels within one operand; None for
    anything else."""
    equation = node.args[0] if node.args else None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or node.kwargs or not all(_is_tensor_node(o) for o in operands):
        return None
    m = re.fullmatch(r"([a-zA-Z,]+)->([a-zA-Z]*)", equation.replace(" ", ""))
    if m is None:
        return None
    specs, out = m.group(1).split(","), m.group(2)
    if len(specs) != len(operands) or any(len(set(x)) != len(x) for x in (*specs, out)):
        return None
    if any(len(spec) != len(_shape(o)) for spec, o in zip(specs, operands)):
        return None
    return specs, out, operands


def _matmul_parts(node: Node) -> Optional[_Parts]:
    """`x @ w` (matmul, bmm) as an einsum: batch axes broadcast from the right, "ik,kj->ij"."""
    if len(node.args) != 2 or node.kwargs or not all(_is_tensor_node(a) for a in node.args):
        return None
    x, w = node.args
    rx, rw = len(_shape(x)), len(_shape(w))
    if min(rx, rw) < 1 or max(rx, rw) > 2 + 8:
        return None
    batch = "ABCDEFGH"[: max(rx, rw, 2) - 2]
    x_spec = "k" if rx == 1 else batch[len(batch) - (rx - 2):] + "ik"
    w_spec = "k" if rw == 1 else batch[len(batch) - (rw - 2):] + "kj"
    out = batch[len(batch) - max(rx - 2, rw - 2, 0):] + ("i" if rx > 1 else "") + ("j" if rw > 1 else "")
    return [x_spec, w_spec], out, [x, w]


def _sum_parts(node: Node) -> _Parts:
    """`x.sum(dim)` as an einsum over one operand (keepdim / dtype are declined)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not _is_tensor_node(x):
        raise _Decline(f"{node.name} sums a non-tensor")
    dims = _arg(node, 1, "dim")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dim", "input")}
    if len(node.args) > 2 or any(v not in (None, False) for v in extra.values()):
        raise _Decline(f"{node.name} sums with keepdim/dtype ({node.args[2:]}, {extra})")
    spec = "abcdefgh"[: len(_shape(x))]
    reduced = {_norm_dim(d, len(spec)) for d in dims}
    if len(spec) != len(_shape(x)) or None in reduced:
        raise _Decline(f"{node.name} sums over {dims}; the contraction sums over the state axis N only")
    return [spec], "".join(lab for i, lab in enumerate(spec) if i not in reduced), [x]


def _label_sizes(specs: list[str], operands: list[Node]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for spec, operand in zip(specs, operands):
        for label, size in zip(spec, _shape(operand)):
            if size != 1:
                sizes[label] = size
    return sizes


def _operand_axes(parts: _Parts, axes_of: Any) -> list[tuple]:
    """Per operand, the axis id of each axis (`axes_of(label)`), None where a size-1 axis is
    broadcast against a longer one."""
    specs, _, operands = parts
    sizes = _label_sizes(specs, operands)
    return [
        tuple(None if size == 1 and sizes.get(label, 1) != 1 else axes_of(label) for label, size in zip(spec, _shape(o)))
        for spec, o in zip(specs, operands)
    ]


def _factor_tree(node: Node, axes: tuple, stop: Optional[Node] = None, through: frozenset = frozenset()) -> _Tree:
    """Split `node` into a product of broadcast views; unknown operations (and `stop`) are leaves.

    Casts that keep every value are seen through (selective_scan converts each argument to its
    compute dtype itself); a rounding cast only when it is in `through` (h's casts before C)."""
    name = _op(node)
    if node is stop:
        pass
    elif name == "mul" and not node.kwargs and len(node.args) == 2 and all(_is_tensor_node(a) for a in node.args):
        child_axes = [_broadcast_axes(a, _shape(node), axes) for a in node.args]
        if all(c is not None for c in child_axes):
            children = tuple(_factor_tree(a, c, stop, through) for a, c in zip(node.args, child_axes))
            return _Tree(node, axes, children, "mul")
    elif name == "einsum" and (parts := _einsum_parts(node)) is not None and all(
        set(spec) <= set(parts[1]) for spec in parts[0]
    ):  # an einsum that sums nothing is a broadcast product, e.g. einsum("bdl,dn->bdln", dt, A)
        child_axes = _operand_axes(parts, lambda label: axes[parts[1].index(label)])
        children = tuple(_factor_tree(o, c, stop, through) for o, c in zip(parts[2], child_axes))
        return _Tree(node, axes, children, "mul")
    elif name in _VIEWS and (name != "cast" or _cast_kind(node) == "exact" or node in through):
        in_axes = _view_axes(node, name, axes)
        if in_axes is not None and _LAST not in in_axes:
            return _Tree(node, axes, (_factor_tree(node.args[0], in_axes, stop, through),), "view")
    return _Tree(node, axes)


def _coverage(axes: tuple) -> list:
    return [a.axis if isinstance(a, _Rep) else a for a in axes if a is not None]


def _subtree(tree: _Tree, wanted: list[_Tree], role: str) -> _Tree:
    """The deepest node of `tree` whose leaves are exactly `wanted` (as a multiset)."""
    want = sorted(map(id, wanted))
    best = None
    for sub in tree.walk():
        if sorted(map(id, sub.leaves())) == want:
            best = sub  # walk() is pre-order: later hits are deeper
    if best is None:
        names = ", ".join(leaf.node.name for leaf in wanted)
        raise _Decline(f"{role} ({names}) is not one tensor of the product (multiply it out first)")
    return best


def _multiset_remove(leaves: list[_Tree], remove: list[_Tree], what: str) -> list[_Tree]:
    rest = list(leaves)
    for r in remove:
        hit = next((i for i, x in enumerate(rest) if _leaf_key(x) == _leaf_key(r)), None)
        if hit is None:
            raise _Decline(f"the drive does not use the decay's dt ({r.node.name}) in the same layout ({what})")
        del rest[hit]
    return rest


# ---------------------------------------------------------------------------------------------
# Layouts (the steps that put a value where a consumer wants it) and the match record
# ---------------------------------------------------------------------------------------------

_STEP_FUNCTIONS = {"squeeze": torch.squeeze, "permute": torch.permute, "unsqueeze": torch.unsqueeze}


@dataclass
class _Layout:
    """`base` after `steps`, applied in order: ("squeeze", dims), ("permute", perm),
    ("unsqueeze", dim) or ("to", dtype)."""

    base: Optional[Node]  # None for an output of the op
    steps: tuple = ()
    fakes: list = field(default_factory=list)  # the fake value after each step


def _run_steps(value: torch.Tensor, steps: tuple) -> list:
    fakes = []
    for kind, arg in steps:
        value = value.to(arg) if kind == "to" else _STEP_FUNCTIONS[kind](value, arg)
        fakes.append(value)
    return fakes


def _layout(role: str, tree: _Tree, keys: tuple, ids: dict) -> _Layout:
    """Steps from the tensor at `tree` to the op's layout `keys` for that argument."""
    axes = tree.axes
    squeeze = tuple(i for i, a in enumerate(axes) if a is None)
    kept = [a for a in axes if a is not None]
    if sorted(map(repr, kept)) != sorted(map(repr, keys)):
        names = {v: k for k, v in ids.items()}
        shown = [names.get(a, a) if not isinstance(a, _Rep) else f"groups of {names.get(a.axis)}" for a in axes]
        raise _Decline(f"{role} ({tree.node.name}) has axes {shown}; expected {role} to cover exactly "
                       f"{[names.get(k, 'groups') if not isinstance(k, _Rep) else 'groups' for k in keys]}")
    perm = tuple(kept.index(k) for k in keys)
    steps = (("squeeze", squeeze),) if squeeze else ()
    return _Layout(tree.node, steps + ((("permute", perm),) if perm != tuple(range(len(perm))) else ()))


def _output_layout(have: tuple, want: tuple, dtype: torch.dtype, want_dtype: torch.dtype) -> _Layout:
    """Steps from an op output with axes `have` to the layout of the node it replaces: `want` names
    each of its axes (None: a size-1 axis) and must hold each of `have` once (checked by callers)."""
    kept = [a for a in want if a is not None]
    perm = tuple(have.index(a) for a in kept)
    steps = [] if perm == tuple(range(len(perm))) else [("permute", perm)]
    steps += [("unsqueeze", i) for i, a in enumerate(want) if a is None]
    return _Layout(None, tuple(steps) + ((("to", want_dtype),) if dtype != want_dtype else ()))


def _projection(role: str, tree: _Tree, ids: dict, dim: Any) -> tuple[str, _Layout]:
    b, c, n, t = ids["batch"], ids["dim"], ids["N"], ids["L"]
    cover = _coverage(tree.axes)
    reps = [a for a in tree.axes if isinstance(a, _Rep)]

    def covers(*wanted) -> bool:
        return sorted(map(repr, cover)) == sorted(map(repr, wanted))

    if covers(b, n, t) and not reps:
        return "shared", _layout(role, tree, (b, n, t), ids)
    if covers(b, c, n, t) and len(reps) == 1 and reps[0].axis == c:
        return "grouped", _layout(role, tree, (b, reps[0], n, t), ids)
    if covers(b, c, n, t) and not reps:
        if dim == 1:
            return "grouped", _layout(role, tree, (b, c, n, t), ids)
        raise _Decline(
            f"{role} ({tree.node.name}) varies per channel (batch, dim, N, L) and is not a repeat_interleave of "
            f"a grouped (batch, G, N, L) tensor; selective_scan takes B/C shared, grouped or fixed"
        )
    if covers(c, n) and not reps:
        return "fixed", _layout(role, tree, (c, n), ids)
    names = {v: k for k, v in ids.items()}
    raise _Decline(
        f"{role} ({tree.node.name}) covers axes {[names.get(a) for a in cover]}; expected (batch, N, L), "
        "(batch, groups repeat_interleaved to dim, N, L) or (dim, N)"
    )


@dataclass
class Match:
    """A scan that `lower_associative_scan` replaces (see the module docstring)."""

    node: Node  # the associative_scan node ("hop") or the movedim producing h ("unrolled")
    form: str
    module_path: str
    b_form: str
    c_form: str
    contraction: Node = field(repr=False)  # the node producing y, replaced by the op's output 0
    last_state: bool = False  # whether reads of h's last step are replaced by the op's output 1
    _core: _Core = field(repr=False, default=None)
    _args: dict = field(repr=False, default_factory=dict)  # role -> _Layout
    _outputs: list = field(repr=False, default_factory=list)  # (replaced node, op output index, _Layout)
    _op_fakes: tuple = field(repr=False, default=())
    _prologue: list = field(repr=False, default_factory=list)

    @property
    def reason(self) -> str:
        state = ", last state" if self.last_state else ""
        return f"selective scan (B {self.b_form}, C {self.c_form}{state}) -> vmeanba.selective_scan"


@dataclass
class Declined:
    """A scan the pass leaves alone, and why."""

    node: Node
    form: str
    module_path: str
    reason: str


# ---------------------------------------------------------------------------------------------
# Matching (validation only: nothing here changes the graph)
# ---------------------------------------------------------------------------------------------


def _decay_roles(decay: Node, scan_dim: int) -> tuple[dict, _Tree, _Tree, list[_Tree], _Tree]:
    """Axis ids from the decay exp(dt (x) A): returns ids, exponent tree, dt subtree, dt leaves, A subtree."""
    if _op(decay) != "exp" or len(decay.args) != 1 or decay.kwargs:
        raise _Decline(f"the decay leaf ({decay.name}, {decay.target}) is not exp(dt * A)")
    rank = len(_shape(decay))
    if rank != 4:
        raise _Decline(f"the scanned tensors have {rank} dims; expected 4 (batch, dim, L, N in some order)")
    arg = decay.args[0]
    if not _is_tensor_node(arg) or _shape(arg) != _shape(decay):
        raise _Decline("exp's argument is not a tensor of the decay's shape")
    tree = _factor_tree(arg, tuple(range(4)))
    leaves = tree.leaves()
    if any(not _coverage(leaf.axes) or any(isinstance(a, _Rep) for a in leaf.axes) for leaf in leaves):
        raise _Decline("a factor of the decay's exponent is a constant or repeat_interleaved")
    if len(leaves) < 2:
        raise _Decline(f"the decay's exponent ({arg.name}) is not a product dt * A")
    solutions = []
    for n in set(range(4)) - {scan_dim}:
        a_leaves = [lf for lf in leaves if n in _coverage(lf.axes)]
        dt_leaves = [lf for lf in leaves if n not in _coverage(lf.axes)]
        a_cover = {x for lf in a_leaves for x in _coverage(lf.axes)}
        dt_cover = {x for lf in dt_leaves for x in _coverage(lf.axes)}
        if dt_cover == set(range(4)) - {n} and len(a_cover) == 2 and scan_dim not in a_cover:
            (c,) = a_cover - {n}
            (b,) = set(range(4)) - {n, c, scan_dim}
            solutions.append(({"batch": b, "dim": c, "L": scan_dim, "N": n}, a_leaves, dt_leaves))
    if len(solutions) != 1:
        raise _Decline(
            f"the decay's exponent ({arg.name}) is not dt (batch, dim, L) times A (dim, N) broadcast to the "
            f"scan layout with the scan along dim {scan_dim}"
        )
    ids, a_leaves, dt_leaves = solutions[0]
    return ids, tree, _subtree(tree, dt_leaves, "dt"), dt_leaves, _subtree(tree, a_leaves, "A")


def _ancestors_within(node: Node, within: set) -> set:
    seen, stack = set(), [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in within and arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


_CONTRACTIONS = {"sum": _sum_parts, "einsum": _einsum_parts, "matmul": _matmul_parts}


def _h_consumers(h: Node, live: _Liveness) -> tuple[Node, set, list[Node]]:
    """Walk h's live users: (the C contraction, the nodes between h and its ends, last-step reads)."""
    contractions: list[Node] = []
    readers: list[Node] = []
    between: set = set()
    stack = [h]
    while stack:
        for user in live.users(stack.pop()):
            name = _op(user)
            if user in between or user in readers or user in contractions:
                continue
            if name in _CONTRACTIONS:
                contractions.append(user)
            elif name in ("getitem", "select") and _LAST in (_view_axes(user, name, _shape_labels(user)) or ()):
                readers.append(user)
            elif name == "mul" or (name in _VIEWS and _view_axes(user, name, _shape_labels(user)) is not None):
                between.add(user)
                stack.append(user)
            else:
                raise _Decline(f"h is used by {_named(user)}, not by a C contraction or a read of its "
                               "last step; only the C contraction may read it")
    if len(contractions) != 1:
        names = ", ".join(c.name for c in contractions) or "none"
        raise _Decline(f"h ({h.name}) reaches {len(contractions)} contractions ({names}); only the C contraction "
                       "may read it")
    return contractions[0], between, readers


def _shape_labels(node: Node) -> tuple:
    return tuple(range(len(_shape(node)))) if _is_tensor_node(node) else ()


def _reader_axes(reader: Node, h: Node, between: set, ids: dict) -> tuple:
    """Scan ids of the axes of `reader` (a read of h's last time step; None: a size-1 axis),
    following views and casts back to h."""
    axes = _view_axes(reader, _op(reader), _shape_labels(reader))
    node = reader.args[0]
    while node is not h:
        name = _op(node)
        axes = _view_axes(node, name, axes) if node in between and name in _VIEWS else None
        if axes is None:
            raise _Decline(f"{reader.name} reads h's last step through {_named(node)}, which is not a "
                           "view or cast of h")
        node = node.args[0]
    if any(isinstance(a, _Rep) or a is None for a in axes) or axes[ids["L"]] is not _LAST:
        raise _Decline(f"{reader.name} reads the last step of an axis of h other than the time axis L, or "
                       "broadcasts or drops an axis of h")
    to_scan = {label: scan_id for scan_id, label in enumerate(axes) if label is not _LAST}
    return tuple(to_scan.get(label) for label in _shape_labels(reader))


def _split_h(trees: list[_Tree], h: Node, chain: set) -> tuple[dict, list[_Tree]]:
    """h's axes (contraction label -> scan id) and the other leaves of the contraction's operands."""
    leaves = [leaf for tree in trees for leaf in tree.leaves()]
    h_leaves = [leaf for leaf in leaves if leaf.node is h]
    if len(h_leaves) != 1:
        raise _Decline(f"the contraction reads h {len(h_leaves)} times (or through an unsupported op)")
    inner = {t.node for tree in trees for t in tree.walk() if t.kind != "leaf"}
    if any(n not in inner for n in chain):
        raise _Decline("h reaches the contraction through an operation that is not a broadcast view, cast or mul")
    (h_leaf,) = h_leaves
    if any(a is None or isinstance(a, _Rep) for a in h_leaf.axes) or len(set(h_leaf.axes)) != 4:
        raise _Decline("the contraction broadcasts h instead of using each of its axes once")
    to_scan = {x: scan_id for scan_id, x in enumerate(h_leaf.axes)}
    return to_scan, [leaf for leaf in leaves if leaf is not h_leaf]


def _translate(tree: _Tree, to_scan: dict) -> _Tree:
    """`tree` with contraction labels replaced by scan ids ("x" for a label that is not h's)."""

    def tr(a):
        if isinstance(a, _Rep):
            return _Rep(tr(a.axis), a.repeats)
        return None if a is None else to_scan.get(a, "x")

    children = tuple(_translate(c, to_scan) for c in tree.children)
    return _Tree(tree.node, tuple(map(tr, tree.axes)), children, tree.kind)


def _contraction(h: Node, node: Node, chain: set, ids: dict) -> tuple[_Tree, tuple, list[_Tree]]:
    """y = sum_n h*C at `node` (a sum of a product, an einsum or a matmul): C's tree in scan ids,
    the scan id of each axis of y (None: a size-1 axis that is not h's), the operand trees."""
    parts = _CONTRACTIONS[_op(node)](node)
    if parts is None:
        raise _Decline(f"{node.name} is not an einsum with explicit output labels or a matmul of two tensors")
    labels = sorted(set("".join(parts[0])) | set(parts[1]))
    axes = _operand_axes(parts, labels.index)
    trees = [_factor_tree(o, a, h, frozenset(chain)) for o, a in zip(parts[2], axes)]
    to_scan, c_leaves = _split_h(trees, h, chain)
    if not c_leaves:
        raise _Decline("the contraction sums h without multiplying by C")
    c_tree = next(_subtree(t, c_leaves, "C") for t in trees if any(leaf is c_leaves[0] for leaf in t.leaves()))
    y_axes = tuple(to_scan.get(labels.index(label)) for label in parts[1])
    kept = [a for a in y_axes if a is not None]
    if any(a is None and size != 1 for a, size in zip(y_axes, _shape(node))) or sorted(kept) != sorted(
        (ids["batch"], ids["dim"], ids["L"])
    ):
        raise _Decline(f"{node.name} does not sum exactly the state axis N of h (nor keep only h's other axes)")
    return _translate(c_tree, to_scan), y_axes, trees


@dataclass
class _Epilogue:
    contraction: Node
    c_tree: _Tree  # C's product tree, axes in scan ids
    y_axes: tuple  # the scan id of each axis of the contraction's output (None: size 1)
    trees: list  # the contraction's operand trees (their inner nodes may die with the scan)
    readers: list  # (node, scan ids of its axes): reads of h's last time step


def _epilogue(h: Node, live: _Liveness, ids: dict) -> _Epilogue:
    """Where h goes: one C contraction, and any number of reads of its last time step."""
    contraction, between, readers = _h_consumers(h, live)
    chain = _ancestors_within(contraction, between)
    c_tree, y_axes, trees = _contraction(h, contraction, chain, ids)
    return _Epilogue(contraction, c_tree, y_axes, trees, [(r, _reader_axes(r, h, between, ids)) for r in readers])


def _scan_dtype(core: _Core, layouts: dict, y_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype the scan runs in, the dtype the op will return y in); casts u and delta where the
    op needs it.

    selective_scan carries its states in float32 (float64 for float64 u), returns y in u's dtype and
    needs u and delta in one dtype. The original's states are the op's if the scan runs in that
    dtype and every argument converts to it exactly. u and delta are cast to the scan's dtype
    (exact) when they differ, or when y is wanted in another dtype than u's: y then leaves the op
    unrounded and is rounded once, to the contraction's dtype."""
    scan, drive = _val(core.decay).dtype, _val(core.drive).dtype
    if drive != scan or scan not in (torch.float32, torch.float64):
        raise _Decline(f"the scan runs in {scan} (decay) / {drive} (drive); selective_scan carries its states in "
                       "float32 (float64 for float64 inputs), so it would not compute the same states")
    for role, layout in layouts.items():
        dtype = _val(layout.base).dtype
        if not _preserves_values(dtype, scan):
            raise _Decline(f"{role} ({layout.base.name}) is {dtype} but the scan runs in {scan}; selective_scan "
                           f"would compute with {role} converted to {scan}")
    u, delta = _val(layouts["u"].base), _val(layouts["delta"].base)
    if u.dtype == delta.dtype == y_dtype and compute_dtype_for(u) == scan:
        return scan, u.dtype
    for role, value in (("u", u), ("delta", delta)):
        if value.dtype != scan:
            layouts[role].steps += (("to", scan),)
    return scan, scan


def _validate(core: _Core, live: _Liveness, order: dict) -> Match:
    ids, decay_tree, dt_tree, dt_leaves, a_tree = _decay_roles(core.decay, core.scan_dim)
    if _shape(core.drive) != _shape(core.decay):
        raise _Decline("decay and drive have different shapes")
    drive_tree = _factor_tree(core.drive, tuple(range(4)))
    rest = _multiset_remove(drive_tree.leaves(), dt_leaves, "dt")
    if any(not _coverage(leaf.axes) for leaf in rest):
        raise _Decline("the drive has a constant factor; selective_scan's drive is exactly dt * u * B")
    b_leaves = [leaf for leaf in rest if ids["N"] in _coverage(leaf.axes)]
    u_leaves = [leaf for leaf in rest if ids["N"] not in _coverage(leaf.axes)]
    if not b_leaves or not u_leaves:
        raise _Decline("the drive is not dt * u * B (no u or no B factor besides dt)")
    u_tree, b_tree = _subtree(drive_tree, u_leaves, "u"), _subtree(drive_tree, b_leaves, "B")
    epilogue = _epilogue(core.h, live, ids)
    channels = _shape(core.decay)[ids["dim"]]
    b, c, t, n = ids["batch"], ids["dim"], ids["L"], ids["N"]
    layouts = {
        "u": _layout("u", u_tree, (b, c, t), ids),
        "delta": _layout("dt", dt_tree, (b, c, t), ids),
        "A": _layout("A", a_tree, (c, n), ids),
    }
    b_form, layouts["B"] = _projection("B", b_tree, ids, channels)
    c_form, layouts["C"] = _projection("C", epilogue.c_tree, ids, channels)
    y_dtype = _val(epilogue.contraction).dtype
    scan_dtype, op_y_dtype = _scan_dtype(core, layouts, y_dtype)
    outputs = [(epilogue.contraction, 0, _output_layout((b, c, t), epilogue.y_axes, op_y_dtype, y_dtype))]
    outputs += [(r, 1, _output_layout((b, c, n), axes, scan_dtype, _val(r).dtype)) for r, axes in epilogue.readers]
    mode = _fake_mode([_val(layout.base) for layout in layouts.values()])
    try:
        with mode:
            for layout in layouts.values():
                layout.fakes = _run_steps(_val(layout.base), layout.steps)
            op_fakes = _SCAN_OP(*(_last_fake(layouts[r]) for r in _ROLES), None, None, None, False)
            for _, index, layout in outputs:
                layout.fakes = _run_steps(op_fakes[index], layout.steps)
    except Exception as exc:  # noqa: BLE001  (any failure here means: do not rewrite)
        raise _Decline(f"selective_scan rejects the matched arguments: {exc}") from exc
    for node, index, layout in outputs:
        got, expected = layout.fakes[-1] if layout.fakes else op_fakes[index], _val(node)
        if expected is None or tuple(expected.shape) != tuple(got.shape) or expected.dtype != got.dtype:
            raise _Decline(
                f"selective_scan would give {('y', 'the last state')[index]} {tuple(got.shape)} {got.dtype} but "
                f"{node.name} gives {None if expected is None else (tuple(expected.shape), expected.dtype)}"
            )
    first = min((node for node, _, _ in outputs), key=order.__getitem__)
    late = [layout.base for layout in layouts.values() if order[layout.base] > order[first]]
    if late:
        raise _Decline(f"{late[0].name} is computed after {first.name} reads h; selective_scan cannot replace both")
    # Nodes that may die with the scan (each is erased only if nothing else uses it).
    prologue = [core.decay, core.drive, epilogue.contraction]
    for tree in (decay_tree, drive_tree, *epilogue.trees):
        prologue += [t.node for t in tree.walk() if t.kind != "leaf"]
    return Match(
        core.anchor, core.form, _module_path(core.anchor), b_form, c_form, epilogue.contraction,
        bool(epilogue.readers), core, layouts, outputs, op_fakes, prologue,
    )


def _last_fake(layout: _Layout) -> torch.Tensor:
    return layout.fakes[-1] if layout.fakes else _val(layout.base)


def _fake_mode(values: list) -> Any:
    """The fake mode the example values were made in (the backend may run under another one)."""
    from torch._subclasses.fake_tensor import FakeTensor

    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    if len(modes) != 1 or len(values) != sum(isinstance(v, FakeTensor) for v in values):
        raise _Decline("the graph's nodes carry no (single) fake example values; run the pass on a Dynamo graph")
    return next(iter(modes.values()))


def match_associative_scans(gm: torch.fx.GraphModule) -> list[Union[Match, Declined]]:
    """Every associative_scan of the graph, matched or declined with a reason; changes nothing."""
    live = _Liveness()
    found: list[tuple[Node, str, Union[_Core, Declined]]] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if _op(node) == "associative_scan":
            try:
                found.append((node, "hop", _hop_core(gm, node, live)))
            except _Decline as exc:
                found.append((node, "hop", Declined(node, "hop", _module_path(node), str(exc))))
            except Exception as exc:  # noqa: BLE001
                log.warning("associative_scan %s: analysis failed, left alone: %r", node.name, exc)
                found.append((node, "hop", Declined(node, "hop", _module_path(node), f"analysis failed: {exc!r}")))
    try:
        unrolled = _unrolled_cores(gm, live)
    except Exception as exc:  # noqa: BLE001
        log.warning("unrolled associative_scan search failed, nothing of that form rewritten: %r", exc)
        unrolled = []
    for item in unrolled:
        found.append((item.anchor if isinstance(item, _Core) else item.node, "unrolled", item))
    results: list[Union[Match, Declined]] = []
    for node, form, item in found:
        if isinstance(item, Declined):
            results.append(item)
            continue
        try:
            results.append(_validate(item, live, order))
        except _Decline as exc:
            results.append(Declined(node, form, _module_path(node), str(exc)))
        except Exception as exc:  # noqa: BLE001  (an analysis failure must never break compilation)
            log.warning("associative_scan %s: analysis failed, left alone: %r", node.name, exc)
            results.append(Declined(node, form, _module_path(node), f"analysis failed: {exc!r}"))
    return sorted(results, key=lambda r: order[r.node])


# ---------------------------------------------------------------------------------------------
# Mutation
# ---------------------------------------------------------------------------------------------


def _copy_meta(new: Node, anchor: Node, fake: Any) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in anchor.meta:
            new.meta[key] = anchor.meta[key]
    keys = [k for k in ("example_value", "val") if k in anchor.meta] or ["example_value"]
    for key in keys:
        new.meta[key] = fake


def _emit(graph: torch.fx.Graph, node: Node, layout: _Layout, anchor: Node) -> Node:
    for (kind, arg), fake in zip(layout.steps, layout.fakes):
        if kind == "to":
            node = graph.call_method("to", (node, arg))
        else:
            node = graph.call_function(_STEP_FUNCTIONS[kind], (node, arg))
        _copy_meta(node, anchor, fake)
    return node


def _rewrite(gm: torch.fx.GraphModule, match: Match) -> Node:
    graph, anchor = gm.graph, match.node
    order = {n: i for i, n in enumerate(graph.nodes)}
    made: dict[tuple, Node] = {}
    outputs: dict[int, Node] = {}
    replacements = []
    with graph.inserting_before(min((node for node, _, _ in match._outputs), key=order.__getitem__)):
        for layout in match._args.values():
            if (layout.base, layout.steps) not in made:
                made[layout.base, layout.steps] = _emit(graph, layout.base, layout, anchor)
        args = [made[match._args[role].base, match._args[role].steps] for role in _ROLES]
        scan = graph.call_function(_SCAN_OP, (*args, None, None, None, False))
        _copy_meta(scan, anchor, match._op_fakes)
        for node, index, layout in match._outputs:
            if index not in outputs:
                outputs[index] = graph.call_function(operator.getitem, (scan, index))
                _copy_meta(outputs[index], anchor, match._op_fakes[index])
            replacements.append((node, _emit(graph, outputs[index], layout, anchor)))
    for node, value in replacements:
        node.replace_all_uses_with(value)
    core = match._core
    # The scan's own nodes and every pure node hanging off them (Dynamo's unused probes, the dead
    # cumulative-decay path), then the prologue/epilogue: erased users-first, only when unused.
    candidates = {*core.erase, core.h}
    frontier = list(candidates)
    while frontier:
        for user in frontier.pop().users:
            if user not in candidates and _op(user) in _PURE:
                candidates.add(user)
                frontier.append(user)
    candidates |= set(match._prologue)
    order = {n: i for i, n in enumerate(graph.nodes)}
    attrs = set()
    for node in sorted((n for n in candidates if n in order), key=order.__getitem__, reverse=True):
        if not node.users and node.op in ("call_function", "call_method", "get_attr"):
            if node.op == "get_attr":
                attrs.add(node.target)
            graph.erase_node(node)
    for marker in core.markers:
        graph.erase_node(marker)
    for target in attrs:
        if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
            try:
                gm.delete_submodule(target)
            except AttributeError:
                pass
    return scan


def lower_associative_scan(gm: torch.fx.GraphModule, config: object = None) -> torch.fx.GraphModule:
    """Replace each matched associative_scan selective scan by `vmeanba.selective_scan`.

    Every scan is validated before the first change; declined scans stay bit-for-bit as they were.
    """
    results = match_associative_scans(gm)
    for r in results:
        if isinstance(r, Declined):
            log.info("associative_scan %s (%s, module %r): declined: %s", r.node.name, r.form, r.module_path, r.reason)
        else:
            log.info("associative_scan %s (%s, module %r): %s", r.node.name, r.form, r.module_path, r.reason)
    matches = [r for r in results if isinstance(r, Match)]
    if not matches:
        return gm
    for match in matches:
        _rewrite(gm, match)
    finish_graph(gm)
    log.debug("graph after lower_associative_scan:\n%s", gm.graph)
    return gm
