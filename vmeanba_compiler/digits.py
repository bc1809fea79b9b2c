"""The bundled real-data task: scikit-learn's 8x8 handwritten digits, split once and for all.

`load_digits` ships inside scikit-learn (1797 images, no download), so the demo, the experiments
and the tests run on real data on any machine. The split is stratified and seeded: train (60%)
fits the bundled model, calibration (20%) is all that calibration and site selection may see,
and test (20%) is held out for every accuracy this project reports. `split_fingerprint` hashes
the chosen indices, so a checkpoint can prove it was trained on the split it is evaluated with.

The segmentation task is built from the same split: `load_canvas_data` composes several digits
onto larger canvases (seeded placements and scales) with a per-pixel label map, each split's
canvases from that split's digit images only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from .extras import import_extra

DIGITS_SEED = 0
CALIBRATION_BATCH = 64  # images per calibration batch (the impact score is a mean over batches)
SPLIT_NAMES = ("train", "calibration", "test")
_FRACTIONS = (0.6, 0.2, 0.2)
_MAX_PIXEL = 16.0  # load_digits pixels are integers 0..16
_PURPOSE = "the digits data set (vmeanba demo, train-demo, experiments)"


class _Batched:
    """Batching shared by both tasks' splits (each has `images` and `labels` along dim 0)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """(images, labels) pairs in a fixed order; the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [(self.images[i : i + batch_size], self.labels[i : i + batch_size])
                for i in range(0, len(self), batch_size)]

    def image_batches(self, batch_size: int) -> list[Tensor]:
        """Images only, for calibration and other label-free uses."""
        return [images for images, _ in self.batches(batch_size)]


@dataclass(frozen=True)
class DigitsSplit(_Batched):
    """One split: images (n, 1, 8, 8) float32 in [0, 1] and labels (n,) int64."""

    images: Tensor
    labels: Tensor
    indices: tuple[int, ...]  # rows of sklearn's load_digits()


class _ThreeSplits:
    """split(name) and iteration in SPLIT_NAMES order, shared by both tasks' data sets."""

    _kind = ""  # names the data set in errors

    def split(self, name: str) -> Any:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown {self._kind} split {name!r}; choose one of {SPLIT_NAMES}")
        return getattr(self, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(getattr(self, name) for name in SPLIT_NAMES)


@dataclass(frozen=True)
class DigitsData(_ThreeSplits):
    train: DigitsSplit
    calibration: DigitsSplit
    test: DigitsSplit
    seed: int
    _kind = "digits"

    def fingerprint(self) -> str:
        return split_fingerprint(self)



def _split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train_test_split = import_extra("sklearn.model_selection", _PURPOSE).train_test_split

    everything = np.arange(len(labels))
    test_share = _FRACTIONS[2]
    calibration_share = _FRACTIONS[1] / (1 - test_share)
    rest, test = train_test_split(everything, test_size=test_share, random_state=seed, stratify=labels)
    train, calibration = train_test_split(
        rest, test_size=calibration_share, random_state=seed, stratify=labels[rest]
    )
    return np.sort(train), np.sort(calibration), np.sort(test)


def load_digits_data(seed: int = DIGITS_SEED) -> DigitsData:
    """The digits as three stratified splits (60/20/20) drawn with `seed`; same seed, same split."""
    load_digits = import_extra("sklearn.datasets", _PURPOSE).load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / _MAX_PIXEL).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    splits = [
        DigitsSplit(images[torch.from_numpy(idx)].contiguous(), labels[torch.from_numpy(idx)].contiguous(),
                    tuple(int(i) for i in idx))
        for idx in _split_indices(bunch.target, seed)
    ]
    return DigitsData(*splits, seed=seed)


def split_fingerprint(data: DigitsData) -> str:
    """sha256 of the three index lists: equal fingerprints mean the very same split."""
    digest = hashlib.sha256()
    for name, split in zip(SPLIT_NAMES, data):
        digest.update(f"{name}:{','.join(map(str, split.indices))};".encode())
    return digest.hexdigest()


def calibration_batches(batch_size: int = CALIBRATION_BATCH) -> list[Tensor]:
    """Calibration-split images of the default split: a ready `--data` for `vmeanba calibrate`."""
    return load_digits_data().calibration.image_batches(batch_size)


def labelled_calibration_batches(batch_size: int = CALIBRATION_BATCH) -> list[tuple[Tensor, Tensor]]:
    """(images, labels) of the default calibration split, for `--labelled` CLI runs."""
    return load_digits_data().calibration.batches(batch_size)


def labelled_test_batches(batch_size: int = 512) -> list[tuple[Tensor, Tensor]]:
    """(images, labels) of the default held-out test split."""
    return load_digits_data().test.batches(batch_size)


# ---------------------------------------------------------------------------------------------
# The segmentation task: digits composed onto larger canvases, with a per-pixel label map.
# ---------------------------------------------------------------------------------------------

