"""The Triton selective scan (forward, backward) and the fused VMeanba site kernel.

Four kinds of check, so the kernels are exercised with and without a GPU:

1. Interpreter (CPU): the kernels run on CPU tensors under TRITON_INTERPRET=1 against the float64
   reference (`triton_interpreter_cases.py`). Triton reads that variable when kernels are
   decorated, i.e. on first import, and other tests import Triton without it, so the cases run in
   ONE child pytest process with the variable set (started by a fixture, in the background, while
   the compile checks below run here). Each case reports here under its own name; this process's
   environment never changes.
2. Compilation (CPU): every autotune config of every kernel compiles to an sm_90 (H100) cubin with
   the installed Triton, which needs no GPU or driver. It catches what the interpreter accepts but
   the compiler rejects.
3. Dispatch (CPU): AOT tracing with fake CUDA tensors turns the op and its backward op into
   Triton kernel launches (what Inductor inlines); CPU tensors keep the op as one node.
4. GPU (`-m gpu`, skipped without CUDA): the real kernels against the reference, the op's CUDA
   dispatch, and Inductor's generated code for a compiled SS2D block containing the Triton scan,
   and for a training step of a rewritten one (the fused reduced-site kernels, both ways).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmeanba_compiler.rewrite_modes import REWRITE_SETTINGS
from vmeanba_compiler.scan_schema import compute_dtype_for
from vmeanba_compiler.testing import MODEL_TOLERANCES, ScanInputs, scan_inputs, site_groups

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CASES_FILE = Path(__file__).with_name("triton_interpreter_cases.py")
INTERPRETER_CASES = (
    "test_forward_matches_reference",
    "test_backward_matches_autograd_through_reference",
    "test_fused_site_matches_reduced_scan",
    "test_fused_site_backward_matches_reference",
    "test_fused_site_backward_in_every_mode_with_and_without_options",
    "test_kernels_read_strided_views_in_place",
)


# 1. Interpreter cases, run in a child process -----------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory) -> Callable[[], dict[str, str]]:
    """Start the child pytest now; the returned function waits for it and gives each case's
    outcome: "" when it passed, else the failure text."""
    report = tmp_path_factory.mktemp("triton_interpreter") / "cases.xml"
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", str(CASES_FILE)],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outcomes: dict[str, str] = {}

    def wait() -> dict[str, str]:
        if not outcomes:
            output, _ = child.communicate()
            if not report.exists():
                raise AssertionError(f"the interpreter cases did not run:\n{output}")
            for case in ElementTree.parse(report).iter("testcase"):
                problems = [p for p in case if p.tag in ("failure", "error", "skipped")]
                outcomes[case.get("name")] = "\n".join(
                    f"{p.tag}: {p.get('message')}\n{p.text or ''}" for p in problems
                )
            if set(outcomes) != set(INTERPRETER_CASES):
                raise AssertionError(
                    f"interpreter cases ran {sorted(outcomes)}, this file expects {sorted(INTERPRETER_CASES)}; "
                    f"update INTERPRETER_CASES\n{output}"
                )
        return outcomes

    yield wait
    if child.poll() is None:
        child.kill()
        child.wait()


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="the cases start their own interpreter process")
def test_interpreter_cases_listed_here_are_the_case_files_tests(interpreter_run) -> None:
    """Requested first so the child process starts early (the compile checks below run while it
    works); checks that INTERPRETER_CASES names exactly the test functions of the case file, so a
    case added there cannot go unreported here."""
    import ast

    tree = ast.parse(CASES_FILE.read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    assert defined == set(INTERPRETER_CASES), (sorted(defined), INTERPRETER_CASES)


# 2. Every config compiles for sm_90 -----------------------------------------------------------------


def _recorded_launches(monkeypatch, call: Callable[[], Any]) -> list[tuple[Any, tuple, dict]]:
    """(kernel, args, kwargs) of every launch `call` makes, without launching anything."""
    from vmeanba_compiler.lowering import scan_triton, vmeanba_triton

    launches = []

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Callable:
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module in (scan_triton, vmeanba_triton):
        monkeypatch.setattr(module, "launcher", Recorder)
    call()
    return launches


_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _compile_for_sm90(kernel: Any, args: tuple, kwargs: dict, config: Any) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = {**dict(zip(kernel.fn.arg_names, args)), **kwargs, **config.kwargs}
    signature, constants = {}, {}
    for param in kernel.fn.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    assert compiled.asm["cubin"], f"no cubin for {kernel.fn.__name__} {config}"


def _variant_inputs(variant: str) -> ScanInputs:
    """Inputs covering the kernels' compile-time branches: every optional argument with grouped B
    and fixed C in float32; none with shared B and fixed C in float64; bfloat16 storage."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 8, 16, 64

    def randn(*shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype)

    if variant == "float32-all-arguments":
        return ScanInputs(randn(batch, dim, length), randn(batch, dim, length), -randn(dim, state).abs(),
                          randn(batch, 4, state, length), randn(dim, state), randn(dim), randn(batch, dim, length),
                          randn(dim), True)
    f64 = torch.float64
    if variant == "float64-no-options":
        return ScanInputs(randn(batch, dim, length, dtype=f64), randn(batch, dim, length, dtype=f64),
                          -randn(dim, state, dtype=f64).abs(), randn(batch, state, length, dtype=f64),
                          randn(dim, state, dtype=f64))
    return _variant_inputs("float32-all-arguments").to(torch.bfloat16)


