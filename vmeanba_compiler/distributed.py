"""Calibration on torch.distributed: every rank measures its shard, the statistics merge exactly.

A profile's statistics are mergeable states (docs/DESIGN.md section 3): Welford count/mean/M2 combined
with Chan's formula, plus plain sums, all in float64 (`Profile.merge`). So calibrating N shards
and merging equals calibrating all the data in one process, up to float64 rounding. Every rank
gathers every rank's profile and merges them in rank order, so all ranks hold the bit-identical
result; rank 0 alone writes the file.

Collective calls are made by every rank even when one of them fails, and a failure is shared:
if calibration raises on any rank, every rank raises the same error naming the rank(s), instead
of the healthy ranks waiting forever in a collective the failed one never reaches.

Run with torchrun (`examples/distributed_calibration.py`):

    torch.distributed.init_process_group("gloo")          # or "nccl"; torchrun sets the env
    loader = DataLoader(dataset, batch_size=32, sampler=DistributedSampler(dataset, shuffle=False))
    profile = calibrate_distributed(model.eval(), (images for images, _ in loader), path="profile.json")
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch.distributed as dist
from torch import nn

from .calibration import CalibrationError, calibrate
from .profile import Profile

__all__ = ["calibrate_distributed", "merge_across_ranks"]


def _require_process_group(caller: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{caller} needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment it reads), "
            "or use vmeanba_compiler.calibrate in a single process"
        )


def _gather(obj: Any, group: Optional[dist.ProcessGroup]) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (all_gather_object)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _merge_in_rank_order(payloads: list[dict[str, Any]]) -> Profile:
    """Plain dicts travel between ranks (`Profile.to_dict`); from_dict re-validates each one."""
    return functools.reduce(Profile.merge, [Profile.from_dict(p) for p in payloads])


def merge_across_ranks(profile: Profile, *, group: Optional[dist.ProcessGroup] = None) -> Profile:
    """Merge each rank's `profile` into one; every rank of `group` gets the identical result.

    Collective: every rank of `group` (default: the whole world) must call it. Raises ValueError,
    on every rank alike, if the ranks calibrated different models, weights or settings.
    """
    _require_process_group("merge_across_ranks")
    if not isinstance(profile, Profile):
        raise TypeError(f"merge_across_ranks: 'profile' must be a vmeanba_compiler.Profile, got {type(profile).__name__}")
    return _merge_in_rank_order(_gather(profile.to_dict(), group))


def calibrate_distributed(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    path: Union[str, os.PathLike[str], None] = None,
    group: Optional[dist.ProcessGroup] = None,
    **calibrate_kwargs: Any,
) -> Profile:
    """`calibrate` this rank's shard of the data, merge across ranks, and (rank 0) save to `path`.

    batches: this rank's share (e.g. a DataLoader with a DistributedSampler); every rank needs at
        least one batch. All ranks must hold the same weights (the merge checks the hash).
    path: where rank 0 writes the merged profile (atomically); every rank returns only after it is
        written, so any rank may load it afterwards.
    calibrate_kwargs: as for `calibrate`; `progress` defaults to True on rank 0 only.
    Collective: every rank of `group` must call it. Returns the merged profile on every rank.
    """
    _require_process_group("calibrate_distributed")
    rank = dist.get_rank(group)
    calibrate_kwargs.setdefault("progress", rank == 0)
    failure: Optional[BaseException] = None
    try:
        outcome: Any = calibrate(model, batches, **calibrate_kwargs).to_dict()
    except Exception as error:  # shared with the other ranks below, then re-raised everywhere
        failure, outcome = error, f"{type(error).__name__}: {error}"
    gathered = _gather(outcome, group)
    failed = [f"rank {r}: {o}" for r, o in enumerate(gathered) if isinstance(o, str)]
    if failed:
        raise CalibrationError("distributed calibration failed on " + "; ".join(failed)) from failure
    merged = _merge_in_rank_order(gathered)
    if path is not None:
        _save_on_rank_zero(merged, Path(path), rank, group)
    return merged


def _save_on_rank_zero(profile: Profile, path: Path, rank: int, group: Optional[dist.ProcessGroup]) -> None:
    """Rank 0 saves; the outcome is gathered, so every rank returns after the file exists or
    raises the same error if saving failed."""
    error = None
    if rank == 0:
        try:
            profile.save(path)
        except OSError as failure:
            error = f"{type(failure).__name__}: {failure}"
    saved = _gather(error, group)[0]
    if saved is not None:
        raise OSError(f"rank 0 could not write the merged profile to {path}: {saved}")
