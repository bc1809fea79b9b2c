"""Reference VMamba models whose SS2D blocks call the project's `selective_scan` op.

`build_vmamba("vmamba_v0_tiny")` gives the published v0 tiny classifier; `build_vmamba("vmamba_mini")`
a miniature for tests. See `vmamba.py` for the named shapes.
"""

from .layers import VSSBlock
from .ss2d import SS2D, cross_merge, cross_scan
from .vmamba import MODEL_CONFIGS, VMamba, VMambaConfig, build_vmamba

__all__ = [
    "MODEL_CONFIGS",
    "SS2D",
    "VMamba",
    "VMambaConfig",
    "VSSBlock",
    "build_vmamba",
    "cross_merge",
    "cross_scan",
]
