"""The bundled real-data task: scikit-learn's 8x8 handwritten digits, split once and for all.

`load_digits` ships inside scikit-learn (1797 images, no download), so the demo, the experiments
and the tests run on real data on any machine. The split is stratified and seeded: train (60%)
fits the bundled model, calibration (20%) is all that calibration and site selection may see,
and test (20%) is held out for every accuracy this project reports. `split_fingerprint` hashes
the chosen indices, so a checkpoint can prove it was trained on the split it is evaluated with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

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


@dataclass(frozen=True)
class DigitsSplit:
    """One split: images (n, 1, 8, 8) float32 in [0, 1] and labels (n,) int64."""

    images: Tensor
    labels: Tensor
    indices: tuple[int, ...]  # rows of sklearn's load_digits()

    def __len__(self) -> int:
        return len(self.indices)

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
class DigitsData:
    train: DigitsSplit
    calibration: DigitsSplit
    test: DigitsSplit
    seed: int

    def split(self, name: str) -> DigitsSplit:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown digits split {name!r}; choose one of {SPLIT_NAMES}")
        return getattr(self, name)

    def fingerprint(self) -> str:
        return split_fingerprint(self)

    def __iter__(self) -> Iterator[DigitsSplit]:
        return iter((self.train, self.calibration, self.test))


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