@pytest.mark.extended  # Triton compiles every kernel config for sm_90 on the CPU: about a minute
@pytest.mark.skipif(INTERPRETING, reason="kernels are interpreted functions in this process")
@pytest.mark.parametrize("variant", ["float32-all-arguments", "float64-no-options", "bfloat16"])
def test_every_kernel_config_compiles_for_sm90(variant: str, monkeypatch) -> None:
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")
    from vmeanba_compiler.lowering import scan_triton, vmeanba_triton

    x = _variant_inputs(variant)
    grad_last = torch.zeros(*x.u.shape[:2], x.A.shape[1], dtype=compute_dtype_for(x.u))

    def call() -> None:
        scan_triton.forward(*x.args())
        scan_triton.backward(x.u, grad_last, *x.args())
        vmeanba_triton.fused_reduced_scan(*x.args(), 4)
        vmeanba_triton.fused_reduced_scan_backward(x.u, grad_last, *x.args(), 4)
        vmeanba_triton.fused_reduced_scan(*x.args(), 4, dt_mode="raw", skip_mode="mean")
        vmeanba_triton.fused_reduced_scan_backward(x.u, None, *x.args(), 4, dt_mode="raw", skip_mode="mean")

    launches = _recorded_launches(monkeypatch, call)
    assert len(launches) == 6
    for index, (kernel, args, kwargs) in enumerate(launches):
        # All configs once; the other variants (and the other modes) check the compile-time
        # branches with one config.
        configs = kernel.configs if variant == "float32-all-arguments" and index < 4 else kernel.configs[:1]
        for config in configs:
            _compile_for_sm90(kernel, args, kwargs, config)


# 3. Dispatch: CUDA calls trace into Triton launches, CPU calls keep the op --------------------------


class _ScanCall(torch.nn.Module):
    OP = "vmeanba.selective_scan"

    def forward(self, u, delta, A, B, C, D, delta_bias):
        return torch.ops.vmeanba.selective_scan(u, delta, A, B, C, D, None, delta_bias, True)


class _ScanBackwardCall(torch.nn.Module):
    OP = "vmeanba.selective_scan_backward"

    def forward(self, grad_y, u, delta, A, B, C, D, delta_bias):
        grads = torch.ops.vmeanba.selective_scan_backward(grad_y, None, u, delta, A, B, C, D, None, delta_bias, True)
        return tuple(grads)


class _ReducedCall(torch.nn.Module):
    OP = "vmeanba.reduced_selective_scan"

    def forward(self, u, delta, A, B, C, D, delta_bias):
        return torch.ops.vmeanba.reduced_selective_scan(u, delta, A, B, C, D, None, delta_bias, True, groups=4)


class _ReducedBackwardCall(_ScanBackwardCall):
    OP = "vmeanba.reduced_selective_scan_backward"

    def forward(self, grad_y, u, delta, A, B, C, D, delta_bias):
        grads = torch.ops.vmeanba.reduced_selective_scan_backward(
            grad_y, None, u, delta, A, B, C, D, None, delta_bias, True, 4, "effective", "exact"
        )
        return tuple(grads)


