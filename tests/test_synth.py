"""Synthetic SemanticKITTI generator: layout, determinism, geometry, instances, sampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m2skd import semantickitti as sk
from m2skd.dataset_spec import load_spec
from m2skd.synth import SynthConfig, generate_dataset, scene_for, simulate_scan
from m2skd.synth.lidar import intersect_boxes, intersect_cylinders, intersect_ellipsoids
from m2skd.synth.scene import BUILDING, MOVING_ID, POLE, THING_IDS, Box, Cylinder, Part, Scene, SceneObject

SMALL = SynthConfig(beams=32, azimuth_steps=512, poles_per_100m=8.0)  # more poles: one is near for sure
FRAMES = 10
SEED = 2
LAST = FRAMES - 1  # frames 0 and LAST are compared
SPEC = load_spec()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = generate_dataset(root, sequences=("00", "11"), frames=FRAMES, seed=SEED, config=SMALL)
    return root, summary


def load_frame(seq: sk.Sequence, frame: int):
    """(xyz in the scan frame, raw semantic, instance) of one labelled scan."""
    scan = sk.read_scan(seq.scan_path(f"{frame:06d}"))
    label = sk.read_label(seq.label_path(f"{frame:06d}"), n_points=len(scan), learning_lut=SPEC.learning_lut)
    semantic, instance = sk.split_label(label)
    return scan[:, :3].astype(np.float64), semantic, instance


def test_layout_is_readable(dataset):
    root, summary = dataset
    assert sk.list_sequences(root) == ["00", "11"]
    seq = sk.Sequence(root, "00")
    assert seq.frames == [f"{i:06d}" for i in range(FRAMES)]
    total = 0
    for i in range(FRAMES):
        xyz, semantic, _ = load_frame(seq, i)
        assert len(xyz) > 1000
        assert np.linalg.norm(xyz, axis=1).max() <= SMALL.max_range + 0.2
        total += len(xyz)
    poses = seq.poses()
    assert poses.shape == (FRAMES, 4, 4)
    np.testing.assert_allclose(poses[0], np.eye(4), atol=1e-9)
    angle = np.degrees(np.arccos(np.clip((np.trace(poses[-1][:3, :3]) - 1) / 2, -1, 1)))
    assert angle > 0.05 and np.linalg.norm(poses[-1][:3, 3]) > 3.0  # a real rotation and translation
    times = (seq.path / "times.txt").read_text().split()
    np.testing.assert_allclose([float(t) for t in times], SMALL.frame_dt * np.arange(FRAMES))
    assert summary["scans"] == 2 * FRAMES
    assert summary["sequences"]["00"] == {"split": "train", "frames": FRAMES, "labelled": True}


def test_test_split_has_no_labels(dataset):
    root, summary = dataset
    seq = sk.Sequence(root, "11")
    assert not seq.has_labels and len(seq.frames) == FRAMES
    assert summary["sequences"]["11"]["labelled"] is False
    assert seq.poses().shape == (FRAMES, 4, 4)


def test_poses_file_matches_the_simulated_motion(dataset):
    root, _ = dataset
    scene = scene_for("00", FRAMES, SEED, SMALL)
    np.testing.assert_allclose(sk.Sequence(root, "00").poses(), scene.lidar_poses(), atol=1e-6)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_dataset(a, sequences=("08",), frames=3, seed=7, config=SMALL)
    generate_dataset(b, sequences=("08",), frames=3, seed=7, config=SMALL, jobs=2)
    generate_dataset(c, sequences=("08",), frames=3, seed=8, config=SMALL)
    files_a = _all_files(a)
    assert len(files_a) == 3 * 2 + 3
    assert files_a == _all_files(b)
    assert files_a["sequences/08/velodyne/000000.bin"] != _all_files(c)["sequences/08/velodyne/000000.bin"]


def test_static_poles_land_on_their_true_surface_in_world(dataset):
    """Points of each pole from the first and last frames, taken to the world with poses.txt (and from
    there to the street's frame by one fixed transform), lie on that pole's true surface to
    within the range noise, and their centroids agree (loosely: at 512 azimuth steps a
    pole gets only a few columns, which change as the sensor moves)."""
    root, _ = dataset
    seq = sk.Sequence(root, "00")
    poses = seq.poses()
    scene = scene_for("00", FRAMES, SEED, SMALL)
    street_from_world = scene.sensor_pose(0)
    frames = {}
    for f in (0, LAST):
        xyz, semantic, _ = load_frame(seq, f)
        frames[f] = (sk.transform(sk.transform(xyz, poses[f]), street_from_world), semantic)
    checked = 0
    for obj in scene.objects:
        if obj.raw != POLE:
            continue
        shaft = obj.parts[0].shape  # the arm at the top is left out by height
        centroids = []
        for xyz, semantic in frames.values():
            dist = np.hypot(*(xyz[:, :2] - obj.position[:2]).T)
            on_shaft = (semantic == POLE) & (dist < 0.5) & (xyz[:, 2] < obj.position[2] + shaft.z1 - 0.3)
            if on_shaft.sum() < 5:
                break
            off_surface = np.abs(dist[on_shaft] - shaft.radius)
            assert off_surface.mean() < 0.03 and off_surface.max() < 0.08
            centroids.append(xyz[on_shaft, :2].mean(axis=0))
        else:
            assert np.linalg.norm(centroids[0] - centroids[1]) < 2 * shaft.radius
            checked += 1
    assert checked >= 1


def test_instances_are_stable_and_moving_ids_match_motion(dataset):
    """Each instance keeps its id and class; its points from the first and last frames, taken to the
    street frame with poses.txt, lie inside that object's box at that time (so static ones
    stay put and moving ones move as position = start + velocity * t); moving objects carry
    moving-* ids and their last-frame points are clearly away from where they were at frame 0."""
    root, _ = dataset
    seq = sk.Sequence(root, "00")
    poses = seq.poses()
    scene = scene_for("00", FRAMES, SEED, SMALL)
    street_from_world = scene.sensor_pose(0)
    truth = {o.instance: o for o in scene.objects if o.instance}
    seen_in: dict[int, list[int]] = {}
    moved = 0
    for f in (0, LAST):
        xyz, semantic, instance = load_frame(seq, f)
        assert np.all((instance > 0) == np.isin(semantic, list(THING_IDS)))
        street = sk.transform(sk.transform(xyz, poses[f]), street_from_world)
        t = float(scene.frame_times[f])
        for inst in np.unique(instance[instance > 0]):
            obj, mask = truth[inst], instance == inst
            assert np.unique(semantic[mask]).tolist() == [obj.raw]
            assert (obj.raw in MOVING_ID.values()) == obj.moving
            seen_in.setdefault(int(inst), []).append(f)
            lo, hi = obj.local_bounds()
            assert inside_box(obj.to_local(street[mask], t), lo, hi).all()
            travelled = np.linalg.norm(obj.velocity) * t
            if travelled > hi[0] - lo[0] + 0.5:  # moved off its own footprint since frame 0
                assert not inside_box(obj.to_local(street[mask], 0.0), lo, hi).any()
                moved += 1
    assert sum(len(frames) == 2 for frames in seen_in.values()) >= 5
    assert moved >= 1


def inside_box(local_xyz, lo, hi, margin=0.15):
    return np.all((local_xyz > lo - margin) & (local_xyz < hi + margin), axis=1)


def test_far_hard_objects_get_fewer_points():
    """Points on one object fall about as 1/range^2 (angular size in both directions): each
    hard class at 25 m gets well under half what it gets at 10 m, and a person at 10 m gets
    the ~100-400 points a 64-beam scan puts on an adult."""
    from m2skd.synth.probe import HARD_BUILDERS, points_at_range
    from m2skd.synth.shapes import PERSON

    for raw in HARD_BUILDERS:
        near, far = (np.median(points_at_range(raw, r, 12)) for r in (10.0, 25.0))
        assert near > 3 * far > 0, (raw, near, far)
    assert 100 < np.median(points_at_range(PERSON, 10.0, 12)) < 400


def test_summary_agrees_with_stats_read_back_from_the_files(dataset):
    """synth's in-memory summary and `m2skd stats` over the written files give the same figures."""
    from m2skd.pipeline.stats import run_stats

    root, summary = dataset
    figures = run_stats(root)["all"]
    assert figures["shares"] == summary["shares"]
    assert figures["instances"] == summary["hard_instances"]
    assert summary["hard_class_share"] == figures["shares"][-1]["share"] > 0


