"""Segmentation metrics compatible with the official SemanticKITTI evaluator (semantic-kitti-api).

Orientation: every confusion matrix in this module's API has rows = ground truth and
columns = prediction (``conf[gt, pred]``). The official ``np_ioueval.iouEval`` stores the
transpose (``conf[pred, gt]``); the formulas below are its formulas re-expressed for our
orientation, so the numbers are identical:

- points whose ground truth is the ignore id (0) are dropped (official: ``conf[:, ignore] = 0``,
  i.e. our row 0). A prediction of 0 on a labelled point stays in the matrix: it is a false
  negative of the true class and a false positive of no evaluated class;
- tp = diag, fp = column sum - tp, fn = row sum - tp;
- IoU_c = tp / (tp + fp + fn + 1e-15); mIoU = mean over every class except the ignore id
  (19 for SemanticKITTI), so a class with neither ground truth nor prediction scores 0;
- accuracy (official ``getacc``) = sum(tp) / (sum(tp) + sum(fp)) over the evaluated classes,
  i.e. correct points / labelled points predicted as an evaluated class. Labelled points
  predicted as the ignore id are in neither numerator nor denominator. We also report
  ``accuracy_labelled`` = sum(tp) / sum(tp + fn) = correct / all labelled points, which counts
  them as errors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "ConfusionAccumulator",
    "confusion_matrix",
    "iou_from_confusion",
    "summarize",
]

_EPS = 1e-15  # the official evaluator's epsilon


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _as_int_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_range(lo: int, hi: int, name: str, num_classes: int) -> None:
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} ids must be in [0, {num_classes - 1}], found range [{lo}, {hi}]")


def confusion_matrix(pred, gt, num_classes: int = 20) -> np.ndarray:
    """(C, C) int64 confusion matrix, rows = ground truth, columns = prediction.

    One bincount over gt * C + pred; all ids (including the ignore id 0) are counted, the
    ignore handling happens in `iou_from_confusion`.
    """
    pred = _as_int_array(pred, "pred")
    gt = _as_int_array(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same number of points, "
                         f"got {pred.size} and {gt.size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if gt.size:
        _check_range(int(pred.min()), int(pred.max()), "pred", num_classes)
        _check_range(int(gt.min()), int(gt.max()), "gt", num_classes)
    flat = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _torch_confusion(pred, gt, num_classes: int):
    """Same as `confusion_matrix` but on the tensors' device (no host transfer of the points)."""
    import torch

    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).to(pred.device).long()
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same number of points, "
                         f"got {pred.numel()} and {gt.numel()}")
    if gt.numel():
        bounds = torch.stack([pred.min(), pred.max(), gt.min(), gt.max()]).tolist()
        _check_range(bounds[0], bounds[1], "pred", num_classes)
        _check_range(bounds[2], bounds[3], "gt", num_classes)
    flat = torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


