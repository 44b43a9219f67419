"""Sparse-instance buckets on hand-built scans whose instances (points, ranges, hits) are known."""
import numpy as np
import pytest

from m2skd.dataset_spec import load_spec
from m2skd.instances import InstanceAccumulator, instance_key, instance_records

SPEC = load_spec()
PERSON, MOVING_PERSON, BICYCLE, TRUCK, CAR = 30, 254, 11, 18, 10  # raw SemanticKITTI ids


def _blob(centre, n, raw_class, inst, n_correct):
    """n points placed symmetrically around `centre` (so the centroid is exactly it), the first
    n_correct predicted as their class and the rest as road."""
    offsets = np.linspace(-0.3, 0.3, n) if n > 1 else np.zeros(1)
    xyz = np.zeros((n, 3))
    xyz[:, 0] = centre[0] + offsets
    xyz[:, 1] = centre[1] - offsets
    raw = np.full(n, (inst << 16) | raw_class, np.uint32)
    train = SPEC.learning_lut[raw_class]
    pred = np.where(np.arange(n) < n_correct, train, 9)  # 9 = road
    return xyz, raw, pred


def _scan(blobs):
    parts = [_blob(*b) for b in blobs]
    xyz = np.concatenate([p[0] for p in parts])
    raw = np.concatenate([p[1] for p in parts])
    pred = np.concatenate([p[2] for p in parts])
    train = SPEC.learning_lut[raw & 0xFFFF].astype(np.int64)
    keys = instance_key(train, raw >> 16, SPEC.hard_mask)
    return xyz, keys, pred == train


def test_instance_records_of_one_scan():
    xyz, keys, correct = _scan([((3, 4), 5, PERSON, 1, 3), ((30, 0), 40, TRUCK, 1, 40)])
    rec = instance_records(xyz, keys, correct)
    # same instance id 1 in two classes: two instances
    order = np.argsort(rec["points"])
    assert rec["points"][order].tolist() == [5, 40]
    assert rec["correct"][order].tolist() == [3, 40]
    assert rec["range"][order] == pytest.approx([5.0, 30.0])


def test_buckets_by_points_and_range_on_hand_built_scans():
    scan1 = _scan([
        ((3, 4), 5, PERSON, 1, 3),          # A: 5 points, 5 m, recall 0.6 (hit)
        ((12, 9), 12, BICYCLE, 2, 5),       # B: 12 points, 15 m exactly (-> 15-30), recall 5/12 (miss)
        ((30, 0), 40, TRUCK, 1, 40),        # C: 40 points, 30 m exactly (-> 30+), recall 1 (hit)
        ((0, 20), 50, PERSON, 3, 25),       # D: 100 points (50 person + 50 moving-person, one instance),
        ((0, 20), 50, MOVING_PERSON, 3, 25),  #    20 m, recall 0.5 (a hit: at least half)
        ((5, 5), 20, CAR, 4, 0),            # not a hard class: ignored
        ((8, 0), 7, PERSON, 0, 0),          # hard class without an instance id: ignored
    ])
    scan2 = _scan([((40, 0), 1, PERSON, 1, 1)])  # same key as A in another scan: another instance
    acc = InstanceAccumulator().add(*scan1).add(*scan2)
    summary = acc.summary()
    assert summary["by_points"] == [
        {"bucket": "1-9", "count": 2, "point_recall": pytest.approx((0.6 + 1.0) / 2), "hit_rate": 1.0},
        {"bucket": "10-29", "count": 1, "point_recall": pytest.approx(5 / 12), "hit_rate": 0.0},
        {"bucket": "30-99", "count": 1, "point_recall": 1.0, "hit_rate": 1.0},
        {"bucket": "100+", "count": 1, "point_recall": 0.5, "hit_rate": 1.0},
    ]
    assert summary["by_range"] == [
        {"bucket": "0-15", "count": 1, "point_recall": pytest.approx(0.6), "hit_rate": 1.0},
        {"bucket": "15-30", "count": 2, "point_recall": pytest.approx((5 / 12 + 0.5) / 2), "hit_rate": 0.5},
        {"bucket": "30+", "count": 2, "point_recall": 1.0, "hit_rate": 1.0},
    ]


def test_empty_buckets_and_no_instances():
    only = InstanceAccumulator().add(*_scan([((3, 4), 5, PERSON, 1, 0)])).summary()
    assert only["by_points"][0] == {"bucket": "1-9", "count": 1, "point_recall": 0.0, "hit_rate": 0.0}
    assert all(r["count"] == 0 and r["point_recall"] is None and r["hit_rate"] is None for r in only["by_points"][1:])
    nothing = InstanceAccumulator().add(*_scan([((5, 5), 20, CAR, 4, 20)])).summary()
    assert [r["count"] for r in nothing["by_range"]] == [0, 0, 0]
    assert InstanceAccumulator().summary()["by_points"][0]["count"] == 0
