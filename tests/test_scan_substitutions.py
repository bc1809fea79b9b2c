"""Third-party scans (Mamba's and VMamba's csms6s) trace as one `vmeanba.selective_scan` node.

The third-party modules are stand-ins under tests/standins with the real names and signatures;
their Python loops are independent implementations and serve as the oracle. Every test imports
them fresh (new function objects), so a substitution made by one test never leaks into another,
and removes this project's import hook unless the test is about it.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from vmeanba_compiler import scan_substitutions
from vmeanba_compiler.scan_substitutions import install_scan_substitutions
from vmeanba_compiler.testing import assert_scan_close

STANDINS = Path(__file__).parent / "standins"
STANDIN_ROOTS = ("mamba_ssm", "csms6s", "scan_user_models")
SCAN_TARGETS = (torch.ops.vmeanba.selective_scan, torch.ops.vmeanba.selective_scan.default)
LOGGER = "vmeanba_compiler.substitutions"

# (model class, scan calls per forward)
BLOCKS = {"mamba_fn": ("MambaFnBlock", 2), "mamba_ref": ("MambaRefBlock", 1), "csms6s": ("Csms6sBlock", 1)}
ALL_STANDIN_NAMES = [
    "csms6s.selective_scan_fn",
    "mamba_ssm.ops.selective_scan_interface.bimamba_inner_fn",
    "mamba_ssm.ops.selective_scan_interface.bimamba_inner_ref",
    "mamba_ssm.ops.selective_scan_interface.mamba_inner_fn",
    "mamba_ssm.ops.selective_scan_interface.mamba_inner_fn_no_out_proj",
    "mamba_ssm.ops.selective_scan_interface.mamba_inner_ref",
    "mamba_ssm.ops.selective_scan_interface.selective_scan_fn",
    "mamba_ssm.ops.selective_scan_interface.selective_scan_ref",
]


def _purge_standins() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN_ROOTS:
            del sys.modules[name]


def _ours(names: list[str]) -> list[str]:
    """The substituted names of the modules this file imports or creates (the stand-ins and the
    fake third-party module). Substitutions are process-wide, so a library another test imported
    in the same process (e.g. transformers' mamba) is listed too; it is no concern of this file."""
    return [n for n in names if n.split(".")[0] in (*STANDIN_ROOTS, "thirdparty")]


def _without_hook() -> list:
    return [f for f in sys.meta_path if not getattr(f, "_vmeanba_scan_finder", False)]


@pytest.fixture
def standins(monkeypatch):
    """Stand-ins importable, not yet imported, and no import hook (tests opt into it)."""
    monkeypatch.syspath_prepend(str(STANDINS))
    monkeypatch.setattr(sys, "meta_path", _without_hook())
    _purge_standins()
    torch._dynamo.reset()
    yield
    _purge_standins()
    torch._dynamo.reset()


def _models():
    return importlib.import_module("scan_user_models")


def _scan_nodes(gm: torch.fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SCAN_TARGETS]


def _explain(fn, *args):
    out = torch._dynamo.explain(fn)(*args)
    return out.graph_break_count, out.graphs


def _block(key: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(_models(), BLOCKS[key][0])(**kwargs)


def _x(length: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 8, length, generator=torch.Generator().manual_seed(length)).to(dtype)


def _scan_args(dtype=torch.float32, batch=2, dim=8, state=4, groups=2, length=12):
    g = torch.Generator().manual_seed(7)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5
    A = -torch.rand(dim, state, generator=g) - 0.2
    B = torch.randn(batch, groups, state, length, generator=g)
    C = torch.randn(batch, groups, state, length, generator=g)
    D = torch.randn(dim, generator=g)
    delta_bias = torch.rand(dim, generator=g) - 1.0  # distinct from D: a swapped order shows
    return [t.to(dtype) for t in (u, delta, A, B, C)] + [D, delta_bias]


def test_module_names_matched_exactly():
    family = scan_substitutions._family_for_module
    assert family("mamba_ssm.ops.selective_scan_interface").name == "mamba_ssm"
    for name in ("csms6s", "models.csms6s", "classification.models.csms6s"):
        assert family(name).name == "csms6s", name
    for name in ("mamba_ssm", "mamba_ssm.ops", "my_csms6s", "csms6s.extra", "x.mamba_ssm.ops.selective_scan_interface"):
        assert family(name) is None, name


def test_without_install_dynamo_unrolls_the_original_loop(standins):
    models = _models()
    ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    block = _block("mamba_ref")
    sizes = []
    for length in (8, 32):
        breaks, graphs = _explain(block, _x(length))
        assert sum(len(_scan_nodes(g)) for g in graphs) == 0
        sizes.append(sum(len(g.graph.nodes) for g in graphs))
    assert sizes[1] > sizes[0] + 24, f"expected the loop over L unrolled, got node counts {sizes}"
    assert models.selective_scan_ref is ssi.selective_scan_ref


def test_install_names_substitutions_and_is_idempotent(standins, caplog):
    _models()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = install_scan_substitutions()
        second = install_scan_substitutions()
    assert first == second and _ours(first) == ALL_STANDIN_NAMES
    logged = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    logged = [line for line in logged if any(name in line for name in ALL_STANDIN_NAMES)]
    assert len(logged) == len(ALL_STANDIN_NAMES), logged  # one line per function, on the first call only
    assert all("torch.ops.vmeanba.selective_scan" in line for line in logged)


@pytest.mark.parametrize("key", sorted(BLOCKS))
def test_one_scan_node_per_call_independent_of_length(standins, key):
    install_scan_substitutions()
    block = _block(key)
    sizes = []
    for length in (8, 32):
        breaks, graphs = _explain(block, _x(length))
        assert breaks == 0 and len(graphs) == 1
        assert len(_scan_nodes(graphs[0])) == BLOCKS[key][1]
        sizes.append(len(graphs[0].graph.nodes))
    assert sizes[0] == sizes[1], f"graph size depends on L: {sizes}"
    assert sizes[0] < 40


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("key", sorted(BLOCKS))
def test_compiled_matches_original_and_eager_still_runs_original(standins, key, backend):
    install_scan_substitutions()
    block = _block(key)
    ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    csms6s = sys.modules["csms6s"]
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    x = _x(16)
    with torch.no_grad():
        actual = compiled(x)
        calls = ssi.CALLS + csms6s.CALLS
        compiled(x)
        assert ssi.CALLS + csms6s.CALLS == calls, "a compiled call ran the original Python loop"
        expected = block(x)
    assert sum((ssi.CALLS + csms6s.CALLS).values()) == sum(calls.values()) + BLOCKS[key][1]
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype
        assert_scan_close(a, e, torch.float32, f"{key} output {i}")


def test_gradients_match_the_original(standins):
    install_scan_substitutions()
    block = _block("mamba_fn")
    x = _x(12).requires_grad_()
    y, state = block(x)
    (y.square().sum() + state.sum()).backward()
    expected = [x.grad] + [p.grad for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    y, state = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    (y.square().sum() + state.sum()).backward()
    actual = [x.grad] + [p.grad for p in block.parameters()]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_scan_close(a, e, torch.float32, f"gradient {i}")


@pytest.mark.parametrize("return_last_state", [False, True])
@pytest.mark.parametrize("fn_name", ["selective_scan_fn", "selective_scan_ref"])
def test_mamba_keyword_calls_and_last_state(standins, fn_name, return_last_state):
    install_scan_substitutions()
    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    fn = getattr(ssi, fn_name)
    u, delta, A, B, C, D, delta_bias = _scan_args()
    z = torch.randn_like(u)

    def call(u, delta, A, B, C, D, z, delta_bias):
        return fn(u, delta, A, B[:, 0], C, z=z, D=D, delta_bias=delta_bias, delta_softplus=True,
                  return_last_state=return_last_state)

    args = (u, delta, A, B, C, D, z, delta_bias)
    breaks, graphs = _explain(call, *args)
    assert breaks == 0 and len(_scan_nodes(graphs[0])) == 1
    actual = torch.compile(call, backend="eager", fullgraph=True)(*args)
    expected = call(*args)
    if return_last_state:
        assert isinstance(actual, tuple) and len(actual) == 2
        assert actual[1].dtype == expected[1].dtype == torch.float32
        assert_scan_close(actual[1], expected[1], torch.float32, "last_state")
        actual, expected = actual[0], expected[0]
    assert_scan_close(actual, expected, torch.float32, "out")


@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("oflex", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csms6s_argument_order_and_oflex_dtype(standins, dtype, oflex, delta_softplus):
    install_scan_substitutions()
    csms6s = importlib.import_module("csms6s")
    u, delta, A, B, C, D, delta_bias = _scan_args(dtype)

    def call(u, delta, A, B, C, D, delta_bias):
        return csms6s.selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus, oflex)

    args = (u, delta, A, B, C, D, delta_bias)
    breaks, graphs = _explain(call, *args)
    assert breaks == 0 and len(_scan_nodes(graphs[0])) == 1
    actual = torch.compile(call, backend="eager", fullgraph=True)(*args)
    expected = call(*args)
    assert actual.dtype == expected.dtype == (torch.float32 if oflex else dtype)
    assert_scan_close(actual, expected, actual.dtype, "csms6s y")
    swapped = call(u, delta, A, B, C, delta_bias, D)
    assert (swapped.float() - expected.float()).abs().max() > 0.1, "D/delta_bias do not discriminate"


def test_default_delta_softplus_is_true_for_csms6s(standins):
    install_scan_substitutions()
    csms6s = importlib.import_module("csms6s")
    u, delta, A, B, C, D, delta_bias = _scan_args()
    call = lambda *a: csms6s.selective_scan_fn(*a)  # noqa: E731  (defaults: softplus on, oflex on)
    actual = torch.compile(call, backend="eager", fullgraph=True)(u, delta, A, B, C)
    assert_scan_close(actual, call(u, delta, A, B, C), torch.float32, "csms6s defaults")


def test_module_imported_after_install_is_substituted(standins):
    assert _ours(install_scan_substitutions()) == []
    models = _models()  # imports mamba_ssm.ops.selective_scan_interface and csms6s through the hook
    ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    assert type(ssi.__loader__).__name__ == "SourceFileLoader"
    assert type(ssi.__spec__.loader).__name__ == "SourceFileLoader"
    breaks, graphs = _explain(_block("csms6s"), _x(8))
    assert breaks == 0 and len(_scan_nodes(graphs[0])) == 1
    assert _ours(install_scan_substitutions()) == ALL_STANDIN_NAMES
    assert models.selective_scan_fn is ssi.selective_scan_fn


def test_eager_calls_after_install_run_the_original(standins):
    models = _models()
    ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    original = ssi.selective_scan_fn
    install_scan_substitutions()
    assert ssi.selective_scan_fn is original and models.selective_scan_fn is original
    before = ssi.CALLS["selective_scan_fn"]
    _block("mamba_fn")(_x(8))
    assert ssi.CALLS["selective_scan_fn"] == before + 2


def test_substitution_survives_dynamo_reset(standins):
    install_scan_substitutions()
    torch._dynamo.reset()
    breaks, graphs = _explain(_block("mamba_ref"), _x(8))
    assert breaks == 0 and len(_scan_nodes(graphs[0])) == 1


def test_complex_A_declines_to_the_original_code(standins):
    install_scan_substitutions()
    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    g = torch.Generator().manual_seed(3)
    batch, dim, state, length = 1, 4, 2, 6
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.rand(batch, dim, length, generator=g)
    A = torch.complex(-torch.rand(dim, state, generator=g), torch.randn(dim, state, generator=g))
    B = torch.randn(batch, state, 2 * length, generator=g)  # (real, imag) pairs along L
    C = torch.randn(batch, state, 2 * length, generator=g)

    def call(u, delta, A, B, C):
        return ssi.selective_scan_ref(u, delta, A, B, C)

    breaks, graphs = _explain(call, u, delta, A, B, C)
    assert sum(len(_scan_nodes(gm)) for gm in graphs) == 0
    actual = torch.compile(call, backend="eager")(u, delta, A, B, C)
    assert_scan_close(actual, call(u, delta, A, B, C), torch.float32, "complex A")


def test_unexpected_signature_is_left_alone(standins, monkeypatch, caplog):
    module = types.ModuleType("thirdparty.models.csms6s")

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None):
        raise AssertionError("never called")

    module.selective_scan_fn = selective_scan_fn
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _ours(install_scan_substitutions()) == []
    assert any("left thirdparty.models.csms6s.selective_scan_fn alone" in r.getMessage() for r in caplog.records)
