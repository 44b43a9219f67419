"""Metrics checked against a confusion matrix and IoUs worked out by hand."""
import json

import numpy as np
import pytest

from m2skd.metrics import ConfusionAccumulator, confusion_matrix, iou_from_confusion, summarize

# Two ignored points (gt 0), one labelled point predicted as 0 (a miss of class 1).
GT = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
PRED = np.array([1, 0, 1, 1, 0, 2, 1, 3, 3, 2])
# By hand:  class 1: tp 2, fn 1 (predicted 0), fp 1 (a class-2 point); the gt-0 -> 1 point is ignored.
#           class 2: tp 1, fn 1, fp 1 (a class-3 point).   class 3: tp 2, fn 1, fp 0.
IOU = {1: 2 / 4, 2: 1 / 3, 3: 2 / 3}


def test_confusion_orientation_rows_are_gt():
    conf = confusion_matrix(PRED, GT, num_classes=20)
    assert conf.shape == (20, 20) and conf.dtype == np.int64
    assert conf[0, 1] == 1 and conf[0, 0] == 1  # gt 0 row
    assert conf[1, 1] == 2 and conf[1, 0] == 1
    assert conf[2, 2] == 1 and conf[2, 1] == 1
    assert conf[3, 3] == 2 and conf[3, 2] == 1
    assert conf.sum() == len(GT)


def test_official_iou_miou_and_accuracy():
    stats = iou_from_confusion(confusion_matrix(PRED, GT), hard_classes=[2, 3, 4])
    for c, v in IOU.items():
        assert stats["iou"][c] == pytest.approx(v)
    assert np.all(stats["iou"][4:] == 0)
    np.testing.assert_array_equal(stats["tp"][1:4], [2, 1, 2])
    np.testing.assert_array_equal(stats["fp"][1:4], [1, 1, 0])
    np.testing.assert_array_equal(stats["fn"][1:4], [1, 1, 1])
    assert stats["miou"] == pytest.approx(sum(IOU.values()) / 19)  # absent classes score 0
    assert stats["miou_present"] == pytest.approx(sum(IOU.values()) / 3)
    assert stats["hard_miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # getacc: tp / (tp + fp) = 5 / 7; the labelled point predicted 0 is in neither term.
    assert stats["accuracy"] == pytest.approx(5 / 7)
    assert stats["accuracy_labelled"] == pytest.approx(5 / 8)


def test_matches_official_formula_in_its_orientation():
    rng = np.random.default_rng(0)
    gt, pred = rng.integers(0, 6, 500), rng.integers(0, 6, 500)
    off = np.zeros((6, 6), dtype=np.int64)  # the official layout: conf[pred, gt]
    np.add.at(off, (pred, gt), 1)
    off[:, 0] = 0
    tp = np.diag(off)
    fp, fn = off.sum(1) - tp, off.sum(0) - tp
    iou = tp / (tp + fp + fn + 1e-15)
    stats = iou_from_confusion(confusion_matrix(pred, gt, 6))
    np.testing.assert_allclose(stats["iou"], iou)
    assert stats["miou"] == pytest.approx(iou[1:].mean())
    assert stats["accuracy"] == pytest.approx(tp.sum() / (tp[1:].sum() + fp[1:].sum() + 1e-15))


def test_validation_errors():
    with pytest.raises(ValueError, match="gt ids"):
        confusion_matrix([1, 2], [1, 20], num_classes=20)
    with pytest.raises(ValueError, match="pred ids"):
        confusion_matrix([-1, 2], [1, 2])
    with pytest.raises(ValueError, match="same number"):
        confusion_matrix([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix([0.5], [1])
    with pytest.raises(ValueError, match="square"):
        iou_from_confusion(np.zeros((3, 4)))


def test_accumulator_numpy_torch_and_merge():
    torch = pytest.importorskip("torch")
    acc = ConfusionAccumulator(20)
    acc.add(PRED[:5], GT[:5])
    acc.add(torch.tensor(PRED[5:]), torch.tensor(GT[5:], dtype=torch.int32))
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(PRED, GT))
    other = ConfusionAccumulator(20).add(PRED, GT)
    acc.merge(other)
    np.testing.assert_array_equal(acc.matrix, 2 * confusion_matrix(PRED, GT))
    with pytest.raises(ValueError):
        acc.add(torch.tensor([25]), torch.tensor([1]))


def test_summarize_is_json_serialisable():
    names = ["unlabeled"] + [f"c{i}" for i in range(1, 20)]
    out = summarize(confusion_matrix(PRED, GT), names, hard_classes=[2, 3, 4])
    json.dumps(out, allow_nan=False)
    assert out["miou"] == pytest.approx(sum(IOU.values()) / 19)
    assert len(out["per_class"]) == 19 and out["per_class"][0]["name"] == "c1"
    assert out["ignored_gt_points"] == 2
    empty = summarize(np.zeros((20, 20), dtype=np.int64), names)
    assert empty["miou_present"] is None and empty["hard_miou"] is None
    json.dumps(empty, allow_nan=False)