class ConfusionAccumulator:
    """Running confusion matrix (rows = gt, cols = pred) over many scans.

    `add` takes numpy arrays or torch tensors; torch inputs are counted on their own device
    and kept there until `.matrix` is read, so evaluation on a GPU does not sync per batch
    beyond the range check.
    """

    def __init__(self, num_classes: int = 20):
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self._host = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._device: dict = {}

    def add(self, pred, gt) -> "ConfusionAccumulator":
        if _is_torch(pred) or _is_torch(gt):
            import torch

            pred_t = torch.as_tensor(pred)
            gt_t = torch.as_tensor(gt, device=pred_t.device)
            counts = _torch_confusion(pred_t, gt_t, self.num_classes)
            key = str(counts.device)
            if key in self._device:
                self._device[key] += counts
            else:
                self._device[key] = counts.clone()
        else:
            self._host += confusion_matrix(pred, gt, self.num_classes)
        return self

    def merge(self, other: "ConfusionAccumulator | np.ndarray") -> "ConfusionAccumulator":
        """Add another accumulator's (or a plain matrix's) counts into this one."""
        mat = other.matrix if isinstance(other, ConfusionAccumulator) else np.asarray(other)
        if mat.shape != self._host.shape:
            raise ValueError(f"cannot merge a {mat.shape} confusion matrix into "
                             f"{self._host.shape}")
        self._host += mat.astype(np.int64, copy=False)
        return self

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated (C, C) int64 matrix as numpy (a copy)."""
        total = self._host.copy()
        for counts in self._device.values():
            total += counts.cpu().numpy().astype(np.int64, copy=False)
        return total


def _included(num_classes: int, ignore_index: int | None) -> np.ndarray:
    include = np.ones(num_classes, dtype=bool)
    if ignore_index is not None:
        include[ignore_index] = False
    return include


def iou_from_confusion(conf, ignore_index: int | None = 0,
                       hard_classes: Sequence[int] | None = None) -> dict:
    """Official SemanticKITTI statistics from a confusion matrix with rows = gt, cols = pred.

    Returns numpy/float values: "iou" (C,) per class (the ignore id's entry is meaningless and
    set to 0 by the formula), "tp", "fp", "fn" (C,), "miou" (official: mean over all classes
    except the ignore id, absent ones scoring 0), "miou_present" (mean over evaluated classes
    with ground truth; NaN if none), "hard_miou" (mean over `hard_classes`, absent ones
    scoring 0, like the official mean; NaN if not given), "accuracy" (official getacc) and
    "accuracy_labelled" (see the module docstring).
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    num_classes = conf.shape[0]
    if ignore_index is not None and not 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} outside [0, {num_classes - 1}]")
    conf = conf.copy()
    if ignore_index is not None:
        conf[ignore_index, :] = 0  # official: conf[:, ignore] = 0 in its (pred, gt) layout

    tp = np.diag(conf).copy()
    fp = conf.sum(axis=0) - tp
    fn = conf.sum(axis=1) - tp
    iou = tp / (tp + fp + fn + _EPS)
    include = _included(num_classes, ignore_index)
    miou = float(iou[include].mean()) if include.any() else float("nan")

    present = include & ((tp + fn) > 0)
    miou_present = float(iou[present].mean()) if present.any() else float("nan")

    if hard_classes is not None and len(hard_classes):
        hard = np.asarray(list(hard_classes), dtype=np.int64)
        if hard.min() < 0 or hard.max() >= num_classes or (
                ignore_index is not None and np.any(hard == ignore_index)):
            raise ValueError(f"hard classes {hard.tolist()} must be evaluated class ids")
        hard_miou = float(iou[hard].mean())
    else:
        hard_miou = float("nan")

    accuracy = float(tp.sum() / (tp[include].sum() + fp[include].sum() + _EPS))
    accuracy_labelled = float(tp[include].sum() / (tp[include].sum() + fn[include].sum() + _EPS))
    return {
        "iou": iou,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "miou": miou,
        "miou_present": miou_present,
        "hard_miou": hard_miou,
        "accuracy": accuracy,
        "accuracy_labelled": accuracy_labelled,
    }


def _json_float(x: float):
    x = float(x)
    return None if np.isnan(x) else x


def summarize(conf, class_names: Sequence[str], hard_classes: Sequence[int] = (),
              ignore_index: int | None = 0) -> dict:
    """All metrics in a JSON-serialisable dict (NaN, i.e. undefined, becomes None).

    Per-class entries cover the evaluated classes only (the ignore id is left out); the
    confusion matrix is included as nested lists, rows = ground truth, columns = prediction.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if len(class_names) != conf.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {conf.shape[0]}-class matrix")
    stats = iou_from_confusion(conf, ignore_index=ignore_index, hard_classes=hard_classes)
    include = _included(conf.shape[0], ignore_index)
    ids = np.flatnonzero(include)
    gt_counts = conf.sum(axis=1)
    return {
        "miou": _json_float(stats["miou"]),
        "miou_present": _json_float(stats["miou_present"]),
        "hard_miou": _json_float(stats["hard_miou"]),
        "accuracy": _json_float(stats["accuracy"]),
        "accuracy_labelled": _json_float(stats["accuracy_labelled"]),
        "num_classes_evaluated": int(include.sum()),
        "hard_classes": [int(c) for c in hard_classes],
        "hard_class_names": [class_names[int(c)] for c in hard_classes],
        "per_class": [
            {
                "id": int(c),
                "name": class_names[c],
                "iou": float(stats["iou"][c]),
                "tp": int(stats["tp"][c]),
                "fp": int(stats["fp"][c]),
                "fn": int(stats["fn"][c]),
                "gt_points": int(gt_counts[c]),
                "hard": int(c) in set(int(h) for h in hard_classes),
            }
            for c in ids
        ],
        "ignored_gt_points": int(gt_counts[ignore_index]) if ignore_index is not None else 0,
        "confusion": conf.tolist(),
        "class_names": list(class_names),
    }