_DISPATCHED = [_ScanCall(), _ScanBackwardCall(), _ReducedCall(), _ReducedBackwardCall()]
_DISPATCHED_IDS = ["forward_op", "backward_op", "reduced_op", "reduced_backward_op"]


def _functional_graph(module: torch.nn.Module, device: str) -> torch.fx.GraphModule:
    """The graph AOT autograd records (functionalised, as for Inductor), with fake tensors on
    `device`: no GPU is needed to trace for CUDA."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        seq = torch.randn(2, 8, 16, device=device)
        args = [seq, seq.clone(), -torch.rand(8, 4, device=device), torch.randn(2, 2, 4, 16, device=device),
                torch.randn(2, 2, 4, 16, device=device), torch.ones(8, device=device), torch.zeros(8, device=device)]
        if isinstance(module, _ScanBackwardCall):
            args.insert(0, torch.randn(2, 8, 16, device=device))
    graph, _ = aot_export_module(module, tuple(args), trace_joint=False)
    return graph


def _functional_graph_targets(module: torch.nn.Module, device: str) -> list[str]:
    """Targets of the call nodes of `_functional_graph`."""
    return [str(node.target) for node in _functional_graph(module, device).graph.nodes if node.op == "call_function"]


@pytest.mark.skipif(INTERPRETING, reason="kernels are interpreted functions in this process")
@pytest.mark.parametrize("module", _DISPATCHED, ids=_DISPATCHED_IDS)
def test_cuda_calls_trace_into_triton_launches(module: torch.nn.Module) -> None:
    # Without a driver Triton cannot analyse which arguments a kernel writes and torch logs a
    # warning, assuming all; the traced graph is what is checked here.
    targets = _functional_graph_targets(module, "cuda")
    assert "triton_kernel_wrapper_functional" in targets, targets
    assert not any(target.startswith("vmeanba.") for target in targets), targets


@pytest.mark.skipif(INTERPRETING, reason="kernels are interpreted functions in this process")
@pytest.mark.parametrize("module, kernel", [(_ReducedCall(), "_fused_reduced_scan_kernel"),
                                            (_ReducedBackwardCall(), "_fused_reduced_scan_backward_kernel")],
                         ids=["reduced_op", "reduced_backward_op"])
def test_reduced_site_traces_into_one_fused_kernel_each_way(module: torch.nn.Module, kernel: str) -> None:
    """The reduced op and its backward op each become ONE launch of their fused kernel (not the
    full scan's kernels around elementwise torch ops); the torch ops left allocate the outputs
    and sum the per-batch-row parameter gradients."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    nodes = [node for node in _functional_graph(module, "cuda").graph.nodes if node.op == "call_function"]
    launched = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__ for node in nodes
                if str(node.target) == "triton_kernel_wrapper_functional"]
    assert launched == [kernel], launched
    aten = {str(node.target).split(".")[1] for node in nodes if str(node.target).startswith("aten.")}
    assert aten <= {"empty", "zeros", "new_empty", "sum", "_to_copy", "_assert_tensor_metadata"}, aten


@pytest.mark.parametrize("module", _DISPATCHED, ids=_DISPATCHED_IDS)
def test_cpu_calls_keep_the_op_as_one_node(module: torch.nn.Module) -> None:
    targets = _functional_graph_targets(module, "cpu")
    assert sum(target.startswith("vmeanba.") for target in targets) == 1, targets
    assert any(target.startswith(module.OP + ".") for target in targets), targets
    assert "triton_kernel_wrapper_functional" not in targets, targets


# Interpreter outcomes, collected after the compile checks had the other core ------------------------


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="the cases start their own interpreter process")
@pytest.mark.parametrize("case", INTERPRETER_CASES)
def test_interpreter(case: str, interpreter_run) -> None:
    failure = interpreter_run()[case]
    assert not failure, f"{CASES_FILE.name}::{case} under TRITON_INTERPRET=1:\n{failure}"


# 4. GPU -----------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Lengths past the largest BLOCK_T, state sizes up to VMamba's, channel counts over several blocks.
MEDIUM = {"max_batch": 3, "max_dim": 64, "max_state": 16, "max_length": 600}


