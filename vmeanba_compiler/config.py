"""The backend's one configuration object, built from `torch.compile(..., options={...})`.

Every option is validated here, once: an unknown name or a value of the wrong type is an error
that lists what is accepted, so a typo never silently compiles the model without the intended
setting. Selection by threshold or top-K needs a calibration profile: without one it is refused,
never guessed. Explicitly named `sites` are the user's own choice and need no profile. A profile
measured under other rewrite modes (dt_mode, skip_mode) than the configuration's is refused.

The fields' metadata ("choices", "help") is what the command line builds its flags from
(vmeanba_compiler/cli.py), so a new choice is added here once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .profile import Profile, ProfileMismatchError
from .rewrite_modes import (DEFAULT_DT_MODE, DEFAULT_SKIP_MODE, DT_MODES, REWRITE_SETTINGS, SKIP_MODES,
                            measures_whole_output, recorded_modes)

log = logging.getLogger(__name__)

METRICS = ("ratio", "variance")


def _check_inductor_key(key: str) -> None:
    import torch._inductor.config as inductor_config

    node: Any = inductor_config
    for part in key.split("."):
        if not hasattr(node, part):
            raise ValueError(
                f"vmeanba option 'inductor_config' names {key!r}, which is not a "
                "torch._inductor.config setting (see torch._inductor.config for the valid names)"
            )
        node = getattr(node, part)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class VMeanbaConfig:
    """Options of the `vmeanba` backend (all validated on construction).

    inductor: lower the (rewritten) graph through TorchInductor (default). False runs the
        rewritten FX graph eagerly: the reference to compare compiled results with.
    inductor_config: settings passed to Inductor as config patches, e.g. {"max_autotune": True};
        names are checked against torch._inductor.config.
    profile: a calibration `Profile` (or the path of a saved one) for `threshold` / `top_k`.
    threshold: rewrite the sites whose `metric` is at most this (needs `profile`).
    metric: "ratio" (channel variance / mean square, scale-free; default) or "variance" (raw).
    top_k: rewrite the K sites of lowest layer impact (needs `profile`).
    sites: rewrite exactly these site ids ("<module path>:<call index>"); no profile needed.
    dt_mode, skip_mode: how a rewritten site averages its step size and treats D and z
        (see `vmeanba_compiler.passes.reduced_scan`).
    """

    inductor: bool = True
    inductor_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    profile: Optional[Profile] = None
    threshold: Optional[float] = field(
        default=None, metadata={"type": float, "help": "rewrite the sites whose metric is at most this"})
    metric: str = field(default="ratio", metadata={
        "choices": METRICS, "help": "profile metric of threshold: variance / mean square (scale-free) or raw "
        "channel variance"})
    top_k: Optional[int] = field(default=None, metadata={"type": int, "help": "rewrite the K sites of lowest impact"})
    sites: tuple[str, ...] = ()
    dt_mode: str = field(default=DEFAULT_DT_MODE, metadata={
        "choices": DT_MODES, "help": "how a reduced site averages its step size: softplus(delta + bias) "
        "('effective') or delta and bias before the softplus ('raw'); calibration and compilation must agree"})
    skip_mode: str = field(default=DEFAULT_SKIP_MODE, metadata={
        "choices": SKIP_MODES, "help": "how a reduced site treats D*u and the z gate: per channel ('exact') or "
        "averaged ('mean'); calibration and compilation must agree"})

    def __post_init__(self) -> None:
        if not isinstance(self.inductor, bool):
            raise TypeError(f"vmeanba option 'inductor' must be True or False, got {self.inductor!r}")
        if not isinstance(self.inductor_config, Mapping) or not all(
            isinstance(k, str) for k in self.inductor_config
        ):
            raise TypeError(
                "vmeanba option 'inductor_config' must be a dict of torch._inductor.config "
                f"names to values, got {self.inductor_config!r}"
            )
        for key in self.inductor_config:
            _check_inductor_key(key)
        object.__setattr__(self, "inductor_config", MappingProxyType(dict(self.inductor_config)))
        if self.profile is not None and not isinstance(self.profile, Profile):
            raise TypeError(
                "vmeanba option 'profile' must be a vmeanba_compiler.Profile or the path of a saved "
                f"profile, got {type(self.profile).__name__}"
            )
        self._check_choice("metric", self.metric, METRICS)
        self._check_choice("dt_mode", self.dt_mode, DT_MODES)
        self._check_choice("skip_mode", self.skip_mode, SKIP_MODES)
        self._check_selection()
        self._check_profile_modes()

    @staticmethod
    def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise ValueError(f"vmeanba option {name!r} must be one of {choices}, got {value!r}")

    def _check_selection(self) -> None:
        given = [n for n, v in (("threshold", self.threshold), ("top_k", self.top_k)) if v is not None]
        if self.sites:
            given.append("sites")
        if len(given) > 1:
            raise ValueError(
                f"vmeanba options {' and '.join(given)} each choose the sites to rewrite; pass only one"
            )
        if isinstance(self.sites, str) or not all(isinstance(s, str) for s in self.sites):
            raise TypeError(
                "vmeanba option 'sites' must be a list of site ids like 'stages.0.0.op:0', "
                f"got {self.sites!r}"
            )
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.threshold is not None:
            if not _is_number(self.threshold) or not math.isfinite(self.threshold) or self.threshold < 0:
                raise ValueError(
                    f"vmeanba option 'threshold' must be a finite number >= 0, got {self.threshold!r}"
                )
            self._require_profile("threshold")
        if self.top_k is not None:
            if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
                raise ValueError(f"vmeanba option 'top_k' must be an int >= 0, got {self.top_k!r}")
            self._require_profile("top_k")
            available = len(self.profile.site_ids)
            if self.top_k > available:
                raise ValueError(
                    f"vmeanba option top_k={self.top_k} but the profile has only {available} sites; "
                    f"pass top_k <= {available}"
                )

    def _check_profile_modes(self) -> None:
        """A profile's metrics (relative error, impact) describe the reduction it was measured with;
        compiling it under another would select sites by numbers that do not describe the rewrite."""
        if self.profile is None:
            return
        differing = {name: value for name, value in recorded_modes(self.profile.settings).items()
                     if value != getattr(self, name)}
        if differing:
            measured = ", ".join(f"{n}={v!r}" for n, v in differing.items())
            configured = ", ".join(f"{n}={getattr(self, n)!r}" for n in differing)
            raise ProfileMismatchError(
                f"the profile was calibrated with {measured} but the vmeanba options say {configured}; its "
                f"metrics describe the other reduction. Pass options {measured} (as calibrated), or re-run "
                f"vmeanba_compiler.calibrate with {configured}"
            )
        if self.threshold is not None and measures_whole_output(self.profile.settings):
            log.warning(
                "the profile was calibrated by an older vmeanba-compiler, whose %s was measured on the whole "
                "output including the exact D*u skip (now: without it, docs/DESIGN.md section 3), so "
                "threshold=%s selects by the old numbers; re-run vmeanba_compiler.calibrate to measure "
                "them as this release does", self.metric, self.threshold)

    def rewrite_options(self) -> dict[str, str]:
        """The rewrite modes as options, e.g. to calibrate (`calibrate(..., config=...)`) or compile alike."""
        return {name: getattr(self, name) for name in REWRITE_SETTINGS}

    @classmethod
    def cli_fields(cls) -> dict[str, dataclasses.Field]:
        """The options the command line exposes as flags (those with "help" metadata), by name."""
        return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}

    def _require_profile(self, option: str) -> None:
        if self.profile is None:
            raise ValueError(
                f"vmeanba option {option!r} selects sites from calibration data, but no profile was "
                "given: pass profile=vmeanba_compiler.calibrate(model, batches) (or a saved profile's "
                "path), or name the sites yourself with sites=[...]"
            )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "VMeanbaConfig":
        """Validate `torch.compile` options into a config; raise naming the bad option."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise TypeError(
                f"vmeanba options must be a dict, got {type(options).__name__}; "
                f"valid keys: {', '.join(cls.option_names())}"
            )
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown vmeanba option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(cls.option_names())}"
            )
        values = dict(options)
        if isinstance(values.get("profile"), (str, os.PathLike)):
            values["profile"] = Profile.load(values["profile"])
        if isinstance(values.get("sites"), list):
            values["sites"] = tuple(values["sites"])
        return cls(**values)
