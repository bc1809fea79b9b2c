"""vmeanba-compiler: a torch.compile backend for VMeanba (arXiv 2412.16602).

`torch.compile(model, backend="vmeanba")` works without importing this package (the backend is
registered through the `torch_dynamo_backends` entry point). Importing it gives the drop-in
selective scan, calibration (in one process or across torch.distributed ranks), profiles, `explain`, selection for an accuracy budget
(`select_for_budget`), accuracy-vs-K curves, pruning, `export` of the rewritten model (packaged to
run without Python by `vmeanba_compiler.deploy`), and the reference VMamba models.
"""

__version__ = "0.1.0"

from .budget import BudgetSelection, select_for_budget
from .calibration import CalibrationError, calibrate
from .config import VMeanbaConfig
from .distributed import calibrate_distributed, merge_across_ranks
from .evaluation import accuracy_vs_k
from .explain import ExplainReport, explain
from .export import export
from .ops import selective_scan
from .profile import Profile, ProfileMismatchError
from .pruning import prune_global_magnitude

__all__ = [
    "__version__",
    "BudgetSelection",
    "CalibrationError",
    "ExplainReport",
    "Profile",
    "ProfileMismatchError",
    "VMeanbaConfig",
    "accuracy_vs_k",
    "calibrate",
    "calibrate_distributed",
    "explain",
    "export",
    "merge_across_ranks",
    "prune_global_magnitude",
    "select_for_budget",
    "selective_scan",
]