def test_default_scan_size():
    """Default HDL-64-like scan: about 120k points after misses and dropout."""
    scene = scene_for("00", 2, 0)
    scan = simulate_scan(scene, 0, np.random.default_rng(0))
    assert 100_000 < len(scan.points) < 131_072
    assert scan.points.dtype == np.float32
    assert np.all((scan.points[:, 3] >= 0) & (scan.points[:, 3] <= 1))


def test_nearest_hit_wins():
    """A wall across the road hides a pole behind it; a pole in front of it is seen."""
    street = scene_for("00", 1, 0, SMALL)
    ego_y = street.sensor_pose(0)[1, 3]
    wall = SceneObject(BUILDING, 0, np.array([20.0, ego_y, 0.0]), 0.0, np.zeros(3), [Part(Box((0, 0, 5), (0.5, 6, 5)))])
    hidden = SceneObject(POLE, 0, np.array([30.0, ego_y, 0.0]), 0.0, np.zeros(3), [Part(Cylinder(0, 0, 0, 6, 0.3))])
    seen = SceneObject(POLE, 0, np.array([10.0, ego_y + 2, 0.0]), 0.0, np.zeros(3), [Part(Cylinder(0, 0, 0, 6, 0.3))])
    scene = Scene(SMALL, street.ground, street.ego, [wall, hidden, seen], street.frame_times)
    scan = simulate_scan(scene, 0, np.random.default_rng(0))
    xyz = scan.points[:, :3]
    assert (scan.raw == POLE).sum() > 20
    assert xyz[scan.raw == POLE, 0].max() < 12
    assert 19.0 < xyz[scan.raw == BUILDING, 0].min() < 19.8  # the wall face at 19.5 m, seen from a turned sensor
    ahead = (np.abs(np.arctan2(xyz[:, 1], xyz[:, 0])) < 0.2) & (xyz[:, 2] > 0)
    assert ahead.any() and np.isin(scan.raw[ahead], [BUILDING, POLE]).all()