BACKGROUND = 0  # label of uncovered pixels; digit k is labelled k + 1
SEGMENTATION_CLASSES = 11
INK_THRESHOLD = 0.25  # a pixel is labelled with its digit where the scaled digit's ink exceeds this


@dataclass(frozen=True)
class CanvasSettings:
    """How canvases are drawn (the defaults are the bundled segmentation task's).

    Each canvas gets `min_digits`..`max_digits` digits (uniform), each scaled from 8x8 to a
    square side drawn uniformly in `min_side`..`max_side` (bilinear) and put at a uniform
    position where its box overlaps no box placed before; a digit that finds no free position
    in `placement_tries` draws is left out, so a crowded canvas can hold fewer than drawn.
    """

    size: int = 32
    min_digits: int = 2
    max_digits: int = 4
    min_side: int = 8
    max_side: int = 14
    placement_tries: int = 50
    canvases: tuple[int, int, int] = (1600, 400, 400)  # train, calibration, test

    def __post_init__(self) -> None:
        if not 8 <= self.min_side <= self.max_side <= self.size:
            raise ValueError(f"need 8 <= min_side <= max_side <= size, got {self.min_side}, {self.max_side}, "
                             f"{self.size}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")


@dataclass(frozen=True)
class Placement:
    """One digit on a canvas: the load_digits row, its class, and its box (top, left, side)."""

    row: int
    digit: int
    top: int
    left: int
    side: int


@dataclass(frozen=True)
class CanvasSplit(_Batched):
    """images (n, 1, size, size) float32 in [0, 1]; labels (n, size, size) int64 in
    0..SEGMENTATION_CLASSES-1 (label maps); placements[i]: the digits drawn on canvas i."""

    images: Tensor
    labels: Tensor
    placements: tuple[tuple[Placement, ...], ...]


@dataclass(frozen=True)
class CanvasData(_ThreeSplits):
    """The three canvas splits; split i only uses digits (load_digits rows) of digits split i."""

    train: CanvasSplit
    calibration: CanvasSplit
    test: CanvasSplit
    digits: DigitsData
    settings: CanvasSettings
    seed: int
    _kind = "canvas"


    def fingerprint(self) -> str:
        """sha256 of the digits split, the settings, the seed and every placement: equal
        fingerprints mean the same canvases."""
        digest = hashlib.sha256(f"{self.digits.fingerprint()};{self.settings};{self.seed};".encode())
        for name, split in zip(SPLIT_NAMES, self):
            digest.update(f"{name}:{split.placements};".encode())
        return digest.hexdigest()



def _scaled(digit: Tensor, side: int) -> Tensor:
    """An (8, 8) digit resized to (side, side), bilinear; ink stays in [0, 1]."""
    resized = torch.nn.functional.interpolate(digit[None, None], size=(side, side), mode="bilinear",
                                              align_corners=False)
    return resized[0, 0].clamp(0.0, 1.0)


def _draw_canvases(source: DigitsSplit, count: int, settings: CanvasSettings,
                   rng: np.random.Generator) -> CanvasSplit:
    size = settings.size
    images = torch.zeros(count, 1, size, size)
    labels = torch.full((count, size, size), BACKGROUND, dtype=torch.int64)
    placements = []
    for i in range(count):
        boxes: list[Placement] = []
        for _ in range(int(rng.integers(settings.min_digits, settings.max_digits + 1))):
            pick = int(rng.integers(len(source)))
            side = int(rng.integers(settings.min_side, settings.max_side + 1))
            for _ in range(settings.placement_tries):
                top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if all(top + side <= b.top or b.top + b.side <= top or left + side <= b.left
                       or b.left + b.side <= left for b in boxes):
                    break
            else:
                continue
            ink = _scaled(source.images[pick, 0], side)
            digit = int(source.labels[pick])
            images[i, 0, top : top + side, left : left + side] = ink
            labels[i, top : top + side, left : left + side][ink > INK_THRESHOLD] = digit + 1
            boxes.append(Placement(source.indices[pick], digit, top, left, side))
        placements.append(tuple(boxes))
    return CanvasSplit(images, labels, tuple(placements))


def load_canvas_data(seed: int = DIGITS_SEED, settings: CanvasSettings = CanvasSettings()) -> CanvasData:
    """Digit canvases with per-pixel labels, drawn with `seed` (numpy's PCG64); same seed and
    settings, same tensors. Canvases of each split are built from that split's digits only, so
    no test canvas shows a digit image a training canvas shows. Boxes never overlap, so every
    pixel belongs to at most one digit: its label is that digit + 1 where the digit's ink
    exceeds INK_THRESHOLD, else BACKGROUND (0); mIoU counts the background class too."""
    digits = load_digits_data(seed)
    rngs = [np.random.default_rng([seed, i]) for i in range(len(SPLIT_NAMES))]
    splits = [_draw_canvases(source, count, settings, rng)
              for source, count, rng in zip(digits, settings.canvases, rngs)]
    return CanvasData(*splits, digits=digits, settings=settings, seed=seed)
