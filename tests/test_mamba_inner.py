"""mamba_ssm's fused block functions (and Vision Mamba's) trace as the block's math around one
`vmeanba.selective_scan` node per scan.

The third-party module is the stand-in under tests/standins/mamba_ssm (pure-torch math written
from the published signatures, with its own scan loop): its eager output is the oracle. The user
models in tests/standins/mamba_inner_models.py call the functions as Mamba's and Vision Mamba's
blocks do. Every test imports them fresh (new function objects), so a substitution made by one
test never leaks into another.

Tolerances: a call compiled with backend="eager" / "aot_eager" runs the same math as the stand-in
with one scan kernel swapped for another, so it is held to `TOLERANCES[float32]`
(`assert_scan_close`); through Inductor (backend="vmeanba") to `MODEL_TOLERANCES[float32]`, as
every compiled model in this project; bfloat16 and autocast runs to `MODEL_TOLERANCES[bfloat16]`.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import vmeanba_compiler as vc
from compile_helpers import CountingBackend
from vmeanba_compiler.passes.reduced_scan import reduced_selective_scan
from vmeanba_compiler.polyfills.family import by_signature
from vmeanba_compiler.scan_substitutions import install_scan_substitutions
from vmeanba_compiler.testing import MODEL_TOLERANCES, assert_backend_matches_eager, assert_scan_close

STANDINS = Path(__file__).parent / "standins"
STANDIN_ROOTS = ("mamba_ssm", "mamba_inner_models")
SSI = "mamba_ssm.ops.selective_scan_interface"
LOGGER = "vmeanba_compiler.substitutions"
SCAN_TARGETS = (torch.ops.vmeanba.selective_scan, torch.ops.vmeanba.selective_scan.default)
F32 = torch.float32

ALL_NAMES = sorted(f"{SSI}.{name}" for name in (
    "selective_scan_fn", "selective_scan_ref", "mamba_inner_fn", "mamba_inner_ref",
    "mamba_inner_fn_no_out_proj", "bimamba_inner_fn", "bimamba_inner_ref",
))

# kind -> (block class, constructor arguments, stand-in function that runs, scan nodes per forward)
CASES = {
    "mamba_inner_fn": ("MambaBlock", {}, "mamba_inner_fn", 1),
    "mamba_inner_fn_1x": ("MambaBlock", {}, "mamba_inner_fn", 1),  # v1.0.0-v2.2.2 / Vim signature
    "mamba_inner_fn_rms": ("MambaBlock", {"rms": True}, "mamba_inner_fn", 1),
    "mamba_inner_ref": ("MambaBlock", {"inner": "ref"}, "mamba_inner_ref", 1),
    "bimamba_inner_fn": ("VimBlock", {"bimamba_type": "v1"}, "bimamba_inner_fn", 2),
    "bimamba_inner_ref": ("VimBlock", {"bimamba_type": "v1", "ref": True}, "bimamba_inner_ref", 2),
    "mamba_inner_fn_no_out_proj": ("VimBlock", {"bimamba_type": "v2"}, "mamba_inner_fn_no_out_proj", 2),
}
KINDS = sorted(CASES)


def _purge_standins() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN_ROOTS:
            del sys.modules[name]


@pytest.fixture
def ssi(monkeypatch):
    """The stand-in module, freshly imported; no import hook (tests opt into it)."""
    monkeypatch.syspath_prepend(str(STANDINS))
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not getattr(f, "_vmeanba_scan_finder", False)])
    _purge_standins()
    torch._dynamo.reset()
    yield importlib.import_module(SSI)
    _purge_standins()
    torch._dynamo.reset()


def _block(ssi, kind: str, install: bool = True) -> torch.nn.Module:
    """The user block for `kind`, its module imported after the stand-in took the signature
    `kind` needs; substitutions installed first unless told otherwise."""
    if kind == "mamba_inner_fn_1x":
        ssi.mamba_inner_fn = ssi.mamba_inner_fn_1x  # the older published signature, same name
    if install:
        install_scan_substitutions()
    cls, kwargs, _, _ = CASES[kind]
    models = importlib.import_module("mamba_inner_models")
    torch.manual_seed(0)
    return getattr(models, cls)(**kwargs)


def _tokens(length: int = 8, batch: int = 2, features: int = 8, dtype=F32) -> torch.Tensor:
    return torch.randn(batch, length, features, generator=torch.Generator().manual_seed(length)).to(dtype)


def _scan_nodes(graphs) -> int:
    return sum(1 for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and n.target in SCAN_TARGETS)


# --- what is substituted -------------------------------------------------------------------------


def _ours(names: list) -> list:
    """The substituted names of the mamba_ssm module under test (other libraries imported by
    other tests, e.g. transformers, are substituted too and listed as well)."""
    return [n for n in names if n.startswith(SSI + ".")]


@pytest.mark.parametrize("signature", ["2.2.3+", "1.x"])
def test_install_substitutes_every_block_function_of_either_signature(ssi, signature, caplog):
    if signature == "1.x":
        ssi.mamba_inner_fn = ssi.mamba_inner_fn_1x
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert _ours(install_scan_substitutions()) == ALL_NAMES
        assert _ours(install_scan_substitutions()) == ALL_NAMES
    logged = [r.getMessage() for r in caplog.records
              if r.name == LOGGER and r.levelno == logging.INFO and SSI in r.getMessage()]
    assert len(logged) == len(ALL_NAMES), logged
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_by_signature_picks_the_polyfill_with_the_originals_signature():
    def newer(name, fallback):
        def f(a, b=1, c=2):
            return "newer"
        return f

    def older(name, fallback):
        def f(a, b=1):
            return "older"
        return f

    make = by_signature(newer, older)
    assert make("m.f", lambda a, b=1: None)(0) == "older"
    assert make("m.f", lambda a, b=1, c=2: None)(0) == "newer"
    assert make("m.f", lambda a, b=3: None)(0) == "newer"  # unknown: the first, refused at registration
    with pytest.raises(ValueError):
        by_signature()


def test_unexpected_signature_is_left_alone_with_a_warning(monkeypatch, caplog):
    module = types.ModuleType(SSI)

    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                       out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                       B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
        raise AssertionError("never called")  # a signature no release had

    def bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                         out_proj_weight, out_proj_bias, A, A_b, B=None, C=None, D=None):
        raise AssertionError("never called")

    module.mamba_inner_fn, module.bimamba_inner_fn = mamba_inner_fn, bimamba_inner_fn
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not getattr(f, "_vmeanba_scan_finder", False)])
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, SSI, module)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _ours(install_scan_substitutions()) == []
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"left {SSI}.mamba_inner_fn alone" in warned
    assert f"left {SSI}.bimamba_inner_fn alone" in warned


# --- graphs, values, gradients -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_one_scan_node_per_scan_and_no_graph_break(ssi, kind):
    block = _block(ssi, kind)
    sizes = []
    for length in (8, 16):
        out = torch._dynamo.explain(block)(_tokens(length))
        assert out.graph_break_count == 0 and len(out.graphs) == 1, out.break_reasons
        assert _scan_nodes(out.graphs) == CASES[kind][3]
        sizes.append(len(out.graphs[0].graph.nodes))
    assert sizes[0] == sizes[1], f"graph size depends on L: {sizes}"


@pytest.mark.parametrize("kind", ["mamba_inner_fn", "bimamba_inner_fn", "mamba_inner_fn_no_out_proj"])
def test_one_graph_for_every_batch_size_and_length_with_dynamic_shapes(ssi, kind):
    block = _block(ssi, kind)
    counter = CompileCounter()
    compiled = torch.compile(block, backend=counter, dynamic=True)
    with torch.no_grad():
        for batch, length in ((2, 9), (3, 13), (2, 21)):  # L never equals d_model: no duck-sized alias
            x = _tokens(length, batch=batch)
            assert_scan_close(compiled(x), block(x), F32, f"{kind} batch {batch} L {length}")
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["eager", "vmeanba"])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_block_equals_the_standin(ssi, kind, backend):
    block = _block(ssi, kind)
    x = _tokens(12)
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    ran = CASES[kind][2]
    with torch.no_grad():
        compiled(x)
        before = ssi.CALLS[ran]
        actual = compiled(x)
        assert ssi.CALLS[ran] == before, "a compiled call ran the stand-in"
        expected = block(x)
    assert ssi.CALLS[ran] > before  # eager calls still run the original
    assert actual.dtype == expected.dtype and actual.shape == expected.shape == (2, 12, 8)
    if backend == "eager":
        assert_scan_close(actual, expected, F32, kind)
    else:
        rtol, atol = MODEL_TOLERANCES[F32]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _gradients(block, x, forward):
    x = x.clone().requires_grad_()
    block.zero_grad()
    forward(x).square().sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_through_the_compiled_call_match_eager(ssi, kind):
    block = _block(ssi, kind)
    x = _tokens(10)
    expected = _gradients(block, x, block)
    actual = _gradients(block, x, torch.compile(block, backend="aot_eager", fullgraph=True))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and e is not None, f"gradient {i} missing"
        assert_scan_close(a, e, F32, f"{kind} gradient {i}")


@pytest.mark.parametrize("kind", ["mamba_inner_fn", "mamba_inner_fn_no_out_proj"])
def test_training_gradients_through_the_vmeanba_backend_match_eager(ssi, kind):
    """Through Inductor too: its generated code checks every op output's layout against the
    op's fake kernel, which is what makes the polyfills pass contiguous tensors to the scan."""
    block = _block(ssi, kind)
    x = _tokens(10)
    expected = _gradients(block, x, block)
    actual = _gradients(block, x, torch.compile(block, backend="vmeanba"))
    rtol, atol = MODEL_TOLERANCES[F32]
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{kind} gradient {i}: {m}")


