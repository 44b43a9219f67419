"""SemanticKITTI readers and writers: round trips and every validation error."""
import numpy as np
import pytest

from m2skd import semantickitti as sk
from m2skd.dataset_spec import load_spec
from m2skd.errors import DataError

SPEC = load_spec()


def random_pose(rng):
    a, b, c = rng.uniform(-np.pi, np.pi, 3)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    T = np.eye(4)
    T[:3, :3] = rz @ ry @ rx
    T[:3, 3] = rng.uniform(-100, 100, 3)
    return T


def test_scan_and_label_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    scan = rng.normal(size=(1000, 4)).astype(np.float32)
    sem = rng.choice([10, 11, 30, 252, 40], 1000).astype(np.uint32)
    inst = rng.integers(0, 5, 1000).astype(np.uint32)
    sk.write_scan(tmp_path / "a.bin", scan)
    sk.write_label(tmp_path / "a.label", sem, inst)
    assert np.array_equal(sk.read_scan(tmp_path / "a.bin"), scan)
    label = sk.read_label(tmp_path / "a.label", n_points=1000, learning_lut=SPEC.learning_lut)
    s, i = sk.split_label(label)
    assert np.array_equal(s, sem) and np.array_equal(i, inst)
    assert SPEC.learning_lut[252] == SPEC.learning_lut[10] == 1
    assert SPEC.inverse_lut[SPEC.learning_lut[30]] == 30


def test_bin_size_not_multiple_of_16(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"\0" * 20)
    with pytest.raises(DataError, match=r"bad\.bin.*multiple of 16"):
        sk.read_scan(tmp_path / "bad.bin")


def test_non_finite_coordinates(tmp_path):
    scan = np.zeros((10, 4), np.float32)
    scan[3, 1] = np.nan
    sk.write_scan(tmp_path / "nan.bin", scan)
    with pytest.raises(DataError, match=r"nan\.bin.*non-finite.*point 3"):
        sk.read_scan(tmp_path / "nan.bin")


def test_label_count_differs(tmp_path):
    sk.write_label(tmp_path / "x.label", np.full(9, 40, np.uint32))
    with pytest.raises(DataError, match=r"x\.label.*9 labels.*10 points"):
        sk.read_label(tmp_path / "x.label", n_points=10)


def test_unknown_raw_label(tmp_path):
    sk.write_label(tmp_path / "u.label", np.array([40, 123, 10], np.uint32))
    with pytest.raises(DataError, match=r"u\.label.*unknown raw semantic ids \[123\]"):
        sk.read_label(tmp_path / "u.label", learning_lut=SPEC.learning_lut)


def test_missing_and_short_poses(tmp_path):
    tr = random_pose(np.random.default_rng(1))
    sk.write_calib(tmp_path / "calib.txt", tr)
    with pytest.raises(DataError, match=r"poses\.txt.*not found"):
        sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt")
    sk.write_poses(tmp_path / "poses.txt", np.stack([np.eye(4)] * 3), tr)
    with pytest.raises(DataError, match=r"poses\.txt.*3 poses.*5 scans"):
        sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt", n_scans=5)
    (tmp_path / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1\n")
    with pytest.raises(DataError, match=r"poses\.txt.*line 1.*12"):
        sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt")


def test_missing_tr_in_calib(tmp_path):
    (tmp_path / "calib.txt").write_text("P0: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(DataError, match=r"calib\.txt.*Tr"):
        sk.read_calib(tmp_path / "calib.txt")


def test_static_point_aligns_across_poses(tmp_path):
    """A world point seen from two LiDAR poses lands on itself after alignment (< 1 cm)."""
    rng = np.random.default_rng(2)
    tr = random_pose(rng)
    poses = np.stack([random_pose(rng), random_pose(rng)])
    sk.write_calib(tmp_path / "calib.txt", tr)
    sk.write_poses(tmp_path / "poses.txt", poses, tr)
    read = sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt", n_scans=2)
    world = rng.uniform(-50, 50, (100, 3))
    seen = [sk.transform(world, np.linalg.inv(read[i])) for i in range(2)]  # as each scan sees it
    in_frame0 = sk.transform(seen[1], sk.relative_pose(read, 0, 1))
    assert np.abs(in_frame0 - seen[0]).max() < 0.01
