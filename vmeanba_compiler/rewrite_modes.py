"""The two choices of how a rewritten site reduces its scan (passes/reduced_scan.py computes them).

- dt_mode "effective" averages the step size actually used, softplus(delta + delta_bias);
  "raw" averages delta and delta_bias and applies softplus after the mean.
- skip_mode "exact" keeps the D*u skip and the silu(z) gate per channel; "mean" averages D and z.

The defaults were chosen by measurement (docs/REWRITE.md). A profile records the modes it was
measured under (`Profile.settings`), and the backend refuses to compile it under others. This is
part of the bottom layer (docs/ARCHITECTURE.md): plain constants, no imports of the project.
"""

from __future__ import annotations

from typing import Any, Mapping

DT_MODES = ("effective", "raw")
SKIP_MODES = ("exact", "mean")
DEFAULT_DT_MODE = "effective"
DEFAULT_SKIP_MODE = "exact"

# The names under which the modes appear in options, in calibrate's arguments and in a profile's settings.
REWRITE_SETTINGS = {"dt_mode": DT_MODES, "skip_mode": SKIP_MODES}


def recorded_modes(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The rewrite modes a profile's settings record (those present): what it was measured under."""
    return {name: settings[name] for name in REWRITE_SETTINGS if name in settings}


# Profile.settings key saying what a profile's output metrics (ratio, variance, relative error)
# were measured on: "approximated_part" = the output without the D*u skip where skip_mode "exact"
# keeps that skip exactly (docs/DESIGN.md section 3). Profiles written before it existed measured
# the whole output; `measures_whole_output` tells them apart.
MEASURED_OUTPUT_SETTING = "measured_output"
MEASURED_OUTPUT = "approximated_part"


def measures_whole_output(settings: Mapping[str, Any]) -> bool:
    """Whether a profile's output metrics include an exact-mode D*u skip (older profiles)."""
    return settings.get("skip_mode") == "exact" and settings.get(MEASURED_OUTPUT_SETTING) != MEASURED_OUTPUT
