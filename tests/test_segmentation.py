"""The segmentation task: the digit-canvas generator, the mIoU metric, the segmenter model, its
bundled checkpoint and reproducible training, and the budget bound on per-image scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vmeanba_compiler.budget import paired_drop_bound
from vmeanba_compiler.digits import (
    BACKGROUND,
    INK_THRESHOLD,
    SEGMENTATION_CLASSES,
    CanvasSettings,
    load_canvas_data,
    load_digits_data,
)
from vmeanba_compiler.evaluation import class_ious, confusion_matrices, image_mean_ious, mean_iou
from vmeanba_compiler.models import SS2D
from vmeanba_compiler.models.segmentation import build_segmenter
from vmeanba_compiler.training import (
    SegmentationTrainingSettings,
    bundled_checkpoint_path,
    load_segmentation_task,
    train_segmentation_model,
)

SMALL = CanvasSettings(canvases=(40, 20, 20))


@pytest.fixture(scope="module")
def small():
    return load_canvas_data(0, SMALL)


def test_same_seed_same_canvases_other_seed_other_canvases(small):
    again = load_canvas_data(0, SMALL)
    for a, b in zip(small, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.placements == b.placements
    assert small.fingerprint() == again.fingerprint()
    other = load_canvas_data(1, SMALL)
    assert not torch.equal(other.train.images, small.train.images)
    assert other.fingerprint() != small.fingerprint()


def test_every_label_is_the_ink_of_the_one_digit_box_covering_it(small):
    digits = load_digits_data(0)
    source = {row: image for split in digits for row, image in zip(split.indices, split.images[:, 0])}
    for split in small:
        size = split.images.shape[-1]
        assert split.images.shape[1:] == (1, size, size) and split.labels.shape[1:] == (size, size)
        for image, labels, placed in zip(split.images[:, 0], split.labels, split.placements):
            assert 1 <= len(placed) <= SMALL.max_digits
            covered = torch.zeros(size, size, dtype=torch.bool)
            for p in placed:
                assert SMALL.min_side <= p.side <= SMALL.max_side
                assert 0 <= p.top <= size - p.side and 0 <= p.left <= size - p.side
                box = (slice(p.top, p.top + p.side), slice(p.left, p.left + p.side))
                assert not covered[box].any(), "boxes overlap"
                covered[box] = True
                # the box holds the source digit resized (bilinear), and is labelled where its ink > threshold
                expected = F.interpolate(source[p.row][None, None], size=(p.side, p.side), mode="bilinear",
                                         align_corners=False)[0, 0].clamp(0, 1)
                assert torch.allclose(image[box], expected)
                inked = image[box] > INK_THRESHOLD
                assert inked.any()
                assert (labels[box][inked] == p.digit + 1).all()
                assert (labels[box][~inked] == BACKGROUND).all()
            assert (image[~covered] == 0).all() and (labels[~covered] == BACKGROUND).all()
            # every labelled pixel has ink above the threshold, every background pixel at most it
            assert (image[labels != BACKGROUND] > INK_THRESHOLD).all()
            assert (image[labels == BACKGROUND] <= INK_THRESHOLD).all()


def test_each_split_draws_only_its_own_digit_images(small):
    digits = load_digits_data(0)
    for canvases, split in zip(small, digits):
        rows = {p.row for placed in canvases.placements for p in placed}
        assert rows <= set(split.indices)
        labels_of = dict(zip(split.indices, split.labels.tolist()))
        assert all(p.digit == labels_of[p.row] for placed in canvases.placements for p in placed)


def test_bundled_canvases_have_every_class_and_mostly_background():
    data = load_canvas_data()
    assert [len(s) for s in data] == list(CanvasSettings().canvases)
    for split in data:
        counts = split.labels.flatten().bincount(minlength=SEGMENTATION_CLASSES)
        assert len(counts) == SEGMENTATION_CLASSES and (counts > 0).all()
        assert 0.7 < counts[BACKGROUND] / counts.sum() < 0.95
        digits = counts[1:].double()
        assert digits.min() > 0.5 * digits.mean()  # no class starved
        per_canvas = sum(len(p) for p in split.placements) / len(split)
        assert 2.5 < per_canvas <= 4


def test_miou_matches_a_hand_computed_case():
    # Two 2x3 label maps, 3 classes. Image 0 target / prediction:   Image 1 target / prediction:
    #   0 0 1    0 1 1                                                2 2 0    2 0 0
    #   0 2 2    0 2 0                                                2 2 0    2 2 0
    target = torch.tensor([[[0, 0, 1], [0, 2, 2]], [[2, 2, 0], [2, 2, 0]]])
    predicted = torch.tensor([[[0, 1, 1], [0, 2, 0]], [[2, 0, 0], [2, 2, 0]]])
    # Over both images (12 pixels):
    #   class 0: TP 2 + 2 = 4; FP (pred 0, not 0): img0 (1,2) + img1 (0,1) = 2; FN (0 predicted else): img0 (0,1) = 1
    #            IoU = 4 / 7
    #   class 1: TP 1 (img0 (0,2)); FP 1 (img0 (0,1)); FN 0 -> IoU 1 / 2
    #   class 2: TP 1 + 3 = 4; FP 0; FN img0 (1,2) + img1 (0,1) = 2 -> IoU 4 / 6
    #   mIoU = (4/7 + 1/2 + 2/3) / 3 = 0.579365...
    both = confusion_matrices(predicted, target, 3).sum(0)
    assert torch.allclose(class_ious(both), torch.tensor([4 / 7, 1 / 2, 4 / 6], dtype=torch.float64))
    logits = F.one_hot(predicted, 3).float()  # channels-last logits whose argmax is `predicted`
    batches = [(torch.zeros(2, 1), target)]
    assert mean_iou(lambda _: logits, batches) == pytest.approx((4 / 7 + 1 / 2 + 2 / 3) / 3)
    # Per image: image 0 has classes 0, 1, 2: IoU 2/4 (TP 2, FP 1, FN 1), 1/2, 1/2 -> 1/2.
    # Image 1 has no class 1 in target or prediction, so it is left out: class 0 2/3, class 2 3/4 -> 17/24.
    per_image = image_mean_ious(lambda _: logits, batches)
    assert torch.allclose(per_image, torch.tensor([1 / 2, 17 / 24], dtype=torch.float64))


def test_mean_iou_refuses_class_labels_without_maps():
    with pytest.raises(ValueError, match="label maps"):
        mean_iou(lambda x: x, [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))])


def test_the_bound_on_per_image_scores_extends_agresti_min():
    # For 0/1 scores it is Agresti-Min's bound exactly (tests/test_budget.py checks the formula).
    base = torch.ones(50, dtype=torch.bool)
    worse = base.clone()
    worse[:2] = False
    assert paired_drop_bound(base, worse, 1.645) == paired_drop_bound(base.double(), worse.double(), 1.645)
    # Scores in [0, 1]: 4 images, differences d = 0.1, 0.1, 0.0, 0.2, plus the pseudo-samples
    # (+1 and -1 with weight 1/2, 0 with weight 1): n' = 6, sum d' = 0.4, sum d'^2 = 0.06 + 1 = 1.06,
    # bound = 0.4 / 6 + z * sqrt(1.06 - 0.16 / 6) / 6.
    baseline = torch.tensor([0.9, 0.8, 0.7, 1.0])
    reduced = torch.tensor([0.8, 0.7, 0.7, 0.8])
    z = 1.645
    expected = 0.4 / 6 + z * math.sqrt(1.06 - 0.16 / 6) / 6
    assert paired_drop_bound(baseline, reduced, z) == pytest.approx(expected, rel=1e-6)


def test_segmenter_labels_every_pixel_and_has_five_scan_sites():
    torch.manual_seed(0)
    model = build_segmenter().eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 32, 32, SEGMENTATION_CLASSES)
    assert sum(isinstance(m, SS2D) for m in model.modules()) == 5


def test_bundled_checkpoint_is_small_and_reaches_its_recorded_miou():
    model, data, metadata = load_segmentation_task()
    assert bundled_checkpoint_path("segmentation").stat().st_size < 1e6
    assert metadata["split_fingerprint"] == data.fingerprint()
    measured = mean_iou(model, data.test.batches(200))
    assert measured == pytest.approx(metadata["miou"]["test"], abs=1e-6)
    assert measured >= 0.7


def test_segmentation_training_is_bit_reproducible_for_a_seed_and_differs_across_seeds(small):
    short = SegmentationTrainingSettings(epochs=1, batch_size=20)
    runs = [train_segmentation_model(small, settings, progress=False).state_dict()
            for settings in (short, short, SegmentationTrainingSettings(epochs=1, batch_size=20, seed=1))]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_a_checkpoint_alone_loads_as_the_model_of_its_own_task(tmp_path):
    """`--checkpoint` without `--model` (loading.load_model) reads either task's train-demo file."""
    from vmeanba_compiler.loading import load_model
    from vmeanba_compiler.models.segmentation import VMambaSegmenter
    from vmeanba_compiler.models.vmamba import VMamba
    from vmeanba_compiler.training import bundled_checkpoint_path

    segmenter = load_model(None, str(bundled_checkpoint_path("segmentation")))
    classifier = load_model(None, str(bundled_checkpoint_path("digits")))
    assert isinstance(segmenter, VMambaSegmenter) and not segmenter.training
    assert isinstance(classifier, VMamba) and not classifier.training
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": segmenter.state_dict()}, other)
    with pytest.raises(ValueError, match="not a checkpoint written by `vmeanba train-demo`.*--model"):
        load_model(None, str(other))
