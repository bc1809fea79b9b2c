"""Graph passes of the vmeanba backend; `run_passes` applies them in order."""

from .pipeline import CANONICALIZE, PASSES, canonicalize, run_passes

__all__ = ["CANONICALIZE", "PASSES", "canonicalize", "run_passes"]
