"""vmeanba-compiler: a torch.compile backend for VMeanba (arXiv 2412.16602).

`torch.compile(model, backend="vmeanba")` works without importing this package (the backend is
registered through the `torch_dynamo_backends` entry point). Importing it gives the drop-in
selective scan, calibration, profiles, `explain` and the reference VMamba models.
"""

__version__ = "0.1.0"

from .calibration import CalibrationError, calibrate
from .config import VMeanbaConfig
from .explain import ExplainReport, explain
from .ops import selective_scan
from .profile import Profile, ProfileMismatchError

__all__ = [
    "__version__",
    "CalibrationError",
    "ExplainReport",
    "Profile",
    "ProfileMismatchError",
    "VMeanbaConfig",
    "calibrate",
    "explain",
    "selective_scan",
]
