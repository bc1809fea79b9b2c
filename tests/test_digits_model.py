"""The bundled real-data task: the digits split, the shipped checkpoint, reproducible training,
and 40% magnitude pruning."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from vmeanba_compiler.digits import load_digits_data
from vmeanba_compiler.evaluation import accuracy
from vmeanba_compiler.models import MODEL_CONFIGS, SS2D
from vmeanba_compiler.pruning import PRUNABLE, prune_global_magnitude, weight_sparsity
from vmeanba_compiler.training import (
    TrainingSettings,
    bundled_checkpoint_path,
    load_digits_task,
    train_digits_model,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task():
    return load_digits_task()


def test_split_is_deterministic_disjoint_complete_and_stratified():
    first, second = load_digits_data(0), load_digits_data(0)
    assert first.fingerprint() == second.fingerprint()
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    indices = [set(split.indices) for split in first]
    assert sum(map(len, indices)) == len(set().union(*indices)) == 1797
    assert [len(split) for split in first] == [1077, 360, 360]
    everything = torch.cat([split.labels for split in first]).bincount()
    for split in first:
        expected = everything.double() * len(split) / 1797
        assert (split.labels.bincount(minlength=10).double() - expected).abs().max() <= 1.0
    assert load_digits_data(1).fingerprint() != first.fingerprint()


def test_images_are_scaled_pixels_of_one_channel(task):
    _, data, _ = task
    images = data.train.images
    assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
    assert images.min() == 0.0 and images.max() == 1.0


def test_bundled_checkpoint_is_small_packaged_and_reaches_its_recorded_accuracy(task):
    model, data, metadata = task
    path = bundled_checkpoint_path()
    assert path.stat().st_size < 2e6
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(path.match(pattern) for pattern in package_data["vmeanba_compiler"])
    assert metadata["split_fingerprint"] == data.fingerprint()
    for split in ("train", "calibration", "test"):
        measured = accuracy(model, data.split(split).batches(512))
        assert measured == pytest.approx(metadata["accuracy"][split], abs=1.01 / len(data.split(split))), split
    assert metadata["accuracy"]["test"] >= 0.97


def test_bundled_model_is_the_named_config_with_at_least_four_scan_sites(task):
    model, _, _ = task
    assert model.config == MODEL_CONFIGS["vmamba_digits"]
    assert sum(isinstance(m, SS2D) for m in model.modules()) >= 4


def test_training_is_bit_reproducible_for_a_seed_and_differs_across_seeds():
    data = load_digits_data()
    short = TrainingSettings(epochs=1, batch_size=128)
    tiny = type(data)(train=type(data.train)(data.train.images[:256], data.train.labels[:256],
                                             data.train.indices[:256]),
                      calibration=data.calibration, test=data.test, seed=data.seed)
    runs = [train_digits_model(tiny, settings, progress=False).state_dict()
            for settings in (short, short, TrainingSettings(epochs=1, batch_size=128, seed=1))]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_global_magnitude_pruning_zeroes_the_smallest_40_percent_of_linear_and_conv_weights(task):
    model, _, _ = task
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_global_magnitude(model, 0.4)
    assert set(pruned.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before), "the input model changed"
    assert weight_sparsity(model) < 0.01
    assert weight_sparsity(pruned) == pytest.approx(0.4, abs=1e-3)
    pool = [(m.weight.detach(), o.weight.detach())
            for m, o in zip(pruned.modules(), model.modules()) if isinstance(m, PRUNABLE)]
    removed = torch.cat([o[p == 0].abs() for p, o in pool])
    kept = torch.cat([o[p != 0].abs() for p, o in pool])
    assert removed.max() <= kept.min()
    untouched = [k for k in before if "x_proj" in k or "A_logs" in k]
    assert untouched and all(torch.equal(pruned.state_dict()[k], before[k]) for k in untouched)
