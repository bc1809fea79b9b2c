"""The `vmeanba::selective_scan` op and its fast CPU kernel against the reference (docs/DESIGN.md s. 1).

The oracle is `selective_scan_reference` run in float64 on the same input values upcast, so it
does not share the float32 rounding of the implementation under test. Tolerances come from
`vmeanba_compiler.testing.TOLERANCES` only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pytest
import torch
import torch._inductor.config
from functorch.compile import make_boxed_func
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch._dynamo.backends.common import aot_autograd

import vmeanba_compiler
from vmeanba_compiler import selective_scan
from vmeanba_compiler.lowering import scan_cpu
from vmeanba_compiler.scan_schema import compute_dtype_for
from vmeanba_compiler.lowering.scan_reference import selective_scan_reference
from vmeanba_compiler.testing import ScanInputs, assert_scan_close, scan_inputs

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
FORMS = ("grouped", "shared", "fixed")
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCAN_OP = torch.ops.vmeanba.selective_scan
SCAN_BACKWARD_OP = torch.ops.vmeanba.selective_scan_backward

seeds = st.integers(0, 2**32 - 1)


def _oracle(x: ScanInputs) -> tuple[Tensor, Tensor]:
    """(y, last_state) of the reference in float64 on x's values."""
    return selective_scan_reference(*x.to(torch.float64).args())