@pytest.mark.parametrize("precision", ["autocast", "bfloat16"])
@pytest.mark.parametrize("kind", ["mamba_inner_fn", "mamba_inner_fn_no_out_proj"])
def test_output_dtype_follows_the_original_under_autocast_and_bfloat16(ssi, kind, precision):
    block = _block(ssi, kind)
    x = _tokens(8)
    if precision == "bfloat16":
        block = block.to(torch.bfloat16)  # A_log and D go through .float() in the block, as in Mamba
        x = x.to(torch.bfloat16)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        actual, expected = compiled(x), block(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    rtol, atol = MODEL_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_no_out_proj_returns_the_gated_scan_in_xz_dtype_and_ref_ignores_delta_softplus(ssi):
    install_scan_substitutions()
    g = torch.Generator().manual_seed(5)
    batch, dim, state, rank, length = 2, 6, 3, 2, 9
    xz = torch.randn(batch, 2 * dim, length, generator=g)
    conv_w, conv_b = 0.5 * torch.randn(dim, 1, 4, generator=g), 0.1 * torch.randn(dim, generator=g)
    x_proj = 0.4 * torch.randn(rank + 2 * state, dim, generator=g)
    dt_proj = 0.4 * torch.randn(dim, rank, generator=g)
    out_w, out_b = 0.3 * torch.randn(5, dim, generator=g), torch.randn(5, generator=g)
    A = -torch.rand(dim, state, generator=g) - 0.5
    D, bias = torch.randn(dim, generator=g), 0.3 * torch.randn(dim, generator=g)

    def no_out_proj(xz):
        return ssi.mamba_inner_fn_no_out_proj(xz, conv_w, conv_b, x_proj, dt_proj, A, None, None, D, bias,
                                              delta_softplus=False)

    def ref(xz, softplus):
        return ssi.mamba_inner_ref(xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, A, None, None, D, bias,
                                   delta_softplus=softplus)

    for dtype in (F32, torch.bfloat16):  # a bfloat16 xz with float32 weights: inside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            actual = torch.compile(no_out_proj, backend="eager", fullgraph=True)(xz.to(dtype))
            expected = no_out_proj(xz.to(dtype))
        assert actual.dtype == expected.dtype == dtype and actual.shape == (batch, dim, length)
    assert_scan_close(torch.compile(no_out_proj, backend="eager")(xz), no_out_proj(xz), F32, "no_out_proj")
    compiled_ref = torch.compile(ref, backend="eager", fullgraph=True)
    assert_scan_close(compiled_ref(xz, False), ref(xz, True), F32, "mamba_inner_ref softplus off")
    assert (no_out_proj(xz) - ssi.mamba_inner_fn_no_out_proj(
        xz, conv_w, conv_b, x_proj, dt_proj, A, None, None, D, bias, delta_softplus=True)).abs().max() > 1e-3


# --- calibration and the rewrite -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mamba_inner_fn", "bimamba_inner_fn", "mamba_inner_fn_no_out_proj"])
def test_calibrate_finds_the_sites_and_the_backend_rewrites_them(ssi, kind):
    block = _block(ssi, kind, install=False)  # calibrate and the backend install what they need
    models = sys.modules["mamba_inner_models"]
    model = models.Classifier(block, in_features=3, d_model=8).eval()
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(2, 8, 3, generator=g) for _ in range(2)]
    profile = vc.calibrate(model, batches, progress=False)
    sites = [f"mixer:{i}" for i in range(CASES[kind][3])]
    assert profile.site_ids == sites
    assert all(profile.metric(s, "impact") is not None for s in sites)

    x = batches[0]
    backend = CountingBackend(sites=sites, inductor=False)
    with torch.no_grad():
        rewritten = torch.compile(model, backend=backend)(x)
        full = model(x)
    targets = [n.target for gm in backend.graphs for n in gm.graph.nodes]
    assert targets.count(reduced_selective_scan) == len(sites)
    assert not any(t in SCAN_TARGETS for t in targets)
    assert (rewritten - full).abs().max() > 1e-6, "the rewrite changed nothing"
    assert_backend_matches_eager(model, x, sites=sites)  # Inductor vs the same rewrite run eagerly


