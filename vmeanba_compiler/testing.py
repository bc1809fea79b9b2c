"""Test helpers shared by this project's tests and by users checking their own scan kernels.

Everything here is public, so users property-test the rewrite on their own models the way this
project's own tests do:

- `TOLERANCES` and `assert_scan_close`: the one per-dtype tolerance table and the one closeness
  check (STYLE.md items 6 and 8). A failure is always an AssertionError that says how far off the
  result is and where; it is never turned into a warning.
- `scan_inputs`: a hypothesis strategy for selective-scan arguments in every form docs/DESIGN.md
  section 1 allows. hypothesis is imported only when the strategy is built, so the closeness
  helpers work without it. `small_vmamba_models` draws small SS2D-style models.
- `vmeanba_formula`: an independent evaluation of docs/DESIGN.md section 2 (explicit loop over
  groups, the plain reference scan), and `assert_rewrite_matches_formulas` comparing what the
  rewrite inserts against it.
- `assert_backend_matches_eager`: a model compiled with `backend="vmeanba"` against eager
  execution of the same rewrite (and against the unmodified model when nothing is selected).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "MODEL_TOLERANCES",
    "TOLERANCES",
    "ScanInputs",
    "assert_backend_matches_eager",
    "assert_rewrite_matches_formulas",
    "assert_scan_close",
    "scan_inputs",
    "site_groups",
    "small_vmamba_models",
    "training_losses",
    "vmeanba_formula",
]

# (rtol, atol) for comparing a fast implementation's output against the reference, keyed by the
# dtype of the value compared (y: u's dtype; last_state: the math dtype, float32 or float64).
#
# Why these numbers: every implementation computes in float32 (float64 for float64 inputs), so
# the only error in float32 results is float32 rounding accumulated over the L-step recurrence and
# the N-term output sum (a few hundred roundings for the shapes we test, plus the fast path's
# vectorised exp, a few ulp), and cancellation in C.h makes part of it absolute, hence atol.
# float16/bfloat16 outputs are computed in float32 and rounded once at the end, so their error is
# half an ulp of the output dtype (rtol = eps covers it with a factor 2) plus the float32 error,
# which an atol of eps dwarfs for outputs of order one. float64 differs from a float64 reference
# only by reassociation and libm vs. libmvec exp.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (torch.finfo(torch.float16).eps, torch.finfo(torch.float16).eps),  # ~9.8e-4
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, torch.finfo(torch.bfloat16).eps),  # ~7.8e-3
}


# (rtol, atol) for a whole model compiled with backend="vmeanba" against eager execution of the
# same (possibly rewritten) computation. Wider than TOLERANCES: Inductor fuses and reorders the
# surrounding work (LayerNorm and matmul reductions, fused elementwise chains), and for
# bfloat16/float16 it keeps fused intermediates in float32 where eager rounds after every op, so
# differences of a few output ulps accumulate through the network's depth.
MODEL_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def _format_index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))


def assert_scan_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, (rtol, atol) from
    `TOLERANCES[dtype]`.

    `dtype` names the precision the result was produced in (not necessarily either tensor's
    dtype: the expected value is usually a float64 oracle). Both tensors are compared in float64,
    so a float16 result can be checked against a float64 reference directly. NaN never matches
    anything (a NaN in a result is a bug, e.g. a read of memory the kernel never wrote); equal
    infinities match. On failure raises AssertionError naming `what`, the number of mismatches,
    the worst element (index, values, errors) and the largest absolute and relative errors.
    """
    if dtype not in TOLERANCES:
        raise KeyError(f"assert_scan_close: no tolerance for {dtype}; known: {list(TOLERANCES)}")
    rtol, atol = TOLERANCES[dtype]
    label = f"{what}: " if what else ""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{label}shape {tuple(actual.shape)} differs from the expected {tuple(expected.shape)}"
        )
    if actual.numel() == 0:
        return
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    bad = ~((diff <= allowed) | (a == e))  # NaN compares false, so it is always bad
    if not bool(bad.any()):
        return
    # Rank mismatches by how many times over the allowance they are; NaN ranks worst.
    excess = torch.where(bad, (diff / allowed).nan_to_num(nan=math.inf), torch.zeros_like(diff))
    abs_err = diff.flatten()
    rel_err = (diff / e.abs()).flatten()
    worst = int(excess.flatten().argmax())
    max_abs = int(abs_err.nan_to_num(nan=math.inf).argmax())
    max_rel = int(rel_err.nan_to_num(nan=math.inf).argmax())
    shape = tuple(a.shape)
    flat_a, flat_e = a.flatten(), e.flatten()
    raise AssertionError(
        f"{label}{int(bad.sum())} of {a.numel()} elements differ beyond rtol={rtol:g}, "
        f"atol={atol:g} ({dtype}).\n"
        f"  worst at {_format_index(worst, shape)}: actual {flat_a[worst].item()!r}, "
        f"expected {flat_e[worst].item()!r} (abs err {abs_err[worst].item():.3g}, "
        f"rel err {rel_err[worst].item():.3g})\n"
        f"  max abs err {abs_err[max_abs].item():.3g} at {_format_index(max_abs, shape)}; "
        f"max rel err {rel_err[max_rel].item():.3g} at {_format_index(max_rel, shape)}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ScanInputs:
    """One call's arguments to the selective scan (docs/DESIGN.md section 1).

    `args()` gives them positionally in the op's order (`torch.ops.vmeanba.selective_scan(*args)`,
    the reference, `scan_cpu.forward`); `kwargs()` by name for `vmeanba_compiler.selective_scan`.
    `seed` is the torch.Generator seed the values were drawn with (for reading failures; it is
    not an argument).
    """

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor] = None
    z: Optional[Tensor] = None
    delta_bias: Optional[Tensor] = None
    delta_softplus: bool = False
    seed: Optional[int] = None

    _TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def args(self) -> tuple[Any, ...]:
        """(u, delta, A, B, C, D, z, delta_bias, delta_softplus)."""
        return (*(getattr(self, name) for name in self._TENSORS), self.delta_softplus)

    def kwargs(self) -> dict[str, Any]:
        """The same arguments by name (without return_last_state)."""
        return {**{name: getattr(self, name) for name in self._TENSORS}, "delta_softplus": self.delta_softplus}

    def to(self, dtype: torch.dtype) -> "ScanInputs":
        """Every tensor cast to `dtype`: the float64 copy is the oracle's input, computed from the
        very values the lower-precision call saw."""
        cast = {
            name: (None if t is None else t.to(dtype))
            for name, t in ((n, getattr(self, n)) for n in self._TENSORS)
        }
        return dataclasses.replace(self, **cast)

    def __repr__(self) -> str:
        def describe(t: Optional[Tensor]) -> str:
            return "None" if t is None else f"{tuple(t.shape)}"

        parts = ", ".join(f"{name}={describe(getattr(self, name))}" for name in self._TENSORS)
        return (
            f"ScanInputs({parts}, delta_softplus={self.delta_softplus}, "
            f"dtype={self.u.dtype}, seed={self.seed})"
        )


