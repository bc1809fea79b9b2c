"""Train the bundled VMambas (`vmeanba train-demo [--task segmentation]`) and save/load their checkpoints.

Two tasks on scikit-learn's digits: "digits" classifies the 8x8 images (`vmamba_digits`);
"segmentation" labels every pixel of 32x32 canvases of several digits (`vmamba_digits_seg`, a
VMamba backbone with an FPN decoder; `digits.load_canvas_data`).

Training is seeded and runs on ONE thread: CPU kernels may split reductions differently for
other thread counts, which changes float rounding and so the weights. With the same seed and
the same torch version a retrain reproduces the bundled checkpoint bit for bit
(`tests/test_digits_model.py` checks a short run twice). Digits augmentation is a random shift
of up to one pixel (pad, then crop), drawn from the seeded generator; the canvases need none
(digit positions and sizes are already random).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .digits import DIGITS_SEED, SPLIT_NAMES, CanvasData, DigitsData, load_canvas_data, load_digits_data
from .evaluation import accuracy, mean_iou
from .models import build_segmenter, build_vmamba
from .threads import torch_threads

DIGITS_MODEL = "vmamba_digits"
SEGMENTATION_MODEL = "vmamba_digits_seg"
CHECKPOINT_VERSION = 1
TASKS = ("digits", "segmentation")


@dataclass(frozen=True)
class _Task:
    """What differs between the two bundled tasks' checkpoints."""

    format: str
    asset: str
    build: Callable[[str], nn.Module]
    metric: str  # the metadata key of the per-split quality: "accuracy" or "miou"
    evaluate: Callable[[Callable, Any], float]


_TASKS = {
    "digits": _Task("vmeanba-digits-checkpoint", "assets/digits_vmamba.pt", build_vmamba, "accuracy", accuracy),
    "segmentation": _Task("vmeanba-segmentation-checkpoint", "assets/segmentation_vmamba.pt", build_segmenter,
                          "miou", mean_iou),
}
CHECKPOINT_FORMAT = _TASKS["digits"].format
BUNDLED_CHECKPOINT = _TASKS["digits"].asset