def test_ray_primitive_intersections():
    origin = np.zeros(3)
    dirs = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0]])
    t_box = intersect_boxes(origin, dirs, np.array([[10.0, 0, 0]]), np.array([[1.0, 1, 1]]), np.array([np.pi / 4]))
    np.testing.assert_allclose(t_box[0], [10 - np.sqrt(2), np.inf, np.inf])
    t_cyl = intersect_cylinders(origin, dirs, np.array([[5.0, 0]]), np.array([[-1.0, 1]]), np.array([1.0]))
    np.testing.assert_allclose(t_cyl[0], [4.0, np.inf, np.inf])
    t_ell = intersect_ellipsoids(origin, dirs, np.array([[0, 10.0, 0]]), np.array([[1.0, 2, 1]]),
                                 np.array([np.pi / 2]))
    np.testing.assert_allclose(t_ell[0], [np.inf, np.inf, 9.0])  # turned 90 deg: its 1 m semi-axis is along y
    down = np.array([[0.6, 0, -0.8]])
    t_top = intersect_cylinders(np.array([0, 0, 2.0]), down, np.array([[1.0, 0]]), np.array([[0.0, 1]]),
                                np.array([0.5]))
    np.testing.assert_allclose(t_top[0], [1.25])  # through the top cap


def test_rerun_with_fewer_frames_drops_stale_scans(tmp_path):
    generate_dataset(tmp_path, sequences=("00",), frames=3, seed=0, config=SMALL)
    generate_dataset(tmp_path, sequences=("00",), frames=2, seed=0, config=SMALL)
    seq = sk.Sequence(tmp_path, "00")
    assert seq.frames == ["000000", "000001"]
    assert sorted(p.name for p in (seq.path / "labels").iterdir()) == ["000000.label", "000001.label"]
    assert len(seq.poses()) == 2


