"""VMamba image classifiers (Liu et al., "VMamba: Visual State Space Model", 2024) in pure PyTorch.

Written for this project: every SS2D calls `vmeanba_compiler.ops.selective_scan` once, so
`torch.compile(model, backend="vmeanba")` sees one scan node per block. Published shapes:

- vmamba_v0_tiny  : embed 96,  depths (2, 2, 9, 2),  d_state 16, ssm_ratio 2, z gate, no MLP,
                    4x4 patch conv stem, PatchMerging downsampling (~22-23M params).
- vmamba_v2_tiny  : embed 96,  depths (2, 2, 5, 2),  d_state 1, ssm_ratio 2, no gate, MLP ratio 4,
                    two-conv stem, 3x3 stride-2 conv downsampling.
- vmamba_v2_small : as v2 tiny, depths (2, 2, 15, 2).
- vmamba_v2_base  : as v2 small, embed 128.

`vmamba_mini` is a miniature (two stages of one block, embed 16) for tests and CPU experiments.
`vmamba_digits` is the bundled real-data model: 8x8 grey digits, 1x1 patches (so stage 0 scans
L = 64 pixels), two stages of two blocks = four scan sites (see `vmeanba_compiler.training`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from torch import Tensor, nn

from .layers import PatchMerging2D, VSSBlock, conv_downsample, patch_embed_v0, patch_embed_v2

STYLES = ("v0", "v2")


@dataclass(frozen=True)
class VMambaConfig:
    """Hyperparameters of one VMamba variant; stage i has embed_dim * 2**i channels."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 9, 2)
    d_state: int = 16
    ssm_ratio: float = 2.0
    mlp_ratio: float = 0.0
    gated: bool = True  # y * silu(z) after the scan (v0); v2 drops the z branch
    patch_embed: str = "v0"  # "v0": one 4x4 stride-4 conv; "v2": two 3x3 stride-2 convs
    downsample: str = "v0"  # "v0": PatchMerging2D; "v2": 3x3 stride-2 conv + LayerNorm
    patch_size: int = 4  # v0 stem only (v2 stem is always stride 4)
    dt_rank: Union[int, str] = "auto"  # "auto" = ceil(C / 16) per stage
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be a non-empty sequence of positive ints, got {self.depths}")
        for field in ("patch_embed", "downsample"):
            if getattr(self, field) not in STYLES:
                raise ValueError(f"{field} must be one of {STYLES}, got {getattr(self, field)!r}")
        if self.patch_embed == "v2" and self.patch_size != 4:
            raise ValueError("the v2 stem has a fixed stride of 4; use patch_embed='v0' for other patch sizes")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")

    @property
    def dims(self) -> tuple[int, ...]:
        """Channel width of each stage."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


_V2 = dict(d_state=1, ssm_ratio=2.0, mlp_ratio=4.0, gated=False, patch_embed="v2", downsample="v2")

MODEL_CONFIGS: dict[str, VMambaConfig] = {
    "vmamba_v0_tiny": VMambaConfig(embed_dim=96, depths=(2, 2, 9, 2), d_state=16, ssm_ratio=2.0),
    "vmamba_v2_tiny": VMambaConfig(embed_dim=96, depths=(2, 2, 5, 2), **_V2),
    "vmamba_v2_small": VMambaConfig(embed_dim=96, depths=(2, 2, 15, 2), **_V2),
    "vmamba_v2_base": VMambaConfig(embed_dim=128, depths=(2, 2, 15, 2), **_V2),
    "vmamba_mini": VMambaConfig(
        embed_dim=16, depths=(1, 1), d_state=4, ssm_ratio=2.0, mlp_ratio=2.0, num_classes=10
    ),
    "vmamba_digits": VMambaConfig(
        embed_dim=24, depths=(2, 2), d_state=4, ssm_ratio=2.0, mlp_ratio=2.0, patch_size=1,
        in_chans=1, num_classes=10,
    ),
}


class VMamba(nn.Module):
    """Stem -> stages of VSS blocks with downsampling between them -> LayerNorm, pool, Linear.

    Input: images (B, in_chans, H, W). Output: logits (B, num_classes).
    """

    def __init__(self, config: VMambaConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        if config.patch_embed == "v0":
            self.patch_embed = patch_embed_v0(config.in_chans, config.embed_dim, config.patch_size)
        else:
            self.patch_embed = patch_embed_v2(config.in_chans, config.embed_dim)

        # Stochastic depth grows linearly with block index across the whole network.
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, config.depths)):
            start = sum(config.depths[:i])
            blocks = [
                VSSBlock(
                    dim,
                    d_state=config.d_state,
                    ssm_ratio=config.ssm_ratio,
                    mlp_ratio=config.mlp_ratio,
                    gated=config.gated,
                    dt_rank=config.dt_rank,
                    drop_path=rates[start + j],
                )
                for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
            if i + 1 < len(dims):
                merge = PatchMerging2D if config.downsample == "v0" else conv_downsample
                self.downsamples.append(merge(dim, dims[i + 1]))

        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal Linear weights (ViT/Swin practice); SS2D's scan parameters are
        plain Parameters with their own Mamba-style init and are left alone."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> last-stage features, channels-last (B, h, w, dims[-1])."""
        x = self.patch_embed(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.forward_features(x))
        return self.head(x.mean(dim=(1, 2)))


def build_vmamba(name_or_config: Union[str, VMambaConfig] = "vmamba_v0_tiny", **overrides) -> VMamba:
    """Build a VMamba from a registered name (see MODEL_CONFIGS) or a config, with field overrides,
    e.g. build_vmamba("vmamba_mini", in_chans=1, num_classes=10)."""
    if isinstance(name_or_config, str):
        try:
            config = MODEL_CONFIGS[name_or_config]
        except KeyError:
            raise KeyError(
                f"unknown VMamba config {name_or_config!r}; known: {sorted(MODEL_CONFIGS)}"
            ) from None
    else:
        config = name_or_config
    return VMamba(dataclasses.replace(config, **overrides) if overrides else config)
