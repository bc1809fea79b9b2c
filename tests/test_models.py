"""The reference VMamba models: configs, shapes, gradients, cross-scan algebra, one scan per SS2D."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from vmeanba_compiler.models import (
    MODEL_CONFIGS,
    SS2D,
    VMamba,
    VMambaConfig,
    VSSBlock,
    build_vmamba,
    cross_merge,
    cross_scan,
)
from vmeanba_compiler.models import ss2d as ss2d_module

SCAN_TARGETS = (torch.ops.vmeanba.selective_scan, torch.ops.vmeanba.selective_scan.default)


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_ss2d(model: torch.nn.Module) -> int:
    return sum(isinstance(m, SS2D) for m in model.modules())


def _explain_scan_nodes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(graph breaks, selective_scan nodes) of Dynamo's capture of model(x)."""
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    nodes = sum(
        node.op == "call_function" and node.target in SCAN_TARGETS
        for graph in explanation.graphs
        for node in graph.graph.nodes
    )
    return explanation.graph_break_count, nodes


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_named_config_builds(name: str) -> None:
    config = MODEL_CONFIGS[name]
    model = build_vmamba(name)
    assert isinstance(model, VMamba) and model.config == config
    assert _count_ss2d(model) == sum(config.depths)
    assert sum(isinstance(m, VSSBlock) for m in model.modules()) == sum(config.depths)
    assert model.head.out_features == config.num_classes


# Exact parameter counts; the README's model table states them rounded (22.9M, ..., 90k).
PARAMETER_COUNTS = {
    "vmamba_v0_tiny": 22_893_448,  # published: 22.9M
    "vmamba_v2_tiny": 30_713_896,  # published: 30.7M
    "vmamba_v2_small": 50_163_496,  # published: 50.2M
    "vmamba_v2_base": 88_578_792,  # published: 88.6M
    "vmamba_digits": 89_818,
}


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_exact(name: str) -> None:
    assert _param_count(build_vmamba(name)) == PARAMETER_COUNTS[name]


def _readme_params_column() -> dict[str, str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(vmamba_\w+)` \|.*\| ([^|]+?) \|$", readme, flags=re.M)
    return dict(rows)


def test_readme_states_the_parameter_counts() -> None:
    column = _readme_params_column()
    for name, count in PARAMETER_COUNTS.items():
        stated = column[name].split()[0]
        expected = f"{count / 1e6:.1f}M" if count >= 1e6 else f"{round(count / 1e3)}k"
        assert stated == expected, (name, column[name], count)


def test_published_defaults() -> None:
    for name in ("vmamba_v0_tiny", "vmamba_v2_tiny", "vmamba_v2_small", "vmamba_v2_base"):
        config = MODEL_CONFIGS[name]
        assert (config.num_classes, config.in_chans) == (1000, 3)
    v0, v2 = MODEL_CONFIGS["vmamba_v0_tiny"], MODEL_CONFIGS["vmamba_v2_tiny"]
    assert (v0.d_state, v0.gated, v0.mlp_ratio, v0.patch_embed, v0.downsample) == (16, True, 0.0, "v0", "v0")
    assert (v2.d_state, v2.gated, v2.mlp_ratio, v2.patch_embed, v2.downsample) == (1, False, 4.0, "v2", "v2")


def test_config_is_frozen_and_validated() -> None:
    config = VMambaConfig(depths=[1, 2])
    assert config.depths == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.embed_dim = 8  # type: ignore[misc]
    with pytest.raises(ValueError):
        VMambaConfig(downsample="v9")
    with pytest.raises(ValueError):
        VMambaConfig(depths=())
    with pytest.raises(KeyError):
        build_vmamba("no_such_model")


def test_build_overrides() -> None:
    model = build_vmamba("vmamba_mini", num_classes=3, in_chans=1)
    assert model.config.num_classes == 3 and model.config.in_chans == 1
    assert MODEL_CONFIGS["vmamba_mini"].num_classes == 10  # the registry is not mutated
    assert build_vmamba(MODEL_CONFIGS["vmamba_mini"], embed_dim=8).config.embed_dim == 8


def test_mini_forward_shape_and_finite() -> None:
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini")
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("style", ["v0", "v2"])
@pytest.mark.parametrize("size", [8, 7])
def test_mini_on_small_single_channel_images(style: str, size: int) -> None:
    """8x8 digits-like inputs (and odd sizes) must not break PatchMerging or the v2 convs."""
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini", in_chans=1, patch_embed=style, downsample=style).eval()
    logits = model(torch.randn(3, 1, size, size))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_mini_patch_size_two_on_digits() -> None:
    model = build_vmamba("vmamba_mini", in_chans=1, patch_size=2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mini_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini")
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 4, 3, 6), (1, 2, 7, 2)])
def test_cross_merge_is_adjoint_of_cross_scan(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    batch, dim, height, width = shape
    xs = cross_scan(x)
    assert xs.shape == (batch, 4, dim, height * width)
    torch.testing.assert_close(cross_merge(xs, height, width), 4 * x)


def test_cross_scan_routes() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    routes = cross_scan(x)[0, :, 0].tolist()
    assert routes == [
        [0, 1, 2, 3, 4, 5],  # row-major
        [0, 3, 1, 4, 2, 5],  # column-major
        [5, 4, 3, 2, 1, 0],  # row-major reversed
        [5, 2, 4, 1, 3, 0],  # column-major reversed
    ]


def test_ss2d_init() -> None:
    op = SS2D(32, d_state=4, ssm_ratio=2.0, gated=True)
    assert op.dt_rank == 2 and op.d_inner == 64
    assert op.x_proj_weight.shape == (4, 2 + 2 * 4, 64)
    assert op.dt_projs_weight.shape == (4, 64, 2)
    torch.testing.assert_close(op.A_logs, torch.log(torch.arange(1.0, 5.0)).repeat(4 * 64, 1))
    torch.testing.assert_close(op.Ds, torch.ones(4 * 64))
    dt = torch.nn.functional.softplus(op.dt_projs_bias.detach())
    assert dt.shape == (4 * 64,)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_one_scan_call_per_ss2d_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ss2d_module.selective_scan

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ss2d_module, "selective_scan", counting)
    model = build_vmamba("vmamba_mini").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == _count_ss2d(model) == 2
    # K*d_inner channels: 4 * 2 * 16 at 8x8, then 4 * 2 * 32 at 4x4.
    assert calls == [(1, 128, 64), (1, 256, 16)]


def test_mini_traces_to_one_scan_node_per_ss2d() -> None:
    model = build_vmamba("vmamba_mini").eval()
    breaks, nodes = _explain_scan_nodes(model, torch.randn(2, 3, 32, 32))
    assert breaks == 0
    assert nodes == _count_ss2d(model)


def test_v0_tiny_traces_to_one_scan_node_per_ss2d() -> None:
    """Shape-only check at the published resolution (about 5 s on 2 CPU cores)."""
    model = build_vmamba("vmamba_v0_tiny").eval()
    breaks, nodes = _explain_scan_nodes(model, torch.randn(1, 3, 224, 224))
    assert breaks == 0
    assert nodes == _count_ss2d(model) == 15
