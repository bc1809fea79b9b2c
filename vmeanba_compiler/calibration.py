"""`calibrate(model, batches)`: measure every scan site on sample inputs (docs/DESIGN.md section 3).

Three phases, as in torchao's pt2e flow: Dynamo traces the model and every scan node is replaced
by an observer that runs the full scan and records the site's statistics; the user's batches run
through that graph (eagerly, no Inductor); the result is a `Profile`. The layer-impact score of
a site is measured by running each batch once more per site with only that site reduced.
"""

from __future__ import annotations

import collections.abc
import logging
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VMeanbaConfig
from .passes import canonicalize
from .passes.graph_utils import finish_graph, replace_node
from .passes.reduced_scan import reduced_selective_scan
from .passes.scan_sites import SiteIdCollisionError, find_scan_sites, scan_arguments
from .passes.site_identity import SharedGraph
from .passes.site_selection import site_signature
from .profile import PROFILE_FORMAT_VERSION, Profile, SiteSignature, SiteStats, parameter_hash
from .rewrite_modes import DEFAULT_DT_MODE, DEFAULT_SKIP_MODE, MEASURED_OUTPUT, MEASURED_OUTPUT_SETTING, REWRITE_SETTINGS
from .tracing import backend_errors_unwrapped, call_with_inputs, fresh_trace

log = logging.getLogger("vmeanba_compiler.calibration")


class CalibrationError(ValueError):
    """Calibration data or activations that cannot give a trustworthy profile."""


