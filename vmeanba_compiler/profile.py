"""The calibration profile: per-site statistics that decide which scans VMeanba rewrites.

Calibration (docs/DESIGN.md section 3) runs the model on sample data and fills one `SiteStats` per
scan site; selection later reads metrics from it, and the backend checks that a profile belongs
to the model it compiles. This module is only the data model: accumulating stably, merging
exactly (batches, distributed ranks), and saving/loading a versioned JSON file whose errors say
what to do.

Statistics accumulate in float64 with Chan's parallel form of Welford's algorithm, never as a
naive sum of squares: output variance across channels is small next to the outputs' magnitude
(that is VMeanba's premise), exactly the case where E[x^2] - E[x]^2 cancels to noise. The mean
is stored as one float64, so the variance's relative error is about eps * |mean| / std; the
naive formula's is about eps * (|mean| / std)^2.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .scan_schema import ProjectionForm

__all__ = [
    "METRIC_NAMES",
    "PROFILE_FORMAT_VERSION",
    "Profile",
    "ProfileMismatchError",
    "RunningMean",
    "SiteSignature",
    "SiteStats",
    "parameter_hash",
]

PROFILE_FORMAT_VERSION = 1
PROFILE_FORMAT = "vmeanba-profile"
METRIC_NAMES = ("ratio", "variance", "relative_error", "impact")
_FORMS = tuple(form.value for form in ProjectionForm)
_RECALIBRATE = "re-run vmeanba_compiler.calibrate on this one"


class ProfileMismatchError(ValueError):
    """The profile was calibrated on another model (other scan sites or other weights)."""


def _field(d: Any, key: str, kind: type, where: str) -> Any:
    """d[key], checked to be of `kind`; errors name the field by its path (`where` + key)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"profile field {where.rstrip('.') or '<root>'} must be an object, got {_short(d)}")
    if key not in d:
        raise ValueError(f"profile field {where}{key} is missing")
    value = d[key]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        expected = {float: "a finite number", int: "an integer", str: "a string", bool: "true or false",
                    dict: "an object"}[kind]
        raise ValueError(f"profile field {where}{key} must be {expected}, got {_short(value)}")
    return float(value) if kind is float else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class RunningMean:
    """Streaming count, mean and M2 (sum of squared deviations) in float64; mergeable exactly."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add every element of `values`: the batch's own mean and M2 (two-pass, float64, on the
        tensor's device) are merged in with Chan's formula, so no sum of squares ever cancels."""
        x = values.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return
        batch_mean = x.mean()
        batch_mean_value, batch_m2 = torch.stack([batch_mean, (x - batch_mean).square().sum()]).tolist()
        if not (math.isfinite(batch_mean_value) and math.isfinite(batch_m2)):
            raise ValueError(
                "RunningMean.update got non-finite values (nan/inf, or too large for float64); "
                "statistics of them would be meaningless: check the model's outputs on this batch"
            )
        merged = self.merge(RunningMean(x.numel(), batch_mean_value, batch_m2))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2

    def merge(self, other: RunningMean) -> RunningMean:
        """The statistics of both inputs' data together (Chan et al.); neither input changes."""
        if other.count == 0 or self.count == 0:
            source = self if other.count == 0 else other
            return RunningMean(source.count, source.mean, source.m2)
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return RunningMean(count, mean, m2)

    @property
    def variance(self) -> float:
        """Population variance (M2 / count); 0.0 when nothing was seen."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def to_dict(self) -> dict[str, Any]:
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self.m2)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> RunningMean:
        """Inverse of to_dict; `where` prefixes field names in errors (e.g. "stats[...].impact.")."""
        count = _field(d, "count", int, where)
        mean, m2 = _field(d, "mean", float, where), _field(d, "m2", float, where)
        if count < 0 or m2 < 0:
            raise ValueError(f"profile field {where}count and {where}m2 must be >= 0, got {count} and {m2}")
        return cls(count, mean, m2)


@dataclass(frozen=True)
class SiteSignature:
    """What must agree between a profile and a traced model at one scan site. Batch size and
    sequence length are deliberately absent: one profile serves every resolution and batch."""

    dim: int
    state: int
    groups: int
    b_form: str
    c_form: str
    has_D: bool
    has_z: bool

    def __post_init__(self) -> None:
        for name in ("dim", "state", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SiteSignature.{name} must be a positive int, got {value!r}")
        if self.dim % self.groups:
            raise ValueError(f"SiteSignature.groups={self.groups} must divide dim={self.dim}")
        for name in ("b_form", "c_form"):
            if getattr(self, name) not in _FORMS:
                raise ValueError(f"SiteSignature.{name} must be one of {_FORMS}, got {getattr(self, name)!r}")

    def describe(self) -> str:
        """One line, field=value, for error messages."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> SiteSignature:
        kinds = {"dim": int, "state": int, "groups": int, "b_form": str, "c_form": str,
                 "has_D": bool, "has_z": bool}
        values = {key: _field(d, key, kind, where) for key, kind in kinds.items()}
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"profile field {where.rstrip('.') or 'signature'}: {error}") from None


