"""Class shares and hard-instance histograms of `m2skd stats`, against hand counts."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from m2skd import semantickitti as sk
from m2skd.dataset_spec import load_spec
from m2skd.dataset_stats import combine, instance_histograms, scan_stats, share_rows

SPEC = load_spec()


def write_scan(root, seq, frame, xyz, semantic, instance):
    d = root / "sequences" / seq
    (d / "velodyne").mkdir(parents=True, exist_ok=True)
    points = np.column_stack([xyz, np.zeros(len(xyz))]).astype(np.float32)
    sk.write_scan(d / "velodyne" / f"{frame:06d}.bin", points)
    sk.write_label(d / "labels" / f"{frame:06d}.label", np.asarray(semantic, np.uint32), np.asarray(instance, np.uint32))
    return d / "velodyne" / f"{frame:06d}.bin", d / "labels" / f"{frame:06d}.label"


def test_shares_and_instances_by_hand(tmp_path):
    """10 points: 4 road, 3 of a moving person (254 -> person) at range 20 m, 2 of a bicycle
    at range 5 m, 1 outlier (raw 1 -> unlabelled)."""
    xyz = np.array([[1, 0, 0]] * 4 + [[20, 0, 0], [20, 0.1, 0], [20, -0.1, 0]] + [[3, 4, 0], [3, 4, 1]] + [[0, 0, 0]],
                   float)
    semantic = [40] * 4 + [254] * 3 + [11] * 2 + [1]
    instance = [0] * 4 + [7] * 3 + [9] * 2 + [0]
    scan, label = write_scan(tmp_path, "00", 0, xyz, semantic, instance)
    counts, inst = scan_stats(scan, label, SPEC)
    assert counts[40] == 4 and counts[254] == 3 and counts[11] == 2 and counts[1] == 1
    order = np.argsort(inst.train_id)
    np.testing.assert_array_equal(inst.train_id[order], [2, 6])      # bicycle, person
    np.testing.assert_array_equal(inst.points[order], [2, 3])
    np.testing.assert_allclose(inst.range[order], [5.0, 20.0])
    stats = combine([("00", counts, inst)], SPEC)
    rows = {r["class"]: r for r in share_rows(stats, SPEC)}
    assert rows["road"]["share"] == 0.4 and rows["person"]["share"] == 0.3 and rows["unlabeled"]["share"] == 0.1
    assert rows["hard classes together"]["share"] == 0.5
    np.testing.assert_allclose(rows["hard classes together"]["reference"], 0.00504, atol=1e-5)  # official content
    hist = instance_histograms(stats, SPEC)
    assert hist["person"]["points"] == {"1-9": 1, "10-29": 0, "30-99": 0, "100+": 0}
    assert hist["person"]["range_m"] == {"0-15": 0, "15-30": 1, "30+": 0}
    assert hist["bicycle"]["range_m"]["0-15"] == 1 and hist["truck"]["instances"] == 0


def test_stats_command_prints_both_tables_per_split(tmp_path):
    from m2skd.cli import main

    xyz = np.array([[1.0, 0, 0], [2.0, 0, 0]])
    write_scan(tmp_path, "00", 0, xyz, [40, 30], [0, 1])
    write_scan(tmp_path, "08", 0, xyz, [70, 70], [0, 0])
    result = CliRunner().invoke(main, ["stats", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "## train: 1 scans of sequences 00" in result.output and "## val: 1 scans" in result.output
    assert "| person | 0.00034 | 0.50000 |" in result.output
    bad = CliRunner().invoke(main, ["stats", str(tmp_path), "--sequences", "05"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
