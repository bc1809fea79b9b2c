"""Hugging Face transformers' Mamba (`MambaForCausalLM`) through the vmeanba backend.

`transformers.models.mamba.modeling_mamba.mamba_selective_scan` is mapped onto
`vmeanba.selective_scan` (vmeanba_compiler/polyfills/transformers_mamba.py), on both of its torch
paths: the Python loop over L (default) and the associative_scan path
(`MambaConfig(use_associative_scan=True)`, taken only under torch.compile). The oracle is always
transformers' own function, called eagerly (unwrapped from its kernel-hub decorator); where its
associative path is the reference, a copy of it (not substituted) is traced by Dynamo, since eager
execution never takes that path.

Models are small and randomly initialised with fixed seeds from a `MambaConfig` built here
(nothing is downloaded): 2 layers, hidden 32 (64 channels), state 16, vocabulary 64, L = 16.
"""

from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.18")

import vmeanba_compiler as vc  # noqa: E402
from vmeanba_compiler import scan_substitutions  # noqa: E402
from vmeanba_compiler.scan_substitutions import install_scan_substitutions  # noqa: E402
from vmeanba_compiler.testing import (  # noqa: E402
    MODEL_TOLERANCES,
    assert_backend_matches_eager,
    assert_scan_close,
    training_losses,
)
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402
from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402

SCAN_TARGETS = (torch.ops.vmeanba.selective_scan, torch.ops.vmeanba.selective_scan.default)
VOCAB, HIDDEN, STATE, LAYERS, SEQ = 64, 32, 16, 2, 16
CHANNELS = 2 * HIDDEN  # MambaConfig's default expand=2
SITES = [f"backbone.layers.{i}.mixer:0" for i in range(LAYERS)]
PATHS = {"loop": False, "associative": True}
# The modules whose mamba_selective_scan is matched; transformers 5.x defines the same function in each.
MODULES = (
    "transformers.models.mamba.modeling_mamba",
    "transformers.models.falcon_mamba.modeling_falcon_mamba",
    "transformers.models.jamba.modeling_jamba",
    "transformers.models.zamba.modeling_zamba",
)
ORIGINAL = inspect.unwrap(modeling_mamba.mamba_selective_scan)


class LogitsOnly(MambaForCausalLM):
    """MambaForCausalLM returning only its logits (the testing helpers compare tensors); the module
    paths, and so the site ids, are those of MambaForCausalLM."""

    def forward(self, input_ids):
        return super().forward(input_ids).logits


def _config(associative: bool, layers: int = LAYERS) -> MambaConfig:
    return MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=layers,
                       use_associative_scan=associative)


def _model(path: str, cls=MambaForCausalLM, seed: int = 0, layers: int = LAYERS) -> MambaForCausalLM:
    torch.manual_seed(seed)
    return cls(_config(PATHS[path], layers)).eval()


def _ids(batch: int = 2, length: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _scan_nodes(gm: torch.fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SCAN_TARGETS]


def _untouched_copy(fn: types.FunctionType) -> types.FunctionType:
    """A new function object running `fn`'s code: Dynamo traces it as written (the substitution is
    keyed by the identity of the original object)."""
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


@pytest.fixture(autouse=True)
def substituted():
    install_scan_substitutions()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- matching --------------------------------------------------------------------------------------


def test_family_matches_exactly_the_transformers_modules_of_this_form():
    family = scan_substitutions._family_for_module
    for name in MODULES:
        assert family(name).name == "transformers_mamba", name
    for name in ("transformers.models.mamba", "transformers.models.mamba2.modeling_mamba2",
                 "transformers.models.mamba.modular_mamba", "x.transformers.models.mamba.modeling_mamba"):
        assert family(name) is None, name


def test_every_matched_module_defines_the_same_function_and_each_is_substituted():
    import importlib

    def body(fn):  # the source without its decorator lines
        source = inspect.getsource(inspect.unwrap(fn))
        return source[source.index("def mamba_selective_scan("):]

    modules = [importlib.import_module(name) for name in MODULES]
    bodies = {m.__name__: body(m.mamba_selective_scan) for m in modules}
    assert len(set(bodies.values())) == 1, f"the modules' functions differ: {sorted(bodies)}"
    names = install_scan_substitutions()
    for m in modules:
        assert f"{m.__name__}.mamba_selective_scan" in names
        assert m.mamba_selective_scan is not inspect.unwrap(m.mamba_selective_scan)  # decorated: unwrapped


@pytest.mark.parametrize("module_name", MODULES)
def test_each_module_function_traces_as_one_node_and_matches_its_original(module_name):
    import importlib

    module = importlib.import_module(module_name)
    u, dt, A, B, C, D, z, bias = _scan_args(torch.float32, length=12)

    def call(u, dt, A, B, C, D, z, bias):
        return module.mamba_selective_scan(u, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)

    args = (u, dt, A, B, C, D, z, bias)
    explained = torch._dynamo.explain(call)(*args)
    assert explained.graph_break_count == 0 and len(_scan_nodes(explained.graphs[0])) == 1
    actual = torch.compile(call, backend="eager", fullgraph=True)(*args)
    expected = inspect.unwrap(module.mamba_selective_scan)(*args[:5], D=D, z=z, delta_bias=bias, delta_softplus=True)
    assert actual.dtype == expected.dtype
    assert_scan_close(actual, expected, torch.float32, module_name)


def _falcon_mamba():
    return transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=LAYERS))