@dataclass
class SiteStats:
    """Calibration statistics of one scan site (docs/DESIGN.md section 3).

    channel_variance: per (batch, group, position) variance of the output across the group's
        channels; its mean is the site's variance.
    mean_square: of the output's elements, so variance / mean square is scale-free.
    rel_err_num, rel_err_den: sums of squared (reduced - full) error and of squared full output.
    impact: per-batch layer-impact scores (how much the model's output moves when only this site
        is reduced).
    """

    channel_variance: RunningMean = field(default_factory=RunningMean)
    mean_square: RunningMean = field(default_factory=RunningMean)
    rel_err_num: float = 0.0
    rel_err_den: float = 0.0
    impact: RunningMean = field(default_factory=RunningMean)

    @property
    def variance(self) -> float:
        return self.channel_variance.mean

    @property
    def ratio(self) -> float:
        """variance / mean square; an all-zero output has ratio 0 if nothing varies, else inf."""
        if self.mean_square.mean == 0.0:
            return 0.0 if self.variance == 0.0 else math.inf
        return self.variance / self.mean_square.mean

    @property
    def relative_error(self) -> float:
        """Relative MSE of the reduced scan; like ratio, 0/0 is 0 and x/0 is inf (an error on an
        all-zero output is not "no error")."""
        if self.rel_err_den == 0.0:
            return 0.0 if self.rel_err_num == 0.0 else math.inf
        return self.rel_err_num / self.rel_err_den

    @property
    def impact_score(self) -> Optional[float]:
        """Mean per-batch impact, or None when calibration did not measure impact."""
        return self.impact.mean if self.impact.count else None

    def merge(self, other: SiteStats) -> SiteStats:
        return SiteStats(
            channel_variance=self.channel_variance.merge(other.channel_variance),
            mean_square=self.mean_square.merge(other.mean_square),
            rel_err_num=self.rel_err_num + other.rel_err_num,
            rel_err_den=self.rel_err_den + other.rel_err_den,
            impact=self.impact.merge(other.impact),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel_variance": self.channel_variance.to_dict(),
            "mean_square": self.mean_square.to_dict(),
            "rel_err_num": float(self.rel_err_num),
            "rel_err_den": float(self.rel_err_den),
            "impact": self.impact.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> SiteStats:
        means = {k: RunningMean.from_dict(_field(d, k, dict, where), f"{where}{k}.")
                 for k in ("channel_variance", "mean_square", "impact")}
        sums = {k: _field(d, k, float, where) for k in ("rel_err_num", "rel_err_den")}
        if min(sums.values()) < 0:
            raise ValueError(f"profile fields {where}rel_err_num/rel_err_den must be >= 0, got {sums}")
        return cls(**means, **sums)


def _names(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _signature_differences(a: Mapping[str, SiteSignature], b: Mapping[str, SiteSignature],
                           a_name: str, b_name: str) -> list[str]:
    """Every way two site maps disagree: sites only in b, sites only in a, differing signatures."""
    lines = []
    if only_b := sorted(b.keys() - a.keys()):
        lines.append(f"sites in the {b_name} but missing from the {a_name}: {_names(only_b)}")
    if only_a := sorted(a.keys() - b.keys()):
        lines.append(f"sites in the {a_name} but not in the {b_name}: {_names(only_a)}")
    differing = sorted(s for s in a.keys() & b.keys() if a[s] != b[s])
    if differing:
        lines.append(f"sites whose signature differs ({len(differing)}):")
    for site in differing:
        names = [f.name for f in dataclasses.fields(SiteSignature)
                 if getattr(a[site], f.name) != getattr(b[site], f.name)]
        lines.append(f"  {site} (differs in {', '.join(names)}):\n"
                     f"    {a_name}: {a[site].describe()}\n    {b_name}: {b[site].describe()}")
    return lines


@dataclass
class Profile:
    """Calibration results for one model (its sites and weights) under one set of settings.

    settings: JSON values only (e.g. dt_mode, skip_mode, impact kind "kl"/"loss"); they are part
    of the content hash, so a compile cache never serves a rewrite made under other settings.
    """

    signatures: dict[str, SiteSignature]
    parameter_hash: str
    stats: dict[str, SiteStats] = field(default_factory=dict)
    num_batches: int = 0
    num_samples: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    format_version: int = PROFILE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != PROFILE_FORMAT_VERSION:
            raise ValueError(
                f"Profile.format_version must be {PROFILE_FORMAT_VERSION}, got {self.format_version}"
            )
        if unknown := sorted(self.stats.keys() - self.signatures.keys()):
            raise ValueError(f"Profile.stats has sites without a signature: {_names(unknown)}")
        try:
            round_trips = json.loads(json.dumps(self.settings, allow_nan=False)) == self.settings
        except (TypeError, ValueError):
            round_trips = False
        if not isinstance(self.settings, dict) or not round_trips:
            raise ValueError("Profile.settings must survive a JSON round trip (str keys; str, int, finite "
                             f"float, bool, None, list and dict values), got {self.settings!r}")

    @property
    def site_ids(self) -> list[str]:
        return sorted(self.signatures)

    def metric(self, site_id: str, name: str) -> Optional[float]:
        """One selection metric of one site; "impact" is None where calibration did not measure it
        (selection then says which option needs it). Raises KeyError for a site without stats."""
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown profile metric {name!r}; valid metrics are: {', '.join(METRIC_NAMES)}")
        if site_id not in self.stats:
            known = f"sites with statistics: {_names(sorted(self.stats))}" if self.stats else "it has none"
            raise KeyError(f"profile has no statistics for site {site_id!r} ({known})")
        stats = self.stats[site_id]
        values = {"ratio": stats.ratio, "variance": stats.variance, "relative_error": stats.relative_error,
                  "impact": stats.impact_score}
        return values[name]

    def merge(self, other: Profile) -> Profile:
        """Both profiles' data together, e.g. two batches or two distributed ranks of one run."""
        problems = _signature_differences(self.signatures, other.signatures, "this profile", "other profile")
        if self.parameter_hash != other.parameter_hash:
            problems.append(
                f"parameter_hash differs: {self.parameter_hash[:12]}... vs {other.parameter_hash[:12]}..."
            )
        unset = "<unset>"
        keys = sorted(k for k in self.settings.keys() | other.settings.keys()
                      if self.settings.get(k, unset) != other.settings.get(k, unset))
        if keys:
            problems.append("settings differ in: " + ", ".join(
                f"{k} ({self.settings.get(k, unset)!r} vs {other.settings.get(k, unset)!r})" for k in keys
            ))
        if problems:
            raise ValueError("cannot merge profiles of different models or settings:\n" + "\n".join(problems))
        stats = {}
        for site in sorted(self.stats.keys() | other.stats.keys()):
            mine, theirs = self.stats.get(site), other.stats.get(site)
            both = mine is not None and theirs is not None
            stats[site] = mine.merge(theirs) if both else copy.deepcopy(mine if theirs is None else theirs)
        return Profile(
            signatures=dict(self.signatures),
            parameter_hash=self.parameter_hash,
            stats=stats,
            num_batches=self.num_batches + other.num_batches,
            num_samples=self.num_samples + other.num_samples,
            settings=copy.deepcopy(self.settings),
        )

    def check_compatible(self, signatures: Mapping[str, SiteSignature], parameter_hash: Optional[str] = None,
                         *, partial: bool = False) -> None:
        """Raise ProfileMismatchError unless this profile was calibrated on a model with exactly
        these sites (and, when given, these weights): statistics of another model's sites would
        select sites they do not describe. Every missing, extra and differing site is reported.

        partial: `signatures` are one Dynamo graph's sites, a part of the model (graph breaks), so
        profile sites absent from it are expected; missing and differing sites still raise.
        """
        mine = self.signatures
        if partial:
            mine = {s: sig for s, sig in self.signatures.items() if s in signatures}
        problems = _signature_differences(mine, signatures, "profile", "model")
        if problems:
            raise ProfileMismatchError("\n".join([
                "the calibration profile does not match the model's scan sites:", *problems,
                f"this profile was calibrated on a different model; {_RECALIBRATE}",
            ]))
        if parameter_hash is not None and parameter_hash != self.parameter_hash:
            raise ProfileMismatchError(
                f"the model's weights differ from those the profile was calibrated on (parameter hash "
                f"{parameter_hash[:12]}... for the model, {self.parameter_hash[:12]}... in the profile), so "
                f"its statistics do not describe them: {_RECALIBRATE}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "format_version": self.format_version,
            "parameter_hash": self.parameter_hash,
            "num_batches": int(self.num_batches),
            "num_samples": int(self.num_samples),
            "settings": copy.deepcopy(self.settings),
            "signatures": {s: sig.to_dict() for s, sig in sorted(self.signatures.items())},
            "stats": {s: st.to_dict() for s, st in sorted(self.stats.items())},
        }

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Inverse of to_dict, validating the format, its version and every field."""
        if not isinstance(d, Mapping) or d.get("format") != PROFILE_FORMAT:
            found = repr(d.get("format")) if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(
                f"this is not a vmeanba profile (expected format {PROFILE_FORMAT!r}, found {found})"
            )
        version = _field(d, "format_version", int, "")
        if version > PROFILE_FORMAT_VERSION:
            raise ValueError(f"profile format version {version} is newer than this vmeanba-compiler supports "
                             f"(version {PROFILE_FORMAT_VERSION}); upgrade vmeanba-compiler to read it")
        if version < PROFILE_FORMAT_VERSION:
            raise ValueError(f"profile format version {version} is no longer supported (this vmeanba-compiler "
                             f"reads version {PROFILE_FORMAT_VERSION}); re-run calibration "
                             "(vmeanba_compiler.calibrate) to produce a current profile")
        signatures = {s: SiteSignature.from_dict(v, f"signatures[{s!r}].")
                      for s, v in _field(d, "signatures", dict, "").items()}
        stats = {s: SiteStats.from_dict(v, f"stats[{s!r}].") for s, v in _field(d, "stats", dict, "").items()}
        counts = {k: _field(d, k, int, "") for k in ("num_batches", "num_samples")}
        if min(counts.values()) < 0:
            raise ValueError(f"profile fields num_batches/num_samples must be >= 0, got {counts}")
        try:
            return cls(signatures=signatures, parameter_hash=_field(d, "parameter_hash", str, ""), stats=stats,
                       settings=_field(d, "settings", dict, ""), **counts)
        except ValueError as error:
            raise ValueError(f"invalid profile: {error}") from None

    def content_hash(self) -> str:
        """sha256 of the canonical JSON: the compile cache key of a rewrite made from this profile."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: Union[str, os.PathLike[str]]) -> Path:
        """Write atomically: a crash or error mid-write leaves any previous file at `path` intact
        (temporary file in the same directory, fsync, os.replace)."""
        path = Path(path)
        data = self.to_dict()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if os.name == "posix":  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]]) -> Profile:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"profile file {path} does not exist; create it with vmeanba_compiler.calibrate"
            ) from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"profile file {path} is not valid JSON (truncated or corrupt?): {error}; "
                             "re-run calibration") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"profile file {path}: {error}") from None


def parameter_hash(module: torch.nn.Module) -> str:
    """sha256 (hex) of the module's state_dict: names, dtypes, shapes and raw bytes in key order,
    so a profile can tell the weights it was calibrated on from any others."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"parameter_hash cannot hash state_dict entry {name!r} of type {type(value).__name__}"
            )
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0{data.numel()}\0".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()