_FORMS = ("grouped", "shared", "fixed")
_DEFAULT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _import_hypothesis():
    try:
        from hypothesis import strategies
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "vmeanba_compiler.testing.scan_inputs needs hypothesis: "
            "pip install 'vmeanba-compiler[test]'"
        ) from exc
    return strategies


def _projection(form: str, groups: int, batch: int, dim: int, state: int, length: int, gen) -> Tensor:
    shape = {
        "grouped": (batch, groups, state, length),
        "shared": (batch, state, length),
        "fixed": (dim, state),
    }[form]
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def scan_inputs(
    max_batch: int = 2,
    max_dim: int = 16,
    max_state: int = 8,
    max_length: int = 40,
    dtypes: Sequence[torch.dtype] = _DEFAULT_DTYPES,
    forms: Sequence[str] = _FORMS,
):
    """A hypothesis strategy of `ScanInputs` covering the argument forms of docs/DESIGN.md section 1.

    Drawn independently: batch, dim = groups * channels_per_group, the form of B and of C (each
    with its own group count, a divisor of dim, when grouped), N, L, dtype, and whether D, z and
    delta_bias are given and delta_softplus is set. Values come from a torch.Generator seeded by
    a drawn integer, so every example replays exactly (the global RNG is never touched):
    u, B, C, D, z ~ randn; A = -exp(0.5 * randn) (negative: a decaying state); the raw delta is
    0.5 * randn with softplus, 0.5 * rand + 0.01 without, and delta_bias keeps dt positive
    without softplus, so dt stays moderate and the recurrence neither explodes nor vanishes.
    Values are drawn in float64 and cast to the drawn dtype.
    """
    st = _import_hypothesis()
    unknown = set(forms) - set(_FORMS)
    if unknown or not forms:
        raise ValueError(f"scan_inputs: forms must be a non-empty subset of {_FORMS}, got {forms}")

    @st.composite
    def draw_inputs(draw) -> ScanInputs:
        batch = draw(st.integers(1, max_batch))
        groups = draw(st.integers(1, max(1, min(4, max_dim))))
        per_group = draw(st.integers(1, max(1, max_dim // groups)))
        dim = groups * per_group
        divisors = [g for g in range(1, dim + 1) if dim % g == 0]
        state = draw(st.integers(1, max_state))
        length = draw(st.integers(1, max_length))
        dtype = draw(st.sampled_from(tuple(dtypes)))
        b_form, c_form = draw(st.sampled_from(tuple(forms))), draw(st.sampled_from(tuple(forms)))
        b_groups = groups if b_form != "grouped" else draw(st.sampled_from(divisors))
        c_groups = groups if c_form != "grouped" else draw(st.sampled_from(divisors))
        softplus = draw(st.booleans())
        has_d, has_z, has_bias = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        seed = draw(st.integers(0, 2**32 - 1))

        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        u = torch.randn(batch, dim, length, generator=gen, dtype=f64)
        if softplus:
            delta = 0.5 * torch.randn(batch, dim, length, generator=gen, dtype=f64)
        else:
            delta = 0.5 * torch.rand(batch, dim, length, generator=gen, dtype=f64) + 0.01
        A = -torch.exp(0.5 * torch.randn(dim, state, generator=gen, dtype=f64))
        B = _projection(b_form, b_groups, batch, dim, state, length, gen)
        C = _projection(c_form, c_groups, batch, dim, state, length, gen)
        D = torch.randn(dim, generator=gen, dtype=f64) if has_d else None
        z = torch.randn(batch, dim, length, generator=gen, dtype=f64) if has_z else None
        bias = None
        if has_bias:
            raw = torch.randn(dim, generator=gen, dtype=f64) if softplus else torch.rand(dim, generator=gen, dtype=f64)
            bias = 0.5 * raw if softplus else 0.1 * raw
        return ScanInputs(u, delta, A, B, C, D, z, bias, softplus, seed).to(dtype)

    return draw_inputs()


def site_groups(inputs: ScanInputs) -> int:
    """The reduction groups of a call: the lcm of the grouped B/C group counts (1 if none)."""
    groups = 1
    for proj in (inputs.B, inputs.C):
        if proj.dim() == 4:
            groups = math.lcm(groups, proj.shape[1])
    return groups


def _group_projection(proj: Tensor, g: int, groups: int, channels: slice) -> Tensor:
    """B or C as seen by reduced channel g, in a one-channel form of the reference scan."""
    if proj.dim() == 4:  # grouped: reduced channel g lies inside one original group
        source = g * proj.shape[1] // groups
        return proj[:, source : source + 1]
    if proj.dim() == 3:  # shared
        return proj
    return proj[channels].mean(0, keepdim=True)  # fixed rows: averaged like A


def vmeanba_formula(
    inputs: ScanInputs, groups: int, dt_mode: str = "effective", skip_mode: str = "exact"
) -> Tensor:
    """y of a VMeanba-reduced site, evaluated straight from docs/DESIGN.md section 2 in float64.

    One group at a time: average u, dt (the effective step, or raw delta and bias), A and fixed
    B/C rows over the group's channels, run the plain sequential reference scan on that single
    channel, and give its output to every channel of the group; D*u and silu(z) are applied per
    channel ("exact") or averaged into the reduced scan ("mean"). Written independently of
    `vmeanba_compiler.passes.reduced_scan`, which it checks.
    """
    from .lowering.scan_reference import selective_scan_reference

    x = inputs.to(torch.float64)
    batch, dim, length = x.u.shape
    width = dim // groups
    y = torch.empty(batch, dim, length, dtype=torch.float64)
    for g in range(groups):
        ch = slice(g * width, (g + 1) * width)
        dt = x.delta[:, ch] + (0 if x.delta_bias is None else x.delta_bias[ch, None])
        if dt_mode == "effective":
            step = (torch.nn.functional.softplus(dt) if x.delta_softplus else dt).mean(1, keepdim=True)
            bias, softplus = None, False
        else:
            step = x.delta[:, ch].mean(1, keepdim=True)
            bias = None if x.delta_bias is None else x.delta_bias[ch].mean().reshape(1)
            softplus = x.delta_softplus
        mean_skip = skip_mode == "mean"
        D = x.D[ch].mean().reshape(1) if (mean_skip and x.D is not None) else None
        z = x.z[:, ch].mean(1, keepdim=True) if (mean_skip and x.z is not None) else None
        y_g, _ = selective_scan_reference(
            x.u[:, ch].mean(1, keepdim=True), step, x.A[ch].mean(0, keepdim=True),
            _group_projection(x.B, g, groups, ch), _group_projection(x.C, g, groups, ch),
            D, z, bias, softplus,
        )
        y[:, ch] = y_g
    if skip_mode == "exact":
        if x.D is not None:
            y = y + x.D[:, None] * x.u
        if x.z is not None:
            y = y * torch.nn.functional.silu(x.z)
    return y


def assert_rewrite_matches_formulas(
    inputs: ScanInputs, groups: Optional[int] = None, dt_mode: str = "effective", skip_mode: str = "exact"
) -> None:
    """What a rewritten site computes equals `vmeanba_formula` within `TOLERANCES[u.dtype]`,
    and keeps the op's output contract (shape, dtype, contiguity, last-state shape)."""
    from .passes.reduced_scan import reduced_selective_scan

    groups = site_groups(inputs) if groups is None else groups
    y, last_state = reduced_selective_scan(*inputs.args(), groups=groups, dt_mode=dt_mode, skip_mode=skip_mode)
    full_y, full_state = torch.ops.vmeanba.selective_scan(*inputs.args())
    if (y.shape, y.dtype, y.stride()) != (full_y.shape, full_y.dtype, full_y.stride()):
        raise AssertionError(
            f"rewritten output has shape {tuple(y.shape)}, dtype {y.dtype}, stride {y.stride()}; "
            f"the op gives {tuple(full_y.shape)}, {full_y.dtype}, {full_y.stride()}"
        )
    if (last_state.shape, last_state.dtype) != (full_state.shape, full_state.dtype):
        raise AssertionError(
            f"rewritten last state {tuple(last_state.shape)} {last_state.dtype} differs from the "
            f"op's {tuple(full_state.shape)} {full_state.dtype}"
        )
    expected = vmeanba_formula(inputs, groups, dt_mode, skip_mode)
    assert_scan_close(y, expected, inputs.u.dtype, what=f"rewrite vs formulas (groups={groups})")


def assert_backend_matches_eager(model: torch.nn.Module, inputs: Any, **options: Any) -> Tensor:
    """Compile `model` with `backend="vmeanba"` and `options`; assert its output equals eager
    execution of the same rewrite (`inductor=False`) within `MODEL_TOLERANCES`. When `options`
    select no site, also assert the eager rewrite is bit-identical to `model(inputs)`; and assert
    that the compilation rewrote exactly the sites the options select (read from the rewritten
    graph), so a named site left unrewritten fails instead of matching itself.
    Runs under torch.no_grad(); each compilation is traced anew with a backend of its own and
    released afterwards (the process's other compiled code is kept). Returns the output."""
    from .config import VMeanbaConfig
    from .tracing import call_with_inputs, fresh_trace

    config = VMeanbaConfig.from_options(options)
    selects = config.sites or config.threshold is not None or config.top_k is not None
    rewritten: set[str] = set()
    with torch.no_grad():
        with fresh_trace(model, _recording_vmeanba_backend(rewritten), options={**options, "inductor": False}) as traced:
            eager_rewrite = call_with_inputs(traced, inputs)
        _assert_rewrote_exactly(_selected_site_ids(config), rewritten)
        with fresh_trace(model, "vmeanba", options=options) as traced:
            compiled = call_with_inputs(traced, inputs)
        if not selects:
            plain = call_with_inputs(model, inputs)
            if not torch.equal(eager_rewrite, plain):
                raise AssertionError("no site was selected, yet the graph run eagerly differs from the model")
    rtol, atol = MODEL_TOLERANCES[compiled.dtype]
    torch.testing.assert_close(compiled, eager_rewrite, rtol=rtol, atol=atol)
    return compiled


def _assert_rewrote_exactly(expected: set[str], rewritten: set[str]) -> None:
    if rewritten != expected:
        raise AssertionError(
            f"the options select site(s) {sorted(expected)}, but the compilation rewrote {sorted(rewritten)}"
            + (f"; not rewritten: {sorted(expected - rewritten)}" if expected - rewritten else "")
            + (f"; rewritten though not selected: {sorted(rewritten - expected)}" if rewritten - expected else "")
        )


def _recording_vmeanba_backend(rewritten: set[str]) -> Callable:
    """The vmeanba backend (to run with `inductor=False`), adding to `rewritten` the site ids of
    every reduced-scan node in the graphs it returns: what the compilation actually rewrote."""
    from .backend import vmeanba_backend
    from .passes.vmeanba_rewrite import REWRITTEN_SITES_META

    def backend(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Callable:
        run = vmeanba_backend(gm, example_inputs, **kwargs)
        graph = getattr(run, "__self__", None)
        if not isinstance(graph, torch.fx.GraphModule):
            raise AssertionError("the vmeanba backend with inductor=False should return a GraphModule's forward")
        for node in graph.graph.nodes:
            rewritten.update(node.meta.get(REWRITTEN_SITES_META, ()))
        return run

    return backend


def _selected_site_ids(config: Any) -> set[str]:
    """The site ids `config` selects, from the options' documented meaning (README, "Backend
    options"), not from the selection code: named sites; the profile's sites whose metric is at
    most the threshold; the top_k of lowest impact (ties by id)."""
    if config.sites:
        return set(config.sites)
    profile = config.profile
    if config.threshold is not None:
        return {i for i in profile.stats if profile.metric(i, config.metric) <= config.threshold}
    if config.top_k is not None:
        impact = {i: profile.metric(i, "impact") for i in profile.site_ids}
        return set(sorted(impact, key=lambda i: (impact[i], i))[: config.top_k])
    return set()


def training_losses(
    forward: Callable[..., Tensor], model: torch.nn.Module, inputs: Any, targets: Tensor,
    steps: int = 3, lr: float = 0.05,
) -> list[float]:
    """Cross-entropy losses of `steps` SGD steps on one batch, calling `forward` (the model itself,
    or a compiled version of it) and updating `model`'s parameters: compare the histories of an
    eager and a compiled copy to check that training through the backend behaves alike."""
    from .tracing import call_with_inputs

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(call_with_inputs(forward, inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def small_vmamba_models(max_stages: int = 2, max_depth: int = 2):
    """A hypothesis strategy of (model, images): small VMamba models built from the project's
    SS2D blocks with drawn widths, depths, state sizes, gating, MLPs, stem and downsampling
    styles, channels and image sizes. Models are in eval mode with seeded weights."""
    st = _import_hypothesis()
    from .models import VMambaConfig, VMamba

    @st.composite
    def draw_model(draw):
        stages = draw(st.integers(1, max_stages))
        config = VMambaConfig(
            embed_dim=draw(st.sampled_from((4, 8, 12))),
            depths=tuple(draw(st.integers(1, max_depth)) for _ in range(stages)),
            d_state=draw(st.sampled_from((1, 2, 4))),
            ssm_ratio=draw(st.sampled_from((1.0, 2.0))),
            mlp_ratio=draw(st.sampled_from((0.0, 2.0))),
            gated=draw(st.booleans()),
            patch_embed="v0",
            patch_size=draw(st.sampled_from((1, 2))),
            downsample=draw(st.sampled_from(("v0", "v2"))),
            in_chans=draw(st.sampled_from((1, 3))),
            num_classes=draw(st.sampled_from((2, 5))),
        )
        size = draw(st.sampled_from((4, 6, 8)))
        batch = draw(st.integers(1, 2))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            model = VMamba(config).eval()
        images = torch.randn(batch, config.in_chans, size, size, generator=gen)
        return model, images

    return draw_model()