def _jamba():  # layer 0 Mamba, layer 1 attention
    return transformers.JambaForCausalLM(transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mamba_d_state=STATE, mamba_expand=2, mamba_dt_rank=4,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        num_experts_per_tok=1, use_mamba_kernels=False))


@pytest.mark.parametrize("build, mixers", [
    (_falcon_mamba, [f"backbone.layers.{i}.mixer" for i in range(LAYERS)]),
    (_jamba, ["model.layers.0.mamba"]),
], ids=["falcon_mamba", "jamba"])
def test_other_transformers_models_trace_one_scan_node_per_mamba_layer(build, mixers):
    """Zamba's function is matched too (above); a small Zamba model is not built here (its config's
    shared-attention weight tying does not validate at this size)."""
    torch.manual_seed(0)
    explained = torch._dynamo.explain(build().eval())(_ids())
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    paths = [list(n.meta["nn_module_stack"].values())[-1][0] for g in explained.graphs for n in _scan_nodes(g)]
    assert len(paths) == len(mixers) and all(p.endswith(m) for p, m in zip(paths, mixers)), paths


# --- the model: graph, sites, backend --------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_model_traces_without_graph_breaks_one_scan_node_per_layer(path):
    model = _model(path)
    sizes = []
    for length in (SEQ, 2 * SEQ):
        explained = torch._dynamo.explain(model)(_ids(length=length))
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        (graph,) = explained.graphs
        nodes = _scan_nodes(graph)
        assert len(nodes) == LAYERS
        mixers = [list(n.meta["nn_module_stack"].values())[-1] for n in nodes]
        assert [cls for _, cls in mixers] == [MambaMixer] * LAYERS
        assert [p.endswith(f"backbone.layers.{i}.mixer") for i, (p, _) in enumerate(mixers)] == [True] * LAYERS
        assert not any("associative_scan" in str(n.target) for n in graph.graph.nodes)
        sizes.append(len(graph.graph.nodes))
    assert sizes[0] == sizes[1], f"graph size depends on L (loop unrolled?): {sizes}"


@pytest.mark.parametrize("path", PATHS)
def test_calibrate_finds_one_site_per_mixer(path):
    profile = vc.calibrate(_model(path), [_ids(), _ids(seed=1)], progress=False)
    assert sorted(profile.signatures) == SITES
    for site in SITES:
        signature = profile.signatures[site]
        assert (signature.dim, signature.state, signature.groups) == (CHANNELS, STATE, 1)
        forms = (signature.b_form, signature.c_form, signature.has_D, signature.has_z)
        assert forms == ("shared", "shared", True, True)
        assert profile.stats[site].impact.count == 2


@pytest.mark.parametrize("path", PATHS)
def test_compiled_without_selection_matches_eager(path):
    model, ids = _model(path, LogitsOnly), _ids()
    with torch.no_grad():
        expected = model(ids)
        actual = torch.compile(model, backend="vmeanba")(ids)
    assert actual.dtype == expected.dtype
    rtol, atol = MODEL_TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", PATHS)
def test_rewrite_of_every_site_matches_the_eager_rewrite(path):
    model, ids = _model(path, LogitsOnly), _ids()
    rewritten = assert_backend_matches_eager(model, ids, sites=SITES)
    with torch.no_grad():
        original = model(ids)
    # The rewrite ran: reducing every site changes the logits beyond the backend's tolerance.
    assert (rewritten - original).abs().max() > 10 * MODEL_TOLERANCES[torch.float32][1]


def test_bfloat16_model_compiled_matches_eager():
    model, ids = _model("loop").to(torch.bfloat16), _ids()
    with torch.no_grad():
        expected = model(ids)
        actual = torch.compile(model, backend="vmeanba")(ids)
    assert actual.logits.dtype == expected.logits.dtype == torch.float32  # the LM head's .float()
    rtol, atol = MODEL_TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(actual.logits, expected.logits, rtol=rtol, atol=atol)


# --- training --------------------------------------------------------------------------------------