@dataclass(frozen=True)
class TrainingSettings:
    """Hyperparameters of the bundled model's training (AdamW, cosine decay, label smoothing)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 1
    seed: int = 0


@dataclass(frozen=True)
class SegmentationTrainingSettings:
    """Hyperparameters of the bundled segmentation model's training (AdamW, cosine decay,
    per-pixel cross-entropy)."""

    epochs: int = 12
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 0.05
    seed: int = 0


def _shift(images: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill): digits stay legible."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def _fit(model: nn.Module, num_examples: int, batch_loss: Callable[[Tensor], Tensor], epochs: int, batch_size: int,
         lr: float, weight_decay: float, gen: torch.Generator, desc: str, progress: bool) -> nn.Module:
    """The training loop both bundled models share: AdamW with one-cycle cosine decay, a fresh
    seeded permutation of the examples per epoch; `batch_loss(indices)` returns the batch's loss.
    Call it inside `torch_threads(1)` with torch's global seed set (initialisation, dropout)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(num_examples / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.1)
    bar = tqdm(range(epochs), desc=desc, disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(num_examples, generator=gen)
        total = 0.0
        for start in range(0, num_examples, batch_size):
            index = order[start : start + batch_size]
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        bar.set_postfix(loss=f"{total / num_examples:.3f}")
    return model.eval()


def train_digits_model(
    data: Optional[DigitsData] = None, settings: TrainingSettings = TrainingSettings(), *, progress: bool = True
) -> nn.Module:
    """Train `vmamba_digits` on the train split only (no other split is read); returns the model
    in eval mode."""
    data = load_digits_data() if data is None else data
    train = data.train
    with torch_threads(1), torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        model = build_vmamba(DIGITS_MODEL)

        def batch_loss(index: Tensor) -> Tensor:
            images = _shift(train.images[index], settings.max_shift, gen)
            return F.cross_entropy(model(images), train.labels[index], label_smoothing=settings.label_smoothing)

        return _fit(model, len(train), batch_loss, settings.epochs, settings.batch_size, settings.lr,
                    settings.weight_decay, gen, "vmeanba train-demo", progress)


def train_segmentation_model(
    data: Optional[CanvasData] = None, settings: SegmentationTrainingSettings = SegmentationTrainingSettings(), *,
    progress: bool = True,
) -> nn.Module:
    """Train `vmamba_digits_seg` on the train canvases only; returns the model in eval mode."""
    data = load_canvas_data() if data is None else data
    train = data.train
    with torch_threads(1), torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        model = build_segmenter(SEGMENTATION_MODEL)

        def batch_loss(index: Tensor) -> Tensor:
            return F.cross_entropy(model(train.images[index]).permute(0, 3, 1, 2), train.labels[index])

        return _fit(model, len(train), batch_loss, settings.epochs, settings.batch_size, settings.lr,
                    settings.weight_decay, gen, "vmeanba train-demo --task segmentation", progress)


def save_checkpoint(model: nn.Module, path: Union[str, Path], data: Union[DigitsData, CanvasData],
                    settings: Union[TrainingSettings, SegmentationTrainingSettings]) -> Path:
    """Write state_dict + config name + split and training metadata (+ the accuracy, or mIoU,
    reached on every split, which loaders and the tests compare against)."""
    task = "segmentation" if isinstance(data, CanvasData) else "digits"
    spec = _TASKS[task]
    with torch.no_grad():
        quality = {split: spec.evaluate(model, data.split(split).batches(512)) for split in SPLIT_NAMES}
    flag = "" if task == "digits" else f" --task {task}"
    payload = {
        "format": spec.format,
        "version": CHECKPOINT_VERSION,
        "config_name": DIGITS_MODEL if task == "digits" else SEGMENTATION_MODEL,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "metadata": {
            "split_seed": data.seed,
            "split_fingerprint": data.fingerprint(),
            "training": dataclasses.asdict(settings),
            spec.metric: quality,
            "torch": str(torch.__version__),
            "command": f"vmeanba train-demo{flag} --seed {settings.seed} --epochs {settings.epochs}",
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def bundled_checkpoint_path(task: str = "digits") -> Path:
    return Path(str(resources.files("vmeanba_compiler").joinpath(_task(task).asset)))


def _task(name: str) -> _Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    return _TASKS[name]


def load_checkpoint(path: Union[str, Path, None] = None, task: str = "digits") -> dict[str, Any]:
    """The checkpoint dict (weights only: no code is unpickled); default: the bundled one."""
    spec = _task(task)
    path = bundled_checkpoint_path(task) if path is None else Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != spec.format:
        flag = "" if task == "digits" else f" --task {task}"
        raise ValueError(f"{path} is not a vmeanba {task} checkpoint (written by `vmeanba train-demo{flag}`)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}; "
                         "retrain it with `vmeanba train-demo`")
    return payload


def _load_model(path: Union[str, Path, None], task: str) -> tuple[nn.Module, dict[str, Any]]:
    payload = load_checkpoint(path, task)
    model = _TASKS[task].build(payload["config_name"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["metadata"]


def _checked(data: Union[DigitsData, CanvasData], metadata: dict[str, Any], what: str) -> None:
    """Refuse data other than the checkpoint's: its "test" images could be training images."""
    if data.fingerprint() != metadata["split_fingerprint"]:
        raise RuntimeError(
            f"the {what} drawn with seed {metadata['split_seed']} differ from those the checkpoint was trained "
            "on (another scikit-learn or numpy version?); retrain with `vmeanba train-demo`"
        )


def load_trained_model(path: Union[str, Path]) -> nn.Module:
    """The model in eval mode from a checkpoint written by `vmeanba train-demo`, of either task
    (the checkpoint's format names it): what the CLI's `--checkpoint` alone loads."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    found = payload.get("format") if isinstance(payload, dict) else None
    task = next((name for name, spec in _TASKS.items() if spec.format == found), None)
    if task is None:
        raise ValueError(f"{path} is not a checkpoint written by `vmeanba train-demo` (any --task); to load "
                         "another state_dict, also give --model module:factory that builds its model")
    return _load_model(path, task)[0]


def load_digits_model(path: Union[str, Path, None] = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a digits checkpoint; default: the bundled one."""
    return _load_model(path, "digits")


def load_digits_task(path: Union[str, Path, None] = None) -> tuple[nn.Module, DigitsData, dict[str, Any]]:
    """(model, the split it was trained on, metadata); raises if this scikit-learn draws another
    split from the recorded seed, since its "test" images could then be training images."""
    model, metadata = load_digits_model(path)
    data = load_digits_data(metadata["split_seed"])
    _checked(data, metadata, "digits split")
    return model, data, metadata


def load_segmentation_task(path: Union[str, Path, None] = None) -> tuple[nn.Module, CanvasData, dict[str, Any]]:
    """(segmentation model, the canvases it was trained on, metadata); raises if the canvases
    drawn from the recorded seed differ from the checkpoint's."""
    model, metadata = _load_model(path, "segmentation")
    data = load_canvas_data(metadata["split_seed"])
    _checked(data, metadata, "digit canvases")
    return model, data, metadata


def bundled_model() -> nn.Module:
    """The bundled digits model alone: a ready `module:factory` for the CLI
    (`--model vmeanba_compiler.training:bundled_model`)."""
    return load_digits_model()[0]


def main(args) -> int:
    """`vmeanba train-demo [--task segmentation]`: train with the given seed/epochs and write the checkpoint."""
    if args.task == "digits":
        settings: Any = TrainingSettings(epochs=args.epochs or TrainingSettings.epochs, seed=args.seed)
        data: Any = load_digits_data(DIGITS_SEED)
        model = train_digits_model(data, settings, progress=not args.quiet)
    else:
        settings = SegmentationTrainingSettings(epochs=args.epochs or SegmentationTrainingSettings.epochs,
                                                seed=args.seed)
        data = load_canvas_data(DIGITS_SEED)
        model = train_segmentation_model(data, settings, progress=not args.quiet)
    out = args.out or f"{args.task}_vmamba.pt"
    path = save_checkpoint(model, out, data, settings)
    spec = _TASKS[args.task]
    quality = load_checkpoint(path, args.task)["metadata"][spec.metric]
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {spec.metric} " +
          ", ".join(f"{split} {quality[split]:.2%}" for split in SPLIT_NAMES))
    return 0