@pytest.mark.gpu
@requires_cuda
@settings(max_examples=40)
@given(x=scan_inputs(**MEDIUM))
def test_gpu_forward_matches_reference(x: ScanInputs) -> None:
    import triton_checks

    triton_checks.assert_forward_matches_reference(x, "cuda")


@pytest.mark.gpu
@requires_cuda
@settings(max_examples=30)
@given(
    x=scan_inputs(**MEDIUM, dtypes=(torch.float32, torch.float64)),
    grad_seed=st.integers(0, 2**32 - 1),
    with_last_state=st.booleans(),
)
def test_gpu_backward_matches_autograd_through_reference(x: ScanInputs, grad_seed: int, with_last_state: bool) -> None:
    import triton_checks

    triton_checks.assert_backward_matches_reference(x, grad_seed, with_last_state, "cuda")


@pytest.mark.gpu
@requires_cuda
@settings(max_examples=30)
@given(x=scan_inputs(**MEDIUM), data=st.data())
def test_gpu_fused_site_matches_reduced_scan(x: ScanInputs, data: st.DataObject) -> None:
    import triton_checks

    dim, base = x.u.shape[1], site_groups(x)
    groups = data.draw(st.sampled_from([g for g in range(base, dim + 1, base) if dim % g == 0]), label="groups")
    modes = [data.draw(st.sampled_from(choices), label=name) for name, choices in REWRITE_SETTINGS.items()]
    triton_checks.assert_fused_matches_reduced_site(x, groups, "cuda", *modes)


@pytest.mark.gpu
@requires_cuda
@settings(max_examples=30)
@given(x=scan_inputs(**MEDIUM), data=st.data(), grad_seed=st.integers(0, 2**32 - 1), with_last_state=st.booleans())
def test_gpu_fused_site_backward_matches_reference(x: ScanInputs, data: st.DataObject, grad_seed: int,
                                                   with_last_state: bool) -> None:
    import triton_checks

    dim, base = x.u.shape[1], site_groups(x)
    groups = data.draw(st.sampled_from([g for g in range(base, dim + 1, base) if dim % g == 0]), label="groups")
    modes = [data.draw(st.sampled_from(choices), label=name) for name, choices in REWRITE_SETTINGS.items()]
    triton_checks.assert_fused_site_backward_matches_reference(x, groups, *modes, grad_seed, "cuda", with_last_state)


@pytest.mark.gpu
@requires_cuda
@settings(max_examples=10)
@given(x=scan_inputs(**MEDIUM, dtypes=(torch.float32,)), grad_seed=st.integers(0, 2**32 - 1))
def test_gpu_kernels_read_strided_views_in_place(x: ScanInputs, grad_seed: int) -> None:
    import triton_checks

    views = triton_checks.strided(x)
    triton_checks.assert_forward_matches_reference(views, "cuda")
    triton_checks.assert_backward_matches_reference(views, grad_seed, True, "cuda")
    triton_checks.assert_fused_matches_reduced_site(views, site_groups(x), "cuda")
    triton_checks.assert_fused_site_backward_matches_reference(views, site_groups(x), "effective", "exact", grad_seed,
                                                              "cuda")


@pytest.mark.gpu
@requires_cuda
def test_gpu_op_dispatches_cuda_tensors_to_the_triton_kernels() -> None:
    from vmeanba_compiler.lowering import scan_triton
    from vmeanba_compiler.testing import assert_scan_close

    gen = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 32, 16, 200
    args = [torch.randn(batch, dim, length, generator=gen), torch.randn(batch, dim, length, generator=gen),
            -torch.rand(dim, state, generator=gen), torch.randn(batch, 4, state, length, generator=gen),
            torch.randn(batch, 4, state, length, generator=gen), torch.randn(dim, generator=gen),
            torch.randn(batch, dim, length, generator=gen), torch.randn(dim, generator=gen)]
    cuda_args = [t.cuda().requires_grad_() for t in args]
    y, last_state = torch.ops.vmeanba.selective_scan(*cuda_args, True)
    y_kernel, last_kernel = scan_triton.forward(*[t.detach() for t in cuda_args], True)
    assert torch.equal(y, y_kernel) and torch.equal(last_state, last_kernel)

    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, cuda_args, grad_y)
    expected = scan_triton.backward(grad_y, None, *[t.detach() for t in cuda_args], True)
    for got, want in zip(grads, expected):
        assert_scan_close(got, want, torch.float32, "op gradient vs scan_triton.backward")