# --- declined calls ------------------------------------------------------------------------------


def _block_args(dtype=F32, complex_A: bool = False, batch=2, dim=6, state=3, rank=2, length=7):
    """(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
    out_proj_bias, A, D, delta_bias): x_proj gives 2N B/C columns per projection for complex A."""
    g = torch.Generator().manual_seed(13)
    cols = 2 * state * (2 if complex_A else 1)
    A = -torch.rand(dim, state, generator=g) - 0.5
    if complex_A:
        A = torch.complex(A, torch.randn(dim, state, generator=g))
    return dict(
        xz=torch.randn(batch, 2 * dim, length, generator=g).to(dtype),
        conv1d_weight=0.5 * torch.randn(dim, 1, 4, generator=g),
        conv1d_bias=0.1 * torch.randn(dim, generator=g),
        x_proj_weight=0.4 * torch.randn(rank + cols, dim, generator=g),
        delta_proj_weight=0.4 * torch.randn(dim, rank, generator=g),
        out_proj_weight=0.3 * torch.randn(5, dim, generator=g),
        out_proj_bias=torch.randn(5, generator=g),
        A=A, D=torch.randn(dim, generator=g), delta_bias=0.3 * torch.randn(dim, generator=g),
    )


def _assert_declined(fn_name: str, call, make_args) -> None:
    """Traced as the original: no op node, and the graph grows with L (the stand-in's loop over L
    unrolled); and equal to eager. (The stand-in's call counter cannot show it: Dynamo replays a
    traced global's side effect on the module object it first saw under that name, and every
    test imports the stand-in anew.)"""
    sizes = []
    for length in (6, 12):
        out = torch._dynamo.explain(call)(**make_args(length))
        assert _scan_nodes(out.graphs) == 0
        sizes.append(sum(len(gm.graph.nodes) for gm in out.graphs))
    assert sizes[1] > sizes[0] + 12, f"expected the original's loop over L in the graph, got {sizes} nodes"
    args = make_args(9)
    assert_scan_close(torch.compile(call, backend="eager")(**args), call(**args), F32, f"declined {fn_name}")