class _SiteObserver(nn.Module):
    """Stands in for every scan node of the traced graph while calibrating.

    Returns the full scan's result, except for the one site named by `reduced_site`, which
    returns its reduced result (how impact is measured).
    """

    def __init__(self, dt_mode: str, skip_mode: str) -> None:
        super().__init__()
        self.dt_mode, self.skip_mode = dt_mode, skip_mode
        self.signatures: dict[str, SiteSignature] = {}
        self.stats: dict[str, SiteStats] = {}
        self.shared: dict[str, SharedGraph] = {}  # traced site id -> the instances sharing its graph
        self.recording = True
        self.reduced_site: Optional[str] = None
        self.batch_index = 0

    def forward(self, site_id: str, groups: int, **scan_args: Any) -> tuple[Tensor, Tensor]:
        if site_id in self.shared:  # one graph run by several module instances: which one is it?
            running = self.shared[site_id].running_site_id() or site_id
            if running not in self.stats:
                self.signatures[running] = self.signatures[site_id]
                self.stats[running] = SiteStats()
            site_id = running
        y, last_state = torch.ops.vmeanba.selective_scan(**scan_args)
        reducing = self.reduced_site == site_id
        if not self.recording and not reducing:
            return y, last_state
        modes = {"groups": groups, "dt_mode": self.dt_mode, "skip_mode": self.skip_mode}
        if self.recording:
            measured = self._approximated_part(scan_args)
            full = y if measured is scan_args else torch.ops.vmeanba.selective_scan(**measured)[0]
            self._record(site_id, groups, scan_args["u"], full, reduced_selective_scan(**measured, **modes)[0])
        return reduced_selective_scan(**scan_args, **modes) if reducing else (y, last_state)

    def _approximated_part(self, scan_args: dict[str, Any]) -> dict[str, Any]:
        """The arguments whose output the statistics describe: what the rewrite approximates.

        Under skip_mode "exact" the rewrite keeps D*u per channel, exactly, so a large skip term
        would only dilute the variance ratio and the relative error (both divide by the output's
        square): the site is measured without D (the gate stays, it multiplies the approximated
        part). Under "mean" D is averaged too, so the whole output is measured.
        """
        if self.skip_mode != "exact" or scan_args.get("D") is None:
            return scan_args
        return {**scan_args, "D": None}

    def _record(self, site_id: str, groups: int, u: Tensor, y: Tensor, y_reduced: Tensor) -> None:
        for name, t in (("input u", u), ("output", y)):
            if not bool(torch.isfinite(t).all()):
                raise CalibrationError(
                    f"scan site {site_id!r}: its {name} has NaN or inf values in calibration batch "
                    f"{self.batch_index}; check the inputs and the model (e.g. run it in float32) "
                    "before calibrating"
                )
        full = y.detach().double()
        stats = self.stats[site_id]
        per_group = full.unflatten(1, (groups, full.shape[1] // groups))  # (batch, G, d, L)
        stats.channel_variance.update(per_group.var(dim=2, unbiased=False))
        stats.mean_square.update(full.square())
        stats.rel_err_num += float((y_reduced.detach().double() - full).square().sum())
        stats.rel_err_den += float(full.square().sum())


def _instrumenting_backend(observer: _SiteObserver) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs) -> Callable:
        gm = canonicalize(gm)
        gm.add_submodule("vmeanba_observer", observer)
        for site in find_scan_sites(gm):
            signature = observer.signatures.setdefault(site.site_id, site_signature(site))
            if signature != site_signature(site):  # the same id in another graph: never merge
                raise SiteIdCollisionError(
                    f"scan site {site.site_id!r} was traced twice with different sizes "
                    f"({signature.describe()} vs {site_signature(site).describe()}); calibrating both "
                    "under one id would mix their statistics. Give each scan its own module, or report "
                    "this with the model code"
                )
            observer.stats.setdefault(site.site_id, SiteStats())
            if site.shared is not None:
                observer.shared[site.site_id] = site.shared
            replace_node(gm.graph, site.node, "call_module", "vmeanba_observer", (site.site_id, site.groups),
                         scan_arguments(site.node))
        finish_graph(gm)
        return gm.forward

    return backend


def _first_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        if isinstance(v, (Tensor, tuple, list, dict)):
            return _first_tensor(v)
    raise CalibrationError(f"the model returned {type(x).__name__}; calibration needs a tensor output")


def _kl_impact(full: Tensor, reduced: Tensor) -> float:
    """KL(softmax(full) || softmax(reduced)) over the last dim, averaged over the rest."""
    log_p = F.log_softmax(full.double(), dim=-1)
    log_q = F.log_softmax(reduced.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
    impact: bool = True,
    max_batches: Optional[int] = None,
    dt_mode: Optional[str] = None,
    skip_mode: Optional[str] = None,
    config: Optional[VMeanbaConfig] = None,
    progress: bool = True,
) -> Profile:
    """Run `model` on `batches` and return the profile of its scan sites.

    batches: an iterable (a DataLoader works) of model inputs: a Tensor, a tuple of positional
        arguments or a dict of keyword arguments. With `loss_fn`, each batch is `(inputs, target)`
        and the impact score is the change of `loss_fn(output, target)`; otherwise it is the KL
        divergence of the output logits.
    impact: measure layer impact (one extra forward per site and batch); top_k selection needs it.
    dt_mode, skip_mode: the reduction measured (must match the one compiled later; the backend
        refuses a profile measured under other modes). Default: `config`'s, else "effective", "exact".
    config: a `VMeanbaConfig` whose rewrite modes to measure (the one you will compile with).
    Put the model in the mode you will deploy (usually `model.eval()`) first.
    The model is traced with a backend of its own (`tracing.IsolatedTrace`): the instrumented
    trace is never served from an old one, and the process's other compiled code is kept.
    """
    from tqdm.auto import tqdm

    dt_mode, skip_mode = _rewrite_modes(config, dt_mode, skip_mode)
    _check_arguments(model, batches, loss_fn, impact, max_batches, dt_mode, skip_mode, progress)
    observer = _SiteObserver(dt_mode, skip_mode)
    traced = fresh_trace(model, _instrumenting_backend(observer))
    total = None if not hasattr(batches, "__len__") else len(batches)  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    num_batches = num_samples = 0
    with torch.no_grad(), backend_errors_unwrapped():
        for batch in tqdm(batches, total=total, desc="vmeanba calibrate", disable=not progress):
            if max_batches is not None and num_batches >= max_batches:
                break
            inputs, target = _split(batch, loss_fn)
            observer.batch_index, observer.recording, observer.reduced_site = num_batches, True, None
            full = _run(traced, inputs)
            if not observer.stats:
                raise CalibrationError(
                    "no selective-scan sites were found in the model: its scans must call "
                    "vmeanba_compiler.selective_scan (torch.ops.vmeanba.selective_scan), or Mamba's "
                    "selective_scan_fn / VMamba's csms6s selective_scan_fn (mapped onto it)"
                )
            if impact:
                observer.recording = False
                for site_id, stats in list(observer.stats.items()):
                    observer.reduced_site = site_id
                    reduced = _run(traced, inputs)
                    stats.impact.update(torch.tensor([_impact(full, reduced, target, loss_fn)], dtype=torch.float64))
            num_batches += 1
            num_samples += _first_tensor(inputs).shape[0]
    traced.release()
    if num_batches == 0:
        raise CalibrationError(
            "calibrate got no batches: pass a non-empty iterable of model inputs (e.g. a DataLoader)"
        )
    log.info("calibrated %d scan sites on %d batches (%d samples): %s", len(observer.stats), num_batches,
             num_samples, ", ".join(sorted(observer.stats)))
    return Profile(
        format_version=PROFILE_FORMAT_VERSION,
        signatures=dict(observer.signatures),
        stats=dict(observer.stats),
        parameter_hash=parameter_hash(model),
        num_batches=num_batches,
        num_samples=num_samples,
        settings={"dt_mode": dt_mode, "skip_mode": skip_mode, MEASURED_OUTPUT_SETTING: MEASURED_OUTPUT,
                  "impact": None if not impact else ("loss" if loss_fn else "kl")},
    )


def _rewrite_modes(config: Any, dt_mode: Optional[str], skip_mode: Optional[str]) -> tuple[Any, Any]:
    """The modes to measure: the explicit arguments, else the config's, else the defaults."""
    if config is None:
        return (DEFAULT_DT_MODE if dt_mode is None else dt_mode,
                DEFAULT_SKIP_MODE if skip_mode is None else skip_mode)
    if not isinstance(config, VMeanbaConfig):
        raise TypeError(f"calibrate: 'config' must be a vmeanba_compiler.VMeanbaConfig or None, "
                        f"got {type(config).__name__}")
    for name, value in (("dt_mode", dt_mode), ("skip_mode", skip_mode)):
        if value is not None and value != getattr(config, name):
            raise ValueError(f"calibrate: {name}={value!r} contradicts config.{name}={getattr(config, name)!r}; "
                             "pass one of them")
    return config.dt_mode, config.skip_mode


def _check_arguments(model: Any, batches: Any, loss_fn: Any, impact: Any, max_batches: Any, dt_mode: Any,
                     skip_mode: Any, progress: Any) -> None:
    """Refuse bad arguments before anything is traced or run; each error names the argument and
    the fix (a late failure would come after minutes of calibration, or as a confusing model error)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: 'model' must be a torch.nn.Module (the profile records its weights' hash), "
                        f"got {type(model).__name__}")
    if isinstance(batches, Tensor):
        raise TypeError("calibrate: 'batches' is one Tensor, which would be iterated along its first dimension; "
                        "pass an iterable of batches, e.g. [images] or a DataLoader")
    if not isinstance(batches, collections.abc.Iterable):
        raise TypeError(f"calibrate: 'batches' must be an iterable of model inputs (a list, a generator or a "
                        f"DataLoader), got {type(batches).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"calibrate: 'loss_fn' must be callable as loss_fn(output, target) or None, "
                        f"got {type(loss_fn).__name__}")
    for name, value in (("impact", impact), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"calibrate: {name!r} must be True or False, got {value!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"calibrate: 'max_batches' must be an int >= 1 or None (all batches), got {max_batches!r}")
    for name, value in (("dt_mode", dt_mode), ("skip_mode", skip_mode)):
        choices = REWRITE_SETTINGS[name]
        if value not in choices:
            raise ValueError(f"calibrate: {name!r} must be one of {choices}, got {value!r}")


def _run(traced: Callable, inputs: Any) -> Any:
    try:
        return call_with_inputs(traced, inputs)
    except TypeError as error:
        if "model inputs must be" in str(error):
            raise CalibrationError(f"calibration batch: {error}") from None
        raise


def _split(batch: Any, loss_fn: Optional[Callable]) -> tuple[Any, Any]:
    if loss_fn is None:
        return batch, None
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CalibrationError(
            "with loss_fn, every calibration batch must be a pair (inputs, target), got "
            f"{type(batch).__name__}"
        )
    return batch[0], batch[1]


def _impact(full: Any, reduced: Any, target: Any, loss_fn: Optional[Callable]) -> float:
    if loss_fn is None:
        return _kl_impact(_first_tensor(full), _first_tensor(reduced))
    return float(loss_fn(reduced, target) - loss_fn(full, target))