@pytest.mark.gpu
@requires_cuda
def test_gpu_reduced_op_dispatches_cuda_tensors_to_the_fused_kernels() -> None:
    """Eager autograd through the reduced op on CUDA runs the fused forward and backward kernels."""
    from vmeanba_compiler.lowering import vmeanba_triton
    from vmeanba_compiler.testing import assert_scan_close

    gen = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 32, 16, 200
    args = [torch.randn(batch, dim, length, generator=gen), torch.randn(batch, dim, length, generator=gen),
            -torch.rand(dim, state, generator=gen), torch.randn(batch, 2, state, length, generator=gen),
            torch.randn(dim, state, generator=gen), torch.randn(dim, generator=gen),
            torch.randn(batch, dim, length, generator=gen), torch.randn(dim, generator=gen)]
    cuda_args = [t.cuda().requires_grad_() for t in args]
    y, _ = torch.ops.vmeanba.reduced_selective_scan(*cuda_args, True, groups=4)
    assert torch.equal(y, vmeanba_triton.fused_reduced_scan(*[t.detach() for t in cuda_args], True, 4)[0])
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, cuda_args, grad_y)
    expected = vmeanba_triton.fused_reduced_scan_backward(grad_y, None, *[t.detach() for t in cuda_args], True, 4)
    for got, want in zip(grads, expected):
        assert_scan_close(got, want, torch.float32, "op gradient vs fused_reduced_scan_backward")


def _ss2d_and_input():
    from vmeanba_compiler.models.ss2d import SS2D

    torch.manual_seed(0)
    return SS2D(dim=16, d_state=4).cuda(), torch.randn(2, 8, 8, 16, device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["inductor", "vmeanba"])
def test_gpu_compiled_ss2d_inlines_the_triton_scan(backend: str) -> None:
    from torch._inductor.utils import run_and_get_code

    model, x = _ss2d_and_input()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model.eval()(x)
        y, sources = run_and_get_code(torch.compile(model, backend=backend), x)
    code = "\n".join(sources)
    assert "_scan_forward_kernel" in code, "the Triton scan is not in Inductor's generated code"
    assert "torch.ops.vmeanba.selective_scan" not in code, "the op is still called as an opaque extern kernel"
    rtol, atol = MODEL_TOLERANCES[y.dtype]
    torch.testing.assert_close(y, expected, rtol=rtol, atol=atol)


@pytest.mark.gpu
@requires_cuda
def test_gpu_compiled_ss2d_training_inlines_the_triton_backward() -> None:
    from torch._inductor.utils import run_and_get_code

    model, x = _ss2d_and_input()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")
    _, sources = run_and_get_code(lambda: compiled(x).square().mean().backward())
    code = "\n".join(sources)
    assert "_scan_forward_kernel" in code and "_scan_backward_kernel" in code
    assert "torch.ops.vmeanba.selective_scan" not in code


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dt_mode, skip_mode", [("effective", "exact"), ("raw", "mean")])
def test_gpu_rewritten_training_step_inlines_the_fused_backward(dt_mode: str, skip_mode: str) -> None:
    """A training step of a rewritten SS2D block (its one scan site reduced) compiled with
    backend="vmeanba": Inductor's generated code launches the fused forward and backward kernels
    (no opaque op), and the gradients equal those of the same rewrite run eagerly."""
    from torch._inductor.utils import run_and_get_code

    options = {"sites": [":0"], "dt_mode": dt_mode, "skip_mode": skip_mode}
    model, x = _ss2d_and_input()

    def gradients(compiled: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        compiled(x).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    torch._dynamo.reset()
    expected = gradients(torch.compile(model, backend="vmeanba", options={**options, "inductor": False}))
    torch._dynamo.reset()
    actual, sources = run_and_get_code(gradients, torch.compile(model, backend="vmeanba", options=options))
    code = "\n".join(sources)
    assert "_fused_reduced_scan_kernel" in code and "_fused_reduced_scan_backward_kernel" in code
    assert not re.search(r"(?<!_reduced)_scan_(forward|backward)_kernel", code), "the full scan's kernels ran"
    assert "torch.ops.vmeanba" not in code, "a scan op is still called as an opaque extern kernel"
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")
