"""Graph passes of the vmeanba backend; `run_passes` applies them in order."""

from .pipeline import PASSES, run_passes

__all__ = ["PASSES", "run_passes"]