def test_ray_ring_and_pitched_box_intersections():
    """Hand-computed hits: a wheel (ring) through its tyre, its empty hub area and its side, and
    a box pitched by 90 degrees (its long x axis then points down)."""
    from m2skd.synth.lidar import intersect_rings

    origin = np.zeros(3)
    center, yaw = np.array([[10.0, 0.0, 0.0]]), np.array([np.pi / 2])  # axis along x: the ring faces the sensor
    radius, inner, half = np.array([0.35]), np.array([0.3]), np.array([0.02])
    dirs = np.array([[1.0, 0, 0],                                # through the hub area: misses
                     [1.0, 0, 0.32 / 10], [1.0, 0, 0.4 / 10]])    # the tyre's face; above the tyre
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    t = intersect_rings(origin, dirs, center, yaw, radius, inner, half)[0]
    assert t[0] == np.inf and t[2] == np.inf
    np.testing.assert_allclose(t[1] * dirs[1, 0], 10 - 0.02)    # the near side face at x = 9.98
    side_on = intersect_rings(origin, np.array([[1.0, 0, 0]]), center, np.array([0.0]), radius, inner, half)[0]
    np.testing.assert_allclose(side_on, [10 - 0.35])              # seen edge-on: the tread
    t_box = intersect_boxes(origin, np.array([[1.0, 0, 0], [0, 0, -1.0]]), np.array([[5.0, 0, 0], [0, 0, -5.0]]),
                            np.array([[1.0, 0.1, 0.1]] * 2), np.zeros(2), np.array([np.pi / 2] * 2))
    np.testing.assert_allclose(t_box[0, 0], 4.9)   # pitched upright: 0.1 m thick along x
    np.testing.assert_allclose(t_box[1, 1], 4.0)   # and 1 m tall along z


def _alone(parts, raw, distance, yaw):
    """Scan points (scene frame) of one object alone at `distance` m ahead of the sensor."""
    from m2skd.synth.probe import open_road
    from m2skd.synth.scene import EGO_LANE_Y

    config = SynthConfig(dropout=0.0, outliers=0.0)
    obj = SceneObject(raw, 1, np.array([distance, EGO_LANE_Y, 0.0]), yaw, np.zeros(3), parts)
    scene = open_road(config, [obj])
    scan = simulate_scan(scene, 0, np.random.default_rng(0))
    pose = scene.sensor_pose(0)
    xyz = scan.points[scan.instance == 1, :3].astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
    return obj.to_local(xyz, 0.0)


def test_bicycle_side_on_shows_both_tyres_and_open_wheels():
    """A bicycle seen side-on at 8 m: points on both tyres, almost none inside the wheels (the
    old box wheels were solid panels), and a thin frame between them."""
    from m2skd.synth.shapes import BICYCLE, Ring, bicycle_parts

    parts = bicycle_parts(np.random.default_rng(0))
    wheels = [p.shape for p in parts if isinstance(p.shape, Ring)]
    local = _alone(parts, BICYCLE, 8.0, np.pi / 2)
    assert len(wheels) == 2 and len(local) > 60
    for wheel in wheels:
        rho = np.hypot(local[:, 0] - wheel.center[0], local[:, 2] - wheel.center[2])
        on_tyre = (rho > wheel.inner - 0.03) & (rho < wheel.radius + 0.03)
        # between hub and rim, on the wheel's outer half (the fork and stays cross the inner half)
        outer_half = np.sign(local[:, 0] - wheel.center[0]) == np.sign(wheel.center[0])
        inside = (rho > 0.08) & (rho < wheel.inner - 0.05) & outer_half
        assert on_tyre.sum() >= 15
        assert inside.sum() <= 2
    assert (np.abs(local[:, 1]) < 0.35).all()  # nothing wider than the handlebar


def test_person_resolves_into_legs_torso_and_head():
    from m2skd.synth.shapes import PERSON, person_parts

    local = _alone(person_parts(np.random.default_rng(2), walking=True), PERSON, 8.0, 0.0)
    z = local[:, 2]
    assert z.min() < 0.2 and z.max() > 1.45                      # feet to head
    feet = local[z < 0.35]
    assert np.ptp(feet[:, 0]) > 0.3                              # mid-stride: feet apart
    gap = (z > 0.3) & (z < 0.6) & (np.abs(local[:, 0]) < 0.03)   # between the legs at knee height
    assert gap.sum() <= 2


