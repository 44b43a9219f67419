"""Sparse-instance analysis: how well each hard-class ground-truth instance is recovered.

The method's claim is about sparse instances, which a class IoU hides (a few big instances
dominate it). So every hard-class instance of the ground truth (one distinct
(class, instance id > 0) in one scan) gets its point recall (fraction of its points
predicted as its class) and a hit (recall >= 0.5), and instances are bucketed by their point
count in the single scan and by the range of their centroid from the sensor
(sqrt(x^2 + y^2) of the centroid, scan frame). A bucket's `point_recall` is the mean of its
instances' recalls (every instance weighs the same, as the claim is per instance; a pooled
ratio would be dominated by the largest instances), `hit_rate` the fraction of its
instances hit. Empty buckets report count 0 and None for both rates.
"""
from __future__ import annotations

import numpy as np

# (label, lower bound inclusive); each bucket runs up to the next one's lower bound
POINT_BUCKETS: tuple[tuple[str, float], ...] = (("1-9", 1), ("10-29", 10), ("30-99", 30), ("100+", 100))
RANGE_BUCKETS: tuple[tuple[str, float], ...] = (("0-15", 0.0), ("15-30", 15.0), ("30+", 30.0))
HIT_RECALL = 0.5


def instance_key(train: np.ndarray, instance: np.ndarray, hard_mask: np.ndarray) -> np.ndarray:
    """class << 16 | instance for hard-class points with an instance, else 0."""
    key = (train.astype(np.int64) << 16) | instance.astype(np.int64)
    return np.where(hard_mask[train] & (instance > 0), key, 0)


def instance_records(xyz: np.ndarray, keys: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Per-instance statistics of one scan.

    xyz (N, >=2) point coordinates in the scan frame; keys (N,) int: 0 for points that are not
    part of a hard-class instance, otherwise an id unique to the instance within the scan
    (e.g. instance_key: class << 16 | instance id); correct (N,) bool, prediction ==
    ground-truth class. Returns arrays over the scan's instances: key, points, correct, range.
    """
    keys = np.asarray(keys).reshape(-1)
    sel = np.flatnonzero(keys > 0)
    uniq, inv = np.unique(keys[sel], return_inverse=True)
    n = len(uniq)
    points = np.bincount(inv, minlength=n)
    hits = np.bincount(inv, weights=np.asarray(correct, dtype=np.float64).reshape(-1)[sel], minlength=n)
    xy = np.asarray(xyz, dtype=np.float64)[sel, :2]
    cx = np.bincount(inv, weights=xy[:, 0], minlength=n) / np.maximum(points, 1)
    cy = np.bincount(inv, weights=xy[:, 1], minlength=n) / np.maximum(points, 1)
    return {"key": uniq.astype(np.int64), "points": points.astype(np.int64), "correct": np.rint(hits).astype(np.int64),
            "range": np.hypot(cx, cy)}


def bucket_index(values: np.ndarray, buckets) -> np.ndarray:
    """Bucket of each value: the last bucket whose lower bound it reaches."""
    bounds = np.array([lo for _, lo in buckets[1:]], dtype=np.float64)
    return np.searchsorted(bounds, np.asarray(values, dtype=np.float64), side="right")


def bucket_table(points: np.ndarray, correct: np.ndarray, values: np.ndarray, buckets) -> list[dict]:
    """[{bucket, count, point_recall, hit_rate}] with instances grouped by `values`."""
    points = np.asarray(points, dtype=np.int64)
    recall = np.asarray(correct, dtype=np.float64) / np.maximum(points, 1)
    which = bucket_index(values, buckets)
    count = np.bincount(which, minlength=len(buckets))
    recall_sum = np.bincount(which, weights=recall, minlength=len(buckets))
    hit_sum = np.bincount(which, weights=(recall >= HIT_RECALL).astype(np.float64), minlength=len(buckets))
    rows = []
    for j, (label, _) in enumerate(buckets):
        c = int(count[j])
        rows.append({"bucket": label, "count": c,
                     "point_recall": float(recall_sum[j] / c) if c else None,
                     "hit_rate": float(hit_sum[j] / c) if c else None})
    return rows


class InstanceAccumulator:
    """Collects per-instance records over many scans; `summary()` gives the bucket tables."""

    def __init__(self):
        self._parts: list[dict[str, np.ndarray]] = []

    def add(self, xyz, keys, correct) -> "InstanceAccumulator":
        self._parts.append(instance_records(xyz, keys, correct))
        return self

    def records(self) -> dict[str, np.ndarray]:
        names = ("points", "correct", "range")
        if not self._parts:
            return {n: np.zeros(0) for n in names}
        return {n: np.concatenate([p[n] for p in self._parts]) for n in names}

    def summary(self) -> dict[str, list[dict]]:
        r = self.records()
        return {"by_points": bucket_table(r["points"], r["correct"], r["points"], POINT_BUCKETS),
                "by_range": bucket_table(r["points"], r["correct"], r["range"], RANGE_BUCKETS)}
