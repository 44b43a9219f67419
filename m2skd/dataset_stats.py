"""What a labelled dataset holds: class shares against the reference data, and its hard-class
instances by point count and range.

The method is about classes that single scans under-sample, so a dataset (real or synthetic)
is described by how rare its hard classes are (share of points) and how sparse their instances
are (points per instance in one scan, range of the instance's centroid), in the same buckets
as eval's instance table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import semantickitti as sk
from .dataset_spec import DatasetSpec
from .instances import POINT_BUCKETS, RANGE_BUCKETS, bucket_index, instance_key, instance_records

#: Instances with at least this many points in their scan count as measurable.
MEASURABLE_POINTS = 10


@dataclass
class ScanInstances:
    """Hard-class instances of one scan: training class, points, centroid range (m)."""

    train_id: np.ndarray
    points: np.ndarray
    range: np.ndarray


@dataclass
class DatasetStats:
    raw_counts: np.ndarray                      # points per raw id
    scans: int
    instances: ScanInstances                    # over every (scan, hard instance)


def scan_stats(scan_path, label_path, spec: DatasetSpec) -> tuple[np.ndarray, ScanInstances]:
    """(points per raw id, hard-class instances) of one labelled scan file."""
    xyz = sk.read_scan(scan_path)[:, :3]
    label = sk.read_label(label_path, n_points=len(xyz), learning_lut=spec.learning_lut)
    semantic, instance = sk.split_label(label)
    return label_stats(xyz, semantic, instance, spec)


def label_stats(xyz: np.ndarray, semantic: np.ndarray, instance: np.ndarray,
                spec: DatasetSpec) -> tuple[np.ndarray, ScanInstances]:
    """(points per raw id, hard-class instances) of one scan's points and raw labels."""
    raw_counts = np.bincount(semantic, minlength=len(spec.learning_lut))
    keys = instance_key(spec.learning_lut[semantic], instance, spec.hard_mask)
    rec = instance_records(xyz, keys, np.zeros(len(keys), bool))
    return raw_counts, ScanInstances(rec["key"] >> 16, rec["points"], rec["range"])


def combine(per_scan: list[tuple[str, np.ndarray, ScanInstances]], spec: DatasetSpec) -> DatasetStats:
    """Sum per-scan results [(sequence, raw counts, instances)]."""
    size = max((len(c) for _, c, _ in per_scan), default=len(spec.learning_lut))
    raw = np.zeros(size, dtype=np.int64)
    parts = []
    for _, counts, inst in per_scan:
        raw[:len(counts)] += counts
        parts.append(inst)
    cat = (lambda name, dtype: np.concatenate([getattr(p, name) for p in parts]).astype(dtype)
           if parts else np.zeros(0, dtype))
    instances = ScanInstances(cat("train_id", np.int64), cat("points", np.int64), cat("range", np.float64))
    return DatasetStats(raw, len(per_scan), instances)


def share_rows(stats: DatasetStats, spec: DatasetSpec) -> list[dict]:
    """Per training id and for the hard classes together: share here, reference share, ratio."""
    here = spec.training_shares(stats.raw_counts)
    ref = spec.reference_shares
    rows = []
    for c, name in enumerate(spec.class_names):
        rows.append({"class": name, "train_id": c, "share": float(here[c]),
                     "reference": None if ref is None else float(ref[c])})
    hard = list(spec.hard_classes)
    rows.append({"class": "hard classes together", "train_id": None, "share": float(here[hard].sum()),
                 "reference": None if ref is None else float(ref[hard].sum())})
    for row in rows:
        row["ratio"] = row["share"] / row["reference"] if row["reference"] else None
    return rows


def instance_histograms(stats: DatasetStats, spec: DatasetSpec) -> dict[str, dict]:
    """Per hard class: instances by point bucket, by range bucket, median points, measurable count."""
    out = {}
    inst = stats.instances
    for c in spec.hard_classes:
        sel = inst.train_id == c
        points, ranges = inst.points[sel], inst.range[sel]
        by_points = np.bincount(bucket_index(points, POINT_BUCKETS), minlength=len(POINT_BUCKETS))
        by_range = np.bincount(bucket_index(ranges, RANGE_BUCKETS), minlength=len(RANGE_BUCKETS))
        out[spec.class_names[c]] = {
            "instances": int(sel.sum()),
            "points": {label: int(n) for (label, _), n in zip(POINT_BUCKETS, by_points)},
            "range_m": {label: int(n) for (label, _), n in zip(RANGE_BUCKETS, by_range)},
            "median_points": float(np.median(points)) if len(points) else None,
            f"with_{MEASURABLE_POINTS}+_points": int((points >= MEASURABLE_POINTS).sum()),
        }
    return out


def format_shares(rows: list[dict]) -> list[str]:
    lines = ["| class | reference share | this data | ratio |", "|---|---|---|---|"]
    for r in rows:
        ref = "" if r["reference"] is None else f"{r['reference']:.5f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        name = r["class"] if r["train_id"] is not None else f"**{r['class']}**"
        lines.append(f"| {name} | {ref} | {r['share']:.5f} | {ratio} |")
    return lines


def format_instances(hist: dict[str, dict]) -> list[str]:
    p_labels = [label for label, _ in POINT_BUCKETS]
    r_labels = [label for label, _ in RANGE_BUCKETS]
    head = (["class", "instances", f"{MEASURABLE_POINTS}+ pts", "median pts"] + [f"{p} pts" for p in p_labels]
            + [f"{r} m" for r in r_labels])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, h in hist.items():
        median = "" if h["median_points"] is None else f"{h['median_points']:g}"
        cells = ([name, str(h["instances"]), str(h[f"with_{MEASURABLE_POINTS}+_points"]), median]
                 + [str(h["points"][p]) for p in p_labels] + [str(h["range_m"][r]) for r in r_labels])
        lines.append("| " + " | ".join(cells) + " |")
    return lines