def test_heavy_vehicles_keep_to_their_ray_budget():
    """On the streets of the 8 documented drives (seeds 0-7, sequences 00 and 08 of 150 scans)
    the trucks, buses, vans and trailers together get at most HEAVY_RAY_BUDGET of a sequence's
    rays, and each street still has a truck and an other-vehicle. The earlier placement put a
    bus meeting the ego (seed 1) and vans parked beside the path (seed 2) in these streets, each
    taking 1-2 % of the rays."""
    from m2skd.synth.scene import HEAVY_IDS, HEAVY_RAY_BUDGET, OTHER_VEHICLE, TRUCK, _static_id, ray_share

    for seed in range(8):
        for sequence in ("00", "08"):
            scene = scene_for(sequence, 150, seed)
            sensor = scene.ego.positions(scene.frame_times)
            heavy = [o for o in scene.objects if _static_id(o.raw) in HEAVY_IDS]
            shares = [ray_share(scene.config, sensor, o.parts, *o.position[:2], o.yaw, o.velocity[:2], scene.frame_times)
                      for o in heavy]
            assert sum(shares) <= HEAVY_RAY_BUDGET, (seed, sequence, shares)
            assert {TRUCK, OTHER_VEHICLE} <= {_static_id(o.raw) for o in heavy}, (seed, sequence)


def test_ray_share_bounds_the_points_of_a_heavy_vehicle():
    """The budget's estimate (rays into the bounding box) is at least what a truck, a van or
    trailer and a bus get alone on an open road, near and far, and not wildly more."""
    from m2skd.synth.probe import open_road
    from m2skd.synth.scene import EGO_LANE_Y, GroundLayout, ray_share
    from m2skd.synth.shapes import BUS, OTHER_VEHICLE, TRUCK, bus_parts, other_vehicle_parts, truck_parts

    config = SynthConfig(dropout=0.0, outliers=0.0)
    rng = np.random.default_rng(0)
    for builder, raw in ((truck_parts, TRUCK), (other_vehicle_parts, OTHER_VEHICLE), (bus_parts, BUS)):
        for ahead, lateral in ((0.0, 6.4), (10.0, 6.4), (25.0, 6.4), (3.0, 3.5), (50.0, 3.5)):
            parts, y = builder(rng), EGO_LANE_Y + lateral
            obj = SceneObject(raw, 1, np.array([ahead, y, float(GroundLayout.height(np.abs(y)))]), 0.0, np.zeros(3),
                              parts)
            scene = open_road(config, [obj])
            scan = simulate_scan(scene, 0, np.random.default_rng(0))
            points = (scan.instance == 1).sum() / (config.beams * config.azimuth_steps)
            estimate = ray_share(config, scene.ego.positions(np.zeros(1)), parts, ahead, y, 0.0)
            assert 0.95 * points <= estimate <= 3.5 * points, (raw, ahead, lateral, points, estimate)


def test_parking_bays_recur_at_a_steady_rate():
    """Each side's parking strip has about `parking_fraction` of parking in every 150 m stretch
    (random stretches of ~30 m left a 120 m drive with none, or with three times its share)."""
    from m2skd.synth.scene import PARKING

    config = SynthConfig()
    for seed in range(4):
        scene = scene_for("00", 150, seed)
        for side in scene.ground.parking:
            spans = side.spans(PARKING)
            for a in np.arange(side.edges[0], side.edges[-1] - 150.0, 10.0):
                inside = sum(max(0.0, min(b, a + 150.0) - max(x, a)) for x, b in spans)
                assert 0.5 <= inside / (150.0 * config.parking_fraction) <= 1.5, (seed, a, inside)


def test_drive_has_semantickitti_class_shares(tmp_path):
    """One of the 8 documented drives of the default 64-beam settings (seed 2, sequences 00 and
    08 of 150 scans): every class holding >= 0.5% of SemanticKITTI's points within a factor 2 of
    its share, the hard classes together at most 1.5% of the points (and at least a third of the
    real 0.5%), unlabelled 1-5%, each hard class in both splits. Before the heavy vehicles' ray
    budget (commit 82c2793) this drive was 2.27% hard: two vans parked beside its path and a
    truck meeting the ego; the earlier world (hard classes 6.4%, road 42%, vegetation 5.7%)
    fails all of these."""
    from m2skd.pipeline.stats import run_stats

    generate_dataset(tmp_path, sequences=("00", "08"), frames=150, seed=2, jobs=2)
    figures = run_stats(tmp_path, jobs=2)
    rows = {r["class"]: r for r in figures["all"]["shares"]}
    for name, row in rows.items():
        if row["train_id"] not in (None, 0) and row["reference"] >= 0.005:
            assert 0.5 <= row["ratio"] <= 2.0, (name, row)
    hard = rows["hard classes together"]["share"]
    assert 0.005 / 3 <= hard <= 0.015
    assert 0.01 <= rows["unlabeled"]["share"] <= 0.05
    for split in ("train", "val"):
        counts = {name: h["instances"] for name, h in figures[split]["instances"].items()}
        assert min(counts.values()) > 0, (split, counts)


