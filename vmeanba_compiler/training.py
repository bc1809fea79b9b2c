"""Train the bundled digits VMamba (`vmeanba train-demo`) and save/load its checkpoint.

Training is seeded and runs on ONE thread: CPU kernels may split reductions differently for
other thread counts, which changes float rounding and so the weights. With the same seed and
the same torch version a retrain reproduces the bundled checkpoint bit for bit
(`tests/test_digits_model.py` checks a short run twice). Augmentation is a random shift of up to
one pixel (pad, then crop), drawn from the seeded generator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .digits import DIGITS_SEED, DigitsData, load_digits_data
from .evaluation import accuracy
from .models import build_vmamba
from .threads import torch_threads

DIGITS_MODEL = "vmamba_digits"
CHECKPOINT_FORMAT = "vmeanba-digits-checkpoint"
CHECKPOINT_VERSION = 1
BUNDLED_CHECKPOINT = "assets/digits_vmamba.pt"


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


def _shift(images: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill): digits stay legible."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def train_digits_model(
    data: Optional[DigitsData] = None, settings: TrainingSettings = TrainingSettings(), *, progress: bool = True
) -> nn.Module:
    """Train `vmamba_digits` on the train split only (no other split is read); returns the model
    in eval mode."""
    from tqdm.auto import tqdm

    data = load_digits_data() if data is None else data
    train = data.train
    with torch_threads(1), torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        model = build_vmamba(DIGITS_MODEL)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        steps_per_epoch = math.ceil(len(train) / settings.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.1
        )
        bar = tqdm(range(settings.epochs), desc="vmeanba train-demo", disable=not progress)
        for _ in bar:
            model.train()
            order = torch.randperm(len(train), generator=gen)
            total = 0.0
            for start in range(0, len(train), settings.batch_size):
                index = order[start : start + settings.batch_size]
                images = _shift(train.images[index], settings.max_shift, gen)
                loss = F.cross_entropy(model(images), train.labels[index], label_smoothing=settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(index)
            bar.set_postfix(loss=f"{total / len(train):.3f}")
    return model.eval()


def save_checkpoint(model: nn.Module, path: Union[str, Path], data: DigitsData, settings: TrainingSettings) -> Path:
    """Write state_dict + config name + split and training metadata (+ the accuracies reached,
    which `load_digits_model` users and the tests compare against)."""
    with torch.no_grad():
        accuracies = {split: accuracy(model, data.split(split).batches(512))
                      for split in ("train", "calibration", "test")}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config_name": DIGITS_MODEL,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "metadata": {
            "split_seed": data.seed,
            "split_fingerprint": data.fingerprint(),
            "training": dataclasses.asdict(settings),
            "accuracy": accuracies,
            "torch": str(torch.__version__),
            "command": f"vmeanba train-demo --seed {settings.seed} --epochs {settings.epochs}",
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def bundled_checkpoint_path() -> Path:
    return Path(str(resources.files("vmeanba_compiler").joinpath(BUNDLED_CHECKPOINT)))


def load_checkpoint(path: Union[str, Path, None] = None) -> dict[str, Any]:
    """The checkpoint dict (weights only: no code is unpickled); default: the bundled one."""
    path = bundled_checkpoint_path() if path is None else Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vmeanba digits checkpoint (written by `vmeanba train-demo`)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}; "
                         "retrain it with `vmeanba train-demo`")
    return payload


def load_digits_model(path: Union[str, Path, None] = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a digits checkpoint; default: the bundled one."""
    payload = load_checkpoint(path)
    model = build_vmamba(payload["config_name"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["metadata"]


def load_digits_task(path: Union[str, Path, None] = None) -> tuple[nn.Module, DigitsData, dict[str, Any]]:
    """(model, the split it was trained on, metadata); raises if this scikit-learn draws another
    split from the recorded seed, since its "test" images could then be training images."""
    model, metadata = load_digits_model(path)
    data = load_digits_data(metadata["split_seed"])
    if data.fingerprint() != metadata["split_fingerprint"]:
        raise RuntimeError(
            f"the digits split drawn with seed {metadata['split_seed']} differs from the one the checkpoint "
            "was trained on (another scikit-learn version?); retrain with `vmeanba train-demo`"
        )
    return model, data, metadata


def bundled_model() -> nn.Module:
    """The bundled digits model alone: a ready `module:factory` for the CLI
    (`--model vmeanba_compiler.training:bundled_model`)."""
    return load_digits_model()[0]


def main(args) -> int:
    """`vmeanba train-demo`: train with the given seed/epochs and write the checkpoint."""
    settings = TrainingSettings(epochs=args.epochs, seed=args.seed)
    data = load_digits_data(DIGITS_SEED)
    model = train_digits_model(data, settings, progress=not args.quiet)
    path = save_checkpoint(model, args.out, data, settings)
    metadata = load_checkpoint(path)["metadata"]
    acc = metadata["accuracy"]
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): train {acc['train']:.2%}, "
          f"calibration {acc['calibration']:.2%}, test {acc['test']:.2%}")
    return 0