@pytest.mark.parametrize("fn_name", ["mamba_inner_fn", "mamba_inner_ref", "mamba_inner_fn_no_out_proj"])
def test_complex_A_is_declined_and_traces_the_original(ssi, fn_name):
    install_scan_substitutions()
    fn = getattr(ssi, fn_name)

    def call(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
             out_proj_bias, A, D, delta_bias):
        common = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight)
        if fn_name == "mamba_inner_fn_no_out_proj":
            return fn(*common, A, None, None, D, delta_bias)
        return fn(*common, out_proj_weight, out_proj_bias, A, None, None, D, delta_bias)

    _assert_declined(fn_name, call, lambda length: _block_args(complex_A=True, length=length))


def test_rms_weight_for_a_given_B_is_declined(ssi):
    install_scan_substitutions()

    def make_args(length):
        args = _block_args(length=length)
        batch, state = args["xz"].shape[0], args["A"].shape[1]
        args["B"] = torch.randn(batch, 1, state, length, generator=torch.Generator().manual_seed(2))
        args["b_rms_weight"] = torch.linspace(0.5, 1.5, state)
        return args

    def call(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
             out_proj_bias, A, D, delta_bias, B, b_rms_weight):
        return ssi.mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                  out_proj_weight, out_proj_bias, A, B, None, D, delta_bias,
                                  b_rms_weight=b_rms_weight)

    _assert_declined("mamba_inner_fn", call, make_args)