def _output_grads(x: ScanInputs, seed: int, with_last_state: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Random upstream gradients for y (u's dtype) and, if asked, for last_state (math dtype)."""
    gen = torch.Generator().manual_seed(seed)
    batch, dim, _ = x.u.shape
    grad_y = torch.randn(x.u.shape, generator=gen, dtype=torch.float64).to(x.u.dtype)
    if not with_last_state:
        return grad_y, None
    grad_last = torch.randn(batch, dim, x.A.shape[1], generator=gen, dtype=torch.float64)
    return grad_y, grad_last.to(compute_dtype_for(x.u))


def _oracle_grads(x: ScanInputs, grad_y: Tensor, grad_last: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Autograd through the float64 reference; None where the argument is None."""
    x64 = x.to(torch.float64).args()[:-1]
    leaves = [None if t is None else t.detach().requires_grad_() for t in x64]
    y, last_state = selective_scan_reference(*leaves, delta_softplus=x.delta_softplus)
    outputs, grads_out = [y], [grad_y.double()]
    if grad_last is not None:
        outputs.append(last_state)
        grads_out.append(grad_last.double())
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outputs, present, grads_out))
    return [None if leaf is None else next(grads) for leaf in leaves]


def _small_inputs(
    b_form: str = "grouped", c_form: str = "grouped", softplus: bool = True, dtype=torch.float64, seed: int = 0
) -> ScanInputs:
    """batch 2, dim 4 (G = 2 groups of 2), N 3, L 6, every optional argument given."""
    gen = torch.Generator().manual_seed(seed)
    batch, dim, state, length, groups = 2, 4, 3, 6, 2

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def projection(form: str) -> Tensor:
        return {"grouped": lambda: randn(batch, groups, state, length),
                "shared": lambda: randn(batch, state, length),
                "fixed": lambda: randn(dim, state)}[form]()

    if softplus:
        delta, bias = 0.5 * randn(batch, dim, length), 0.5 * randn(dim)
    else:  # keep dt = delta + bias positive and moderate
        delta = 0.5 * torch.rand(batch, dim, length, generator=gen, dtype=torch.float64) + 0.01
        bias = 0.1 * torch.rand(dim, generator=gen, dtype=torch.float64)
    x = ScanInputs(
        u=randn(batch, dim, length), delta=delta, A=-torch.exp(0.5 * randn(dim, state)),
        B=projection(b_form), C=projection(c_form), D=randn(dim), z=randn(batch, dim, length),
        delta_bias=bias, delta_softplus=softplus, seed=seed,
    )
    return x.to(dtype)


# 0. The shared closeness check -----------------------------------------------------------------


def test_closeness_check_accepts_one_rounding_to_the_output_dtype() -> None:
    expected = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype in ALL_DTYPES:
        assert_scan_close(expected.to(dtype), expected, dtype)


def test_closeness_check_fails_on_nan_and_names_the_worst_element() -> None:
    expected = torch.ones(2, 3, dtype=torch.float64)
    actual = expected.float()
    actual[1, 2] = float("nan")
    with pytest.raises(AssertionError, match=r"(?s)y: 1 of 6 elements .*worst at \(1, 2\): actual nan"):
        assert_scan_close(actual, expected, torch.float32, "y")


# 1. Forward ------------------------------------------------------------------------------------


@given(x=scan_inputs())
def test_cpu_forward_matches_float64_reference(x: ScanInputs) -> None:
    y, last_state = scan_cpu.forward(*x.args())
    y_ref, last_ref = _oracle(x)
    assert_scan_close(y, y_ref, x.u.dtype, f"y of {x}")
    assert_scan_close(last_state, last_ref, compute_dtype_for(x.u), f"last_state of {x}")


@given(x=scan_inputs())
def test_registered_op_on_cpu_runs_the_fast_kernel(x: ScanInputs) -> None:
    y_op, last_op = SCAN_OP(*x.args())
    y_kernel, last_kernel = scan_cpu.forward(*x.args())
    assert torch.equal(y_op, y_kernel)
    assert torch.equal(last_op, last_kernel)


# 2. Backward -----------------------------------------------------------------------------------


@given(
    x=scan_inputs(dtypes=(torch.float32, torch.float64)),
    grad_seed=seeds,
    with_last_state=st.booleans(),
)
def test_cpu_backward_matches_autograd_through_float64_reference(
    x: ScanInputs, grad_seed: int, with_last_state: bool
) -> None:
    grad_y, grad_last = _output_grads(x, grad_seed, with_last_state)
    kernel_grads = scan_cpu.backward(grad_y, grad_last, *x.args())
    expected = _oracle_grads(x, grad_y, grad_last)
    for name, got, want, given_arg in zip(GRAD_NAMES, kernel_grads, expected, x.args()):
        if given_arg is None:
            assert got.numel() == 0, f"grad of absent {name} should be an empty placeholder"
            continue
        assert got.dtype == given_arg.dtype, f"grad of {name} has dtype {got.dtype}, not {given_arg.dtype}"
        assert_scan_close(got, want, x.u.dtype, f"grad of {name}, {x}")


@given(x=scan_inputs(dtypes=(torch.float32, torch.float64)), grad_seed=seeds, with_last_state=st.booleans())
def test_autograd_through_the_op_uses_the_cpu_backward_kernel(
    x: ScanInputs, grad_seed: int, with_last_state: bool
) -> None:
    grad_y, grad_last = _output_grads(x, grad_seed, with_last_state)
    leaves = [None if t is None else t.detach().requires_grad_() for t in x.args()[:-1]]
    y, last_state = selective_scan(*leaves, delta_softplus=x.delta_softplus, return_last_state=True)
    outputs, grads_out = [y], [grad_y]
    if grad_last is not None:
        outputs.append(last_state)
        grads_out.append(grad_last)
    present = [t for t in leaves if t is not None]
    op_grads = iter(torch.autograd.grad(outputs, present, grads_out))
    kernel_grads = scan_cpu.backward(grad_y, grad_last, *x.args())
    for name, leaf, kernel_grad in zip(GRAD_NAMES, leaves, kernel_grads):
        if leaf is not None:
            assert torch.equal(next(op_grads), kernel_grad), f"grad of {name}"


# 3. gradcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("softplus", [False, True], ids=["no_softplus", "softplus"])
@pytest.mark.parametrize("c_form", FORMS)
@pytest.mark.parametrize("b_form", FORMS)
def test_gradcheck_every_argument_and_last_state(b_form: str, c_form: str, softplus: bool) -> None:
    x = _small_inputs(b_form, c_form, softplus)
    tensors = tuple(t.requires_grad_() for t in x.args()[:-1])

    def scan(*args: Tensor) -> tuple[Tensor, Tensor]:
        return selective_scan(*args, delta_softplus=softplus, return_last_state=True)

    assert torch.autograd.gradcheck(scan, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_without_optional_arguments() -> None:
    # Regression: with D, z and delta_bias all None the CPU backward once returned one shared
    # zero-size placeholder for all three, which torch rejects as aliased custom-op outputs.
    x = _small_inputs("grouped", "fixed", softplus=False)
    tensors = tuple(t.requires_grad_() for t in (x.u, x.delta, x.A, x.B, x.C))
    assert torch.autograd.gradcheck(
        lambda *args: selective_scan(*args, return_last_state=True), tensors, eps=1e-6, atol=1e-7, rtol=1e-5
    )


# 4. Drop-in semantics --------------------------------------------------------------------------


def test_returns_a_tensor_by_default_and_a_tuple_with_return_last_state() -> None:
    x = _small_inputs(dtype=torch.float32)
    y = selective_scan(**x.kwargs())
    assert isinstance(y, Tensor)
    pair = selective_scan(**x.kwargs(), return_last_state=True)
    assert isinstance(pair, tuple) and len(pair) == 2
    assert torch.equal(pair[0], y)
    assert pair[1].shape == (2, 4, 3)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_output_has_u_dtype_and_shape_and_is_contiguous(dtype: torch.dtype) -> None:
    x = _small_inputs(dtype=dtype)
    y, last_state = selective_scan(**x.kwargs(), return_last_state=True)
    assert y.dtype == dtype
    assert y.shape == x.u.shape and y.is_contiguous()
    assert last_state.dtype == compute_dtype_for(x.u)  # math dtype: float32, or float64
    assert last_state.shape == (2, 4, 3) and last_state.is_contiguous()


def _noncontiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """Same values, non-contiguous strides: a transposed copy viewed back, or every other element."""
    if t is None:
        return None
    if t.dim() >= 2:
        out = t.mT.contiguous().mT
    else:
        out = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs_give_the_same_result_as_contiguous(form: str, dtype: torch.dtype) -> None:
    x = _small_inputs(form, form, dtype=dtype, seed=3)
    strided = ScanInputs(*(_noncontiguous(t) for t in x.args()[:-1]), x.delta_softplus)
    results = []
    for inputs in (x, strided):
        leaves = [t.detach().requires_grad_() for t in inputs.args()[:-1]]
        y, last_state = selective_scan(*leaves, delta_softplus=x.delta_softplus, return_last_state=True)
        assert y.is_contiguous() and y.shape == x.u.shape
        (y.float().square().sum() + last_state.float().sum()).backward()
        results.append([y, last_state, *(leaf.grad for leaf in leaves)])
    for name, a, b in zip(("y", "last_state", *GRAD_NAMES), *results):
        assert torch.equal(a, b), name


def test_expanded_shared_projection_gives_the_same_result_as_materialised() -> None:
    x = _small_inputs("shared", "shared", dtype=torch.float32)
    B_expanded = x.B[:1].expand_as(x.B)  # stride 0 over batch, as broadcasting code produces
    y_expanded = selective_scan(**{**x.kwargs(), "B": B_expanded})
    y_dense = selective_scan(**{**x.kwargs(), "B": B_expanded.contiguous()})
    assert torch.equal(y_expanded, y_dense)


# 5. Bad input ----------------------------------------------------------------------------------


def _bad(name: str, value) -> dict:
    x = _small_inputs(dtype=torch.float32)  # batch 2, dim 4, N 3, L 6
    return {**x.kwargs(), name: value(x)}


BAD_INPUTS = {
    "u_rank_2": (
        _bad("u", lambda x: x.u[0]), ValueError,
        r"'u' has shape \(4, 6\) but expected \(batch, dim, L\)",
    ),
    "delta_shape_differs_from_u": (
        _bad("delta", lambda x: x.delta[..., :5]), ValueError,
        r"'delta' has shape \(2, 4, 5\) but expected \(batch=2, dim=4, L=6\)",
    ),
    "A_wrong_rows": (
        _bad("A", lambda x: x.A[:3]), ValueError,
        r"'A' has shape \(3, 3\) but expected \(dim=4, N\)",
    ),
    "B_groups_do_not_divide_dim": (
        _bad("B", lambda x: torch.zeros(2, 3, 3, 6)), ValueError,
        r"'B' has shape \(2, 3, 3, 6\) but expected \(batch=2, G, N=3, L=6\) with dim=4 divisible by G",
    ),
    "C_wrong_state_size": (
        _bad("C", lambda x: torch.zeros(2, 2, 5, 6)), ValueError,
        r"'C' has shape \(2, 2, 5, 6\) but expected \(batch=2, G, N=3, L=6\)",
    ),
    "D_wrong_length": (
        _bad("D", lambda x: x.D[:3]), ValueError,
        r"'D' has shape \(3,\) but expected \(dim=4,\)",
    ),
    "delta_bias_wrong_length": (
        _bad("delta_bias", lambda x: torch.zeros(5)), ValueError,
        r"'delta_bias' has shape \(5,\) but expected \(dim=4,\)",
    ),
    "z_shape_differs_from_u": (
        _bad("z", lambda x: x.z[:1]), ValueError,
        r"'z' has shape \(1, 4, 6\) but expected \(batch=2, dim=4, L=6\)",
    ),
    "integer_u": (
        _bad("u", lambda x: torch.ones(2, 4, 6, dtype=torch.int64)), TypeError,
        r"'u' has dtype torch\.int64; expected one of float16, bfloat16, float32, float64",
    ),
    "integer_D": (
        _bad("D", lambda x: torch.ones(4, dtype=torch.int32)), TypeError,
        r"'D' has dtype torch\.int32; expected one of float16",
    ),
    "delta_dtype_differs_from_u": (
        _bad("delta", lambda x: x.delta.half()), TypeError,
        r"'delta' has dtype torch\.float16 but 'u' has torch\.float32",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_raises_naming_the_argument_and_the_expected_shape(case: str) -> None:
    kwargs, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        selective_scan(**kwargs)


# 6. Graph capture ------------------------------------------------------------------------------


def _block(u, delta, A, B, C, D, z, delta_bias):
    """A small model-like function around one scan call."""
    y, last_state = vmeanba_compiler.selective_scan(
        u * 2, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True
    )
    return torch.tanh(y) + u, last_state.sum(-1)


def _scan_calls(graph: torch.fx.Graph, op) -> int:
    """Nodes calling `op`'s default overload (Dynamo records the overload packet, AOT the overload)."""
    return sum(
        node.op == "call_function" and node.target in (op, op.default) for node in graph.nodes
    )


def test_dynamo_captures_the_scan_as_one_node_without_graph_breaks() -> None:
    x = _small_inputs(dtype=torch.float32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_block)(*x.args()[:-1])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert sum(_scan_calls(g.graph, SCAN_OP) for g in explanation.graphs) == 1


def _run_block(fn, x: ScanInputs, grad_seed: int = 7):
    leaves = [t.detach().requires_grad_() for t in x.args()[:-1]]
    out, state_sum = fn(*leaves)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grad_state = torch.randn(state_sum.shape, generator=gen, dtype=state_sum.dtype)
    grads = torch.autograd.grad([out, state_sum], leaves, [grad_out, grad_state])
    return [out, state_sum, *grads]


@pytest.mark.parametrize("form", FORMS)
def test_compiled_forward_and_backward_equal_eager(form: str) -> None:
    x = _small_inputs(form, "grouped", dtype=torch.float32, seed=11)
    graphs: dict[str, torch.fx.GraphModule] = {}

    def recorder(name: str):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compile_graph

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    compiled = _run_block(torch.compile(_block, backend=backend, fullgraph=True), x)
    eager = _run_block(_block, x)
    for name, got, want in zip(("out", "state_sum", *GRAD_NAMES), compiled, eager):
        assert torch.equal(got, want), name
    # The scan stayed one op in each AOT graph: the fake kernels let AOT trace it, and the
    # backward is the backward op, not a decomposed per-step loop.
    assert _scan_calls(graphs["forward"].graph, SCAN_OP) == 1
    assert _scan_calls(graphs["backward"].graph, SCAN_BACKWARD_OP) == 1
    assert _scan_calls(graphs["backward"].graph, SCAN_OP) == 0


def test_aot_eager_backend_matches_eager() -> None:
    x = _small_inputs("shared", "fixed", dtype=torch.float64, seed=5)
    torch._dynamo.reset()
    compiled = _run_block(torch.compile(_block, backend="aot_eager"), x)
    eager = _run_block(_block, x)
    for name, got, want in zip(("out", "state_sum", *GRAD_NAMES), compiled, eager):
        assert torch.equal(got, want), name


# 7. No reads of uninitialised memory -----------------------------------------------------------


@contextlib.contextmanager
def _fresh_memory_filled_with_nan() -> Iterator[None]:
    """While active, torch.empty / empty_like / new_empty return NaN-filled float tensors
    (torch's deterministic mode), so a kernel that reads an output or scratch entry before
    writing it produces NaN instead of whatever the allocator last left there."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all(), "this torch build does not fill fresh memory with NaN"
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _forward_and_backward(x: ScanInputs, grad_seed: int) -> list[Tensor]:
    grad_y, grad_last = _output_grads(x, grad_seed, with_last_state=True)
    return [*scan_cpu.forward(*x.args()), *scan_cpu.backward(grad_y, grad_last, *x.args())]


@given(x=scan_inputs(), grad_seed=seeds)
def test_kernels_never_read_memory_they_did_not_write(x: ScanInputs, grad_seed: int) -> None:
    plain = _forward_and_backward(x, grad_seed)
    with _fresh_memory_filled_with_nan():
        filled = _forward_and_backward(x, grad_seed)
    again = _forward_and_backward(x, grad_seed)
    for name, a, b, c in zip(("y", "last_state", *GRAD_NAMES), plain, filled, again):
        assert not a.isnan().any(), f"{name} has NaN for finite inputs {x}"
        assert torch.equal(a, b), f"{name} changes when fresh memory is NaN-filled, {x}"
        # Not bitwise for B and C grads in general (per-worker partial sums), but the split is
        # the same from call to call, so a repeat is bitwise.
        assert torch.equal(a, c), f"{name} differs between two identical calls, {x}"


@pytest.mark.parametrize("threads", [1, 3])
def test_forward_does_not_depend_on_the_thread_split(threads: int) -> None:
    x = _small_inputs("grouped", "shared", dtype=torch.float32, seed=2)
    default = scan_cpu.forward(*x.args())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = scan_cpu.forward(*x.args())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(default[0], split[0]) and torch.equal(default[1], split[1])


@pytest.mark.extended  # forward and backward compiled by Inductor: ~50 s cold
def test_training_through_inductor_with_transposed_inputs() -> None:
    """The backward's fake kernel promises contiguous gradients, as every kernel returns them; a
    transposed u, delta, z or B reaching the op must not make Inductor expect (and assert) a
    transposed gradient layout."""
    g = torch.Generator().manual_seed(5)
    batch, dim, state, length = 2, 6, 3, 7

    def transposed(*shape: int) -> Tensor:  # (batch, a, b) values laid out as (batch, b, a)
        return torch.randn(shape[0], shape[2], shape[1], generator=g).transpose(1, 2)

    leaves = {
        "u": transposed(batch, dim, length),
        "delta": transposed(batch, dim, length),
        "z": transposed(batch, dim, length),
        "B": transposed(batch, state, length),
        "C": torch.randn(batch, state, length, generator=g),
        "A": -torch.rand(dim, state, generator=g) - 0.2,
    }
    assert not leaves["u"].is_contiguous()

    def loss(u, delta, z, B, C, A):
        y, _ = torch.ops.vmeanba.selective_scan(u, delta, A, B, C, None, z, None, True)
        return y.square().sum()

    def grads(fn):
        inputs = [t.detach().requires_grad_() for t in leaves.values()]
        fn(*inputs).backward()
        return [t.grad for t in inputs]

    expected = grads(loss)
    # Inductor's on-disk cache keys do not cover a custom op's fake kernel: compile afresh, so a
    # graph cached from an older fake kernel cannot stand in for this one.
    with torch._inductor.config.patch(force_disable_caches=True):
        actual = grads(torch.compile(loss, backend="inductor", fullgraph=True))
    torch._dynamo.reset()
    for name, a, e in zip(leaves, actual, expected):
        assert_scan_close(a, e, torch.float32, f"grad {name}")