def _training_pair(path: str, layers: int = LAYERS):
    torch.manual_seed(1)
    first = LogitsOnly(_config(PATHS[path], layers)).train()
    second = copy.deepcopy(first)
    targets = torch.randint(0, VOCAB, (2 * SEQ,), generator=torch.Generator().manual_seed(2))
    return first, second, _ids(), targets


def _flat(forward):
    return lambda ids: forward(ids).reshape(-1, VOCAB)


@pytest.mark.parametrize("path", PATHS)
def test_training_through_the_compiled_graph_follows_eager_training(path):
    """No selection, the backend's graph run without Inductor (Inductor: the slow test below):
    gradients through the op equal those of transformers' loop."""
    eager_model, compiled_model, ids, targets = _training_pair(path)
    compiled = torch.compile(compiled_model, backend="vmeanba", fullgraph=True, options={"inductor": False})
    losses = {
        "eager": training_losses(_flat(eager_model), eager_model, ids, targets),
        "compiled": training_losses(_flat(compiled), compiled_model, ids, targets),
    }
    assert losses["compiled"][-1] < losses["compiled"][0], losses
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_training_through_the_rewritten_model_reduces_the_loss_like_eager(path):
    """Every site rewritten, without Inductor. The rewrite changes the model by design; on this
    random-init model its outputs stay close (channel variance is small), so its losses follow
    eager training of the unreduced model within 1e-3."""
    eager_model, compiled_model, ids, targets = _training_pair(path)
    compiled = torch.compile(compiled_model, backend="vmeanba", fullgraph=True,
                             options={"sites": SITES, "inductor": False})
    losses = {
        "eager": training_losses(_flat(eager_model), eager_model, ids, targets),
        "rewritten": training_losses(_flat(compiled), compiled_model, ids, targets),
    }
    assert losses["rewritten"][-1] < losses["rewritten"][0], losses
    torch.testing.assert_close(torch.tensor(losses["rewritten"]), torch.tensor(losses["eager"]), rtol=1e-3, atol=1e-3)


@pytest.mark.extended  # forward and backward graphs of the model through Inductor
def test_training_through_inductor_with_the_rewrite_follows_the_eager_rewrite():
    """MambaMixer hands the scan transposed views (u, B, C, z): the backward's gradients must come
    back in the layout Inductor expects (the fake kernel's; commit 3579d27). One layer, to keep the
    Inductor compilation of forward and backward short."""
    first, second, ids, targets = _training_pair("loop", layers=1)
    sites = SITES[:1]
    losses = {
        name: training_losses(
            _flat(torch.compile(model, backend="vmeanba", options={"sites": sites, "inductor": inductor})),
            model, ids, targets,
        )
        for name, model, inductor in (("eager_rewrite", first, False), ("compiled", second, True))
    }
    assert losses["compiled"][-1] < losses["compiled"][0], losses
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager_rewrite"]),
                               rtol=1e-4, atol=1e-4)


# --- the polyfill against transformers' function: dtypes, last state, declines ---------------------


