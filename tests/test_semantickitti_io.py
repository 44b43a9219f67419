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


def test_training_ids_map_known_ids_and_name_unknown_ones():
    """Instance bits are ignored; an id the map lacks (inside the table or past its end) is named."""
    lut = SPEC.learning_lut
    raw = np.array([40 | (7 << 16), 10, 0, 252], np.uint32)  # road (instance 7), car, unlabeled, moving-car
    assert sk.training_ids("l.label", raw, lut).tolist() == [SPEC.learning_map[40], SPEC.learning_map[10], 0,
                                                              SPEC.learning_map[252]]
    for unknown in (123, lut.size + 5):
        with pytest.raises(DataError, match=rf"l\.label.*unknown raw semantic ids \[{unknown}\]"):
            sk.training_ids("l.label", np.array([40, unknown | (3 << 16)], np.uint32), lut)


def test_missing_and_short_poses(tmp_path):
    tr = random_pose(np.random.default_rng(1))
    sk.write_calib(tmp_path / "calib.txt", tr)
    with pytest.raises(DataError, match=r"poses\.txt.*not found"):
        sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt")
    sk.write_poses(tmp_path / "poses.txt", np.stack([np.eye(4)] * 3), tr)
    with pytest.raises(DataError, match=r"poses\.txt.*3 poses.*highest frame number needs 5"):
        sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt", n_scans=5)
    (tmp_path / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1\n")
    with pytest.raises(DataError, match=r"poses\.txt.*line 1.*12"):
        sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt")


def test_missing_tr_in_calib(tmp_path):
    (tmp_path / "calib.txt").write_text("P0: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(DataError, match=r"calib\.txt.*Tr"):
        sk.read_calib(tmp_path / "calib.txt")


# KITTI odometry sequence 00 as distributed: calib.txt's Tr (velodyne -> left camera) and the
# first two lines of poses.txt (camera poses). Between these frames the car drives 0.86 m
# forward, which the camera sees along its z axis and the LiDAR along its x axis.
KITTI_00_TR = ("4.276802385584e-04 -9.999672484946e-01 -8.084491683471e-03 -1.198459927713e-02 "
               "-7.210626507497e-03 8.081198471645e-03 -9.999413164504e-01 -5.403984729748e-02 "
               "9.999738645903e-01 4.859485810390e-04 -7.206933692422e-03 -2.921968648686e-01")
KITTI_00_POSES = ("1.000000e+00 9.043680e-12 2.326809e-11 5.551115e-17 9.043683e-12 1.000000e+00 2.392370e-10 "
                  "3.330669e-16 2.326810e-11 2.392370e-10 9.999999e-01 -4.440892e-16\n"
                  "9.999978e-01 5.272628e-04 -2.066935e-03 -4.690294e-02 -5.296506e-04 9.999992e-01 -1.154865e-03 "
                  "-2.839928e-02 2.066324e-03 1.155958e-03 9.999971e-01 8.586941e-01\n")


def test_kitti_excerpt_gives_forward_lidar_motion(tmp_path):
    """Against a hand-computed answer, not our own writer: T_i = inv(Tr) P_i Tr turns the camera's
    0.859 m along z into the LiDAR's 0.859 m along x (velodyne x = camera z, y = -camera x,
    z = -camera y), and frame 0 is the identity. A wrong convention (P_i as a LiDAR pose,
    Tr P_i inv(Tr), or inverted poses) moves the car along another axis or backwards."""
    (tmp_path / "calib.txt").write_text("P0: 7.188560e+02 0 6.071928e+02 0 0 7.188560e+02 1.852157e+02 0 0 0 1 0\n"
                                       f"Tr: {KITTI_00_TR}\n")
    (tmp_path / "poses.txt").write_text(KITTI_00_POSES)
    poses = sk.read_poses(tmp_path / "poses.txt", tmp_path / "calib.txt", n_scans=2)
    assert np.allclose(poses[0], np.eye(4), atol=1e-6)
    # hand computation: camera translation (-0.0469, -0.0284, 0.8587) -> LiDAR (0.8587, 0.0469, 0.0284),
    # plus under 1 cm from the small rotation acting on Tr's 0.29 m lever arm
    assert np.allclose(poses[1][:3, 3], [0.8587, 0.0469, 0.0284], atol=0.01)
    assert np.degrees(np.arccos((np.trace(poses[1][:3, :3]) - 1) / 2)) < 0.2
    # a point 10 m ahead of the LiDAR at frame 1, seen from frame 0: 10.86 m ahead, and the
    # camera's small yaw/pitch (R[0,2] = -2.07e-3, R[1,2] = -1.15e-3) swing it 10 x those
    # to the left (+y) and up (+z) on top of the translation
    ahead = sk.transform(np.array([[10.0, 0.0, 0.0]]), sk.relative_pose(poses, 0, 1))
    assert np.allclose(ahead, [[10.859, 0.0469 + 0.0207, 0.0284 + 0.0115]], atol=0.01)


def test_frames_are_their_file_numbers(tmp_path):
    seq_dir = tmp_path / "sequences" / "00"
    for n in (0, 1, 2, 4, 10):
        sk.write_scan(seq_dir / "velodyne" / f"{n:06d}.bin", np.zeros((1, 4), np.float32))
    seq = sk.Sequence(tmp_path, "00")
    assert seq.numbered_frames() == [(0, "000000"), (1, "000001"), (2, "000002"), (4, "000004"), (10, "000010")]
    tr = random_pose(np.random.default_rng(3))
    sk.write_calib(seq_dir / "calib.txt", tr)
    sk.write_poses(seq_dir / "poses.txt", np.stack([np.eye(4)] * 10), tr)
    with pytest.raises(DataError, match=r"poses\.txt.*10 poses.*highest frame number needs 11"):
        seq.poses()
    sk.write_poses(seq_dir / "poses.txt", np.stack([np.eye(4)] * 11), tr)
    assert len(seq.poses()) == 11
    sk.write_scan(seq_dir / "velodyne" / "scan.bin", np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match=r"scan\.bin.*not a frame number"):
        seq.numbered_frames()


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
