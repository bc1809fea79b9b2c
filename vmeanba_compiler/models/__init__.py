"""Reference VMamba models whose SS2D blocks call the project's `selective_scan` op.

`build_vmamba("vmamba_v0_tiny")` gives the published v0 tiny classifier; `build_vmamba("vmamba_mini")`
a miniature for tests. See `vmamba.py` for the named shapes. `build_segmenter("vmamba_digits_seg")`
is the VMamba backbone with an FPN decoder (`segmentation.py`), per-pixel logits.
"""

from .layers import VSSBlock
from .segmentation import SEGMENTER_CONFIGS, SegmenterConfig, VMambaSegmenter, build_segmenter
from .ss2d import SS2D, cross_merge, cross_scan
from .vmamba import MODEL_CONFIGS, VMamba, VMambaConfig, build_vmamba

__all__ = [
    "MODEL_CONFIGS",
    "SEGMENTER_CONFIGS",
    "SS2D",
    "SegmenterConfig",
    "VMamba",
    "VMambaConfig",
    "VMambaSegmenter",
    "VSSBlock",
    "build_segmenter",
    "build_vmamba",
    "cross_merge",
    "cross_scan",
]