def _scan_args(dtype, batch=2, dim=8, state=4, length=12, *, dt_dtype=None, A_dtype=torch.float32,
               D_dtype=torch.float32, z_dtype=None, bias_dtype=torch.float32):
    """Arguments in MambaMixer's forms: B and C (batch, N, L) as transposed views of (batch, L, N)."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(batch, dim, length, generator=g).to(dtype)
    dt = (torch.randn(batch, dim, length, generator=g) * 0.5).to(dt_dtype or dtype)
    A = (-torch.rand(dim, state, generator=g) - 0.2).to(A_dtype)
    B = torch.randn(batch, length, state, generator=g).to(dtype).transpose(1, 2)
    C = torch.randn(batch, length, state, generator=g).to(dtype).transpose(1, 2)
    D = torch.randn(dim, generator=g).to(D_dtype) if D_dtype is not None else None
    z = torch.randn(batch, dim, length, generator=g).to(z_dtype or dtype) if z_dtype is not False else None
    bias = (torch.rand(dim, generator=g) - 1.0).to(bias_dtype)
    return u, dt, A, B, C, D, z, bias


def _caller(fn, associative: bool, return_last_state: bool = True):
    def call(u, dt, A, B, C, D, z, bias):
        return fn(u, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                  return_last_state=return_last_state, use_associative_scan=associative)

    return call


# (u, dt, A, D, z): MambaMixer passes float32 A, D and delta_bias whatever the model's dtype.
DTYPE_CASES = {
    "float32": dict(dtype=torch.float32),
    "bfloat16 model": dict(dtype=torch.bfloat16),  # out float32: promoted by the float32 D
    "bfloat16 no D, no z": dict(dtype=torch.bfloat16, D_dtype=None, z_dtype=False),  # out bfloat16
    "bfloat16 D and z": dict(dtype=torch.bfloat16, D_dtype=torch.bfloat16),  # out bfloat16
    "float16 A": dict(dtype=torch.float16, A_dtype=torch.float16, D_dtype=None),  # out float16
    "float64 A": dict(dtype=torch.float32, A_dtype=torch.float64),  # state float64, out float32
    # last state: float64 on the loop path (its zeros start in u's dtype), float32 on the associative one
    "float64 u, float32 dt": dict(dtype=torch.float64, dt_dtype=torch.float32),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", DTYPE_CASES)
def test_output_and_last_state_dtypes_and_values_follow_the_original(path, case):
    associative = PATHS[path]
    args = _scan_args(**DTYPE_CASES[case])
    # Through the module attribute (transformers' wrapper), as MambaMixer calls it.
    actual_y, actual_state = torch.compile(_caller(modeling_mamba.mamba_selective_scan, associative),
                                           backend="eager", fullgraph=True)(*args)
    if associative:  # eager execution never takes this path: trace an untouched copy of the original
        torch._dynamo.reset()
        expected = torch.compile(_caller(_untouched_copy(ORIGINAL), True), backend="eager")(*args)
    else:
        expected = _caller(ORIGINAL, False)(*args)
    assert actual_y.dtype == expected[0].dtype, "output dtype"
    assert actual_state.dtype == expected[1].dtype, "last state dtype"
    # Values: against transformers' function on the same values in float64 (its own rounding in
    # half precision is coarser than ours: it rounds the state to u's dtype before every C product).
    oracle_y, oracle_state = _caller(ORIGINAL, False)(*(None if t is None else t.double() for t in args))
    assert_scan_close(actual_y, oracle_y, actual_y.dtype, f"{case} y")
    assert_scan_close(actual_state, oracle_state, actual_state.dtype, f"{case} last state")
    if case == "float32":  # and the original itself, in float32
        assert_scan_close(actual_y, expected[0], torch.float32, "y against the original")
        assert_scan_close(actual_state, expected[1], torch.float32, "last state against the original")


@pytest.mark.parametrize("path", PATHS)
def test_last_state_in_the_models_cache_matches_eager(path):
    """MambaForCausalLM in eval mode makes a cache by default: its mixers ask for the last state."""
    model, ids = _model(path), _ids()
    with torch.no_grad():
        expected = model(ids, use_cache=True)
        actual = torch.compile(model, backend="vmeanba")(ids, use_cache=True)
    for layer in range(LAYERS):
        a = actual.cache.get_recurrent_state(layer, state_idx=0)
        e = expected.cache.get_recurrent_state(layer, state_idx=0)
        assert a.shape == e.shape == (2, CHANNELS, STATE) and a.dtype == e.dtype
        rtol, atol = MODEL_TOLERANCES[torch.float32]
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def _declined(call, args) -> None:
    """`call` traces without the op (the original's code instead) and gives the original's result."""
    explained = torch._dynamo.explain(call)(*args)
    assert sum(len(_scan_nodes(gm)) for gm in explained.graphs) == 0
    torch._dynamo.reset()
    actual = torch.compile(call, backend="eager")(*args)
    expected = call(*args)
    assert_scan_close(actual, expected, torch.float32, "declined call")


def test_unknown_keyword_arguments_decline_to_the_original():
    args = _scan_args(torch.float32, length=6)
    seq_idx = torch.zeros(2, 6, dtype=torch.int32)

    def call(u, dt, A, B, C, D, z, bias):
        return ORIGINAL(u, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, seq_idx=seq_idx)

    _declined(call, args)


def test_broadcast_B_declines_to_the_original():
    u, dt, A, B, C, D, z, bias = _scan_args(torch.float32, length=6)

    def call(u, dt, A, B, C, D, z, bias):
        return ORIGINAL(u, dt, A, B[:1], C, D=D, z=z, delta_bias=bias, delta_softplus=True)

    _declined(call, (u, dt, A, B, C, D, z, bias))


def test_C_in_another_dtype_than_u_fails_as_the_original_does():
    args = list(_scan_args(torch.float32, length=6))
    args[4] = args[4].to(torch.bfloat16)
    call = _caller(ORIGINAL, False, return_last_state=False)
    with pytest.raises(RuntimeError) as eager_error:
        call(*args)
    with pytest.raises(RuntimeError) as compiled_error:
        torch.compile(call, backend="eager")(*args)
    # eager: "expected scalar type Float but found BFloat16"; traced: the same, with torch.* names
    assert "expected scalar type" in str(eager_error.value)
    assert "expected scalar type" in str(compiled_error.value)