def test_given_C_that_is_not_a_real_floating_tensor_is_declined(ssi):
    install_scan_substitutions()

    def make_args(length):
        args = _block_args(length=length)
        args["C"] = torch.randint(-2, 3, tuple(args["A"].shape), generator=torch.Generator().manual_seed(3))
        return args

    def call(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
             out_proj_bias, A, D, delta_bias, C):
        return ssi.mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                   out_proj_weight, out_proj_bias, A, None, C, D, delta_bias)

    _assert_declined("mamba_inner_ref", call, make_args)


def test_given_B_and_C_in_the_ops_forms_are_mapped(ssi):
    """A fixed (dim, N) B and a grouped (batch, G, N, L) C are taken as given; the bidirectional
    function flips them along their last axis, as Vim does (N for the fixed one)."""
    install_scan_substitutions()
    args = _block_args()
    dim, state = args["A"].shape
    batch, _, length = args["xz"].shape
    g = torch.Generator().manual_seed(4)
    args["B"] = torch.randn(dim, state, generator=g)
    args["C"] = torch.randn(batch, 2, state, length, generator=g)
    args["A_b"] = -torch.rand(dim, state, generator=g) - 0.5

    def call(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
             out_proj_bias, A, D, delta_bias, B, C, A_b):
        one = ssi.mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                 out_proj_weight, out_proj_bias, A, B, C, D, delta_bias)
        two = ssi.bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                   out_proj_weight, out_proj_bias, A, A_b, B, C, D, delta_bias)
        return one + two

    out = torch._dynamo.explain(call)(**args)
    assert out.graph_break_count == 0 and _scan_nodes(out.graphs) == 3
    assert_scan_close(torch.compile(call, backend="eager", fullgraph=True)(**args), call(**args), F32, "given B/C")


def test_checkpoint_lvl_the_original_refuses_is_refused_compiled_too(ssi):
    install_scan_substitutions()
    args = _block_args()

    def call(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
             out_proj_bias, A, D, delta_bias):
        return ssi.mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                  out_proj_weight, out_proj_bias, A, None, None, D, delta_bias,
                                  checkpoint_lvl=2)

    with pytest.raises(AssertionError):
        call(**args)
    with pytest.raises(AssertionError):
        torch.compile(call, backend="eager")(**args)