def _cast_every_ray(scene, positions, headings, origin, rotation, grid, dirs, best_t, best_gid):
    """Reference caster: every object's primitives against every ray (no blocks, no bounding
    boxes), objects in order, then boxes, cylinders, ellipsoids, rings, the nearest hit kept
    and a tie going to the primitive cast first."""
    from m2skd.synth import lidar

    packed = scene.packed
    flat = np.stack([d.reshape(-1) for d in dirs], axis=1)
    view_t, view_gid = best_t.reshape(-1), best_gid.reshape(-1)
    world = lidar._world_primitives(packed, positions, headings)
    for obj in range(len(positions)):
        for kind in lidar.KINDS:
            a, b = packed.start[kind][obj:obj + 2]
            if b == a:
                continue
            table = getattr(packed, kind)
            if kind == "box":
                t = lidar.intersect_boxes(origin, flat, world["box_center"][a:b], table["half"][a:b],
                                          world["box_yaw"][a:b], table["pitch"][a:b])
            elif kind == "cylinder":
                t = lidar.intersect_cylinders(origin, flat, world["cyl_xy"][a:b], world["cyl_z"][a:b],
                                              table["radius"][a:b])
            elif kind == "ellipsoid":
                t = lidar.intersect_ellipsoids(origin, flat, world["ell_center"][a:b], table["semi"][a:b],
                                               world["ell_yaw"][a:b], table["pitch"][a:b])
            else:
                t = lidar.intersect_rings(origin, flat, world["ring_center"][a:b], world["ring_yaw"][a:b],
                                          table["radius"][a:b], table["inner"][a:b], table["half_width"][a:b])
            for row, t_row in zip(range(a, b), t):
                closer = t_row < view_t
                view_t[closer] = t_row[closer]
                view_gid[closer] = table["gid"][row]


def test_ray_blocks_change_no_scan(monkeypatch):
    """Primitives are cast only on the rays their bounding boxes can reach, several at once or
    one by one: the scans must equal those of casting every primitive against every ray, bit
    for bit (a street with riders, wheels, pitched limbs and frames, trucks and buildings)."""
    import m2skd.synth.lidar as lidar

    config = SynthConfig(beams=32, azimuth_steps=512, min_hard_per_100m=3.0)
    scene = scene_for("08", 40, seed=1, config=config)
    assert all(len(getattr(scene.packed, kind)["gid"]) for kind in lidar.KINDS)
    fast_cast = lidar.cast_objects
    for frame in (0, 23, 39):
        fast = simulate_scan(scene, frame, np.random.default_rng(frame))
        monkeypatch.setattr(lidar, "cast_objects", _cast_every_ray)
        full = simulate_scan(scene, frame, np.random.default_rng(frame))
        monkeypatch.setattr(lidar, "cast_objects", fast_cast)
        for a, b in ((fast.points, full.points), (fast.raw, full.raw), (fast.instance, full.instance)):
            np.testing.assert_array_equal(a, b)


def test_cli_hard_class_floor_reaches_the_scene(tmp_path):
    """`m2skd synth --min-hard-per-100m` writes what generate_dataset writes with that floor,
    which differs from the real shares' drive (the option is not dropped on the way)."""
    from click.testing import CliRunner

    from m2skd import cli

    args = ["--sequences", "08", "--frames", "2", "--seed", "3", "--beams", "8", "--azimuth-steps", "64"]
    result = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "cli"), *args, "--min-hard-per-100m", "40"])
    assert result.exit_code == 0, result.output
    small = dict(beams=8, azimuth_steps=64)
    generate_dataset(tmp_path / "floor", sequences=("08",), frames=2, seed=3,
                     config=SynthConfig(**small, min_hard_per_100m=40.0))
    generate_dataset(tmp_path / "real", sequences=("08",), frames=2, seed=3, config=SynthConfig(**small))
    written = _all_files(tmp_path / "cli")
    assert written == _all_files(tmp_path / "floor")
    assert written != _all_files(tmp_path / "real")
