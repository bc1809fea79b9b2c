"""A VMamba backbone with a light FPN decoder: per-pixel class logits.

The backbone is `VMamba`'s own stem, stages and downsampling (built by `build_vmamba`, whose
classification norm and head are not used), so the scan sites are the same SS2D call sites
the classifier has and keep their ids ("stages.<i>.<j>.op:0"). The decoder is FPN-style (Lin et
al., "Feature Pyramid Networks for Object Detection", 2017): a 1x1 lateral projection of every
stage, a top-down pass that upsamples the coarser map and adds it, then all levels are
upsampled to the finest one, concatenated and fused by a 3x3 conv. The fused map is upsampled
to the input's resolution and concatenated with the image itself before the classifier, so
pixel-sharp decisions (is there ink here?) need not be recovered from stride-`patch_size`
features.

Logits are channels-last, (B, H, W, num_classes), like every activation of the backbone: the
class axis is the last one, so calibration's KL impact score (over the last axis, averaged over
the rest) is the per-pixel KL averaged over pixels, and `argmax(-1)` is the label map.

`vmamba_digits_seg` is the bundled segmentation model (32x32 digit canvases, 2x2 patches:
stage 0 scans L = 256 tokens; three stages of 2, 2, 1 blocks = five scan sites).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vmamba import VMambaConfig, build_vmamba


@dataclass(frozen=True)
class SegmenterConfig:
    """A backbone config (its num_classes is ignored) plus the decoder's width and the classes."""

    backbone: VMambaConfig
    num_classes: int
    decoder_dim: int = 32


SEGMENTER_CONFIGS: dict[str, SegmenterConfig] = {
    "vmamba_digits_seg": SegmenterConfig(
        backbone=VMambaConfig(embed_dim=16, depths=(2, 2, 1), d_state=4, ssm_ratio=2.0, mlp_ratio=2.0,
                              patch_size=2, in_chans=1),
        num_classes=11,
        decoder_dim=32,
    ),
}


class VMambaSegmenter(nn.Module):
    """Images (B, in_chans, H, W) -> logits (B, H, W, num_classes); H and W divisible by
    patch_size * 2**(stages - 1)."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        backbone = build_vmamba(config.backbone)
        self.patch_embed, self.stages, self.downsamples = backbone.patch_embed, backbone.stages, backbone.downsamples
        width = config.decoder_dim
        self.laterals = nn.ModuleList(nn.Linear(dim, width) for dim in config.backbone.dims)
        levels = len(config.backbone.dims)
        self.fuse = nn.Sequential(nn.Conv2d(levels * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.classifier = nn.Sequential(
            nn.Conv2d(width + config.backbone.in_chans, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, config.num_classes, 1),
        )

    def features(self, x: Tensor) -> list[Tensor]:
        """One channels-last map per stage, finest first."""
        x = self.patch_embed(x)
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            maps.append(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return maps

    def forward(self, images: Tensor) -> Tensor:
        maps = [lateral(m).permute(0, 3, 1, 2) for lateral, m in zip(self.laterals, self.features(images))]
        for i in range(len(maps) - 2, -1, -1):  # top-down: coarse context into finer levels
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        finest = maps[0].shape[-2:]
        fused = self.fuse(torch.cat([maps[0], *(F.interpolate(m, size=finest, mode="bilinear", align_corners=False)
                                                for m in maps[1:])], dim=1))
        fused = F.interpolate(fused, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([fused, images], dim=1)).permute(0, 2, 3, 1)


def build_segmenter(name_or_config: Union[str, SegmenterConfig] = "vmamba_digits_seg",
                    **overrides) -> VMambaSegmenter:
    """Build a segmenter from a registered name (see SEGMENTER_CONFIGS) or a config, with
    field overrides of the SegmenterConfig."""
    if isinstance(name_or_config, str):
        try:
            config = SEGMENTER_CONFIGS[name_or_config]
        except KeyError:
            raise KeyError(f"unknown segmenter config {name_or_config!r}; known: {sorted(SEGMENTER_CONFIGS)}") from None
    else:
        config = name_or_config
    return VMambaSegmenter(dataclasses.replace(config, **overrides) if overrides else config)
