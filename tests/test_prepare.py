"""prepare: hard-class fusion, shard contents, manifest, and resumption after a crash."""
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m2skd import semantickitti as sk
from m2skd.dataset_spec import load_spec
from m2skd.errors import StaleInputError
from m2skd.fingerprint import fingerprint_json
from m2skd.fusion import FusionConfig, icp_refine
from m2skd.manifest import COLUMNS, MANIFEST_SCHEMA_VERSION, read_manifest
from m2skd.ragged import RaggedReader
from m2skd.rundir import RunDir
from m2skd.pipeline.prepare import PrepareConfig, run_prepare

SPEC = load_spec()


def scan_rows(run, row):
    reader = RaggedReader(RunDir(run).prepare / row["shard"])
    data = reader.read(int(row["shard_index"]))
    assert len(data["points"]) == row["row_stop"] - row["row_start"] == row["n_single"] + row["n_fused"]
    return data


def nn_dist(a, b):
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d2.min(1))


def test_single_scan_recoverable_bit_exact(small_dataset, prepared_run):
    run, _ = prepared_run
    df, _ = read_manifest(RunDir(run).manifest)
    for _, row in df.iterrows():
        seq = sk.Sequence(small_dataset, row["sequence"])
        data = scan_rows(run, row)
        n = row["n_single"]
        raw_points = seq.scan_path(row["frame_name"]).read_bytes()
        assert data["points"][:n].tobytes() == raw_points
        assert (data["source"][:n] == 0).all() and (data["source"][n:] > 0).all()
        if row["has_labels"]:
            assert data["label"][:n].tobytes() == seq.label_path(row["frame_name"]).read_bytes()


def test_only_hard_instances_of_current_scan_are_fused(prepared_run):
    run, summary = prepared_run
    df, _ = read_manifest(RunDir(run).manifest)
    assert summary["fused_points"] > 0
    for _, row in df[df["has_labels"]].iterrows():
        data = scan_rows(run, row)
        n = row["n_single"]
        train = SPEC.learning_lut[data["label"] & 0xFFFF]
        inst = data["label"] >> 16
        fused_train, fused_inst = train[n:], inst[n:]
        assert SPEC.hard_mask[fused_train].all(), "a non-hard class was fused"
        assert (fused_inst > 0).all()
        current = set(zip(train[:n].tolist(), inst[:n].tolist()))
        assert set(zip(fused_train.tolist(), fused_inst.tolist())) <= current, "fused points of an instance absent from the scan"
        assert data["source"][n:].max(initial=0) <= 4
        # instance-level statistics: fusion only ever adds points
        assert (np.array(row["hard_instance_points_fused"]) >= np.array(row["hard_instance_points_single"])).all()


def test_static_and_moving_instances_land_on_current_position(small_dataset, prepared_run):
    """Fused points are the old scans' instance points moved by the poses, plus (moving
    instances only) one translation onto the instance in scan t. Checked against the raw files
    and poses directly, and the synthetic moving instances must really have moved."""
    run, _ = prepared_run
    df, _ = read_manifest(RunDir(run).manifest)
    static_d, moving_d, pose_only_gap = [], [], []
    for _, row in df[df["has_labels"] & (df["frame"] >= 4)].iterrows():
        seq = sk.Sequence(small_dataset, row["sequence"])
        poses = seq.poses()
        data = scan_rows(run, row)
        n, t = row["n_single"], int(row["frame"])
        label, xyz, source = data["label"], data["points"][:, :3], data["source"]
        for key in np.unique(label[n:] >> 16):
            cur = np.flatnonzero((label[:n] >> 16) == key)
            if len(cur) < 10:
                continue
            labelled_moving = SPEC.moving_lut[label[n:][(label[n:] >> 16) == key] & 0xFFFF].any() or \
                SPEC.moving_lut[label[cur] & 0xFFFF].any()
            groups = {}
            for j in np.unique(source[n:][(label[n:] >> 16) == key]):
                old = n + np.flatnonzero(((label[n:] >> 16) == key) & (source[n:] == j))
                raw_points = sk.read_scan(seq.scan_path(f"{t - j:06d}"))
                raw_label = sk.read_label(seq.label_path(f"{t - j:06d}"))
                mine = (raw_label >> 16) == key
                mine &= SPEC.learning_lut[raw_label & 0xFFFF] == SPEC.learning_lut[label[old[0]] & 0xFFFF]
                groups[j] = (old, sk.transform(raw_points[mine, :3].astype(np.float64), sk.relative_pose(poses, t, t - j)))
            # the rule, re-derived: a moving-* label anywhere in the window, or a world-frame
            # centroid travelling over the threshold (0.5 m) between a window scan and scan t
            travel = max(np.linalg.norm(p.mean(0) - xyz[cur].mean(0)) for _, p in groups.values())
            moving = labelled_moving or travel > FusionConfig().moving_threshold_m
            for old, pose_only in groups.values():
                assert len(pose_only) == len(old)
                shift = xyz[old] - pose_only
                assert np.abs(shift - shift.mean(0)).max() < 1e-3, "fused points are not a rigid copy of the posed old points"
                if moving:
                    pose_only_gap.append(np.linalg.norm(pose_only.mean(0) - xyz[cur].mean(0)))
                    assert np.linalg.norm(xyz[old].mean(0) - xyz[cur].mean(0)) < 1e-3  # offset onto scan t
                else:
                    assert np.abs(shift).max() < 1e-3  # static: by pose alone
                if len(old) >= 10:
                    (moving_d if moving else static_d).append(np.median(nn_dist(xyz[old], xyz[cur])))
    assert static_d and moving_d, "the synthetic data should contain static and moving hard instances"
    assert np.median(pose_only_gap) > 0.2, "the moving instances should really move between scans"
    assert np.median(static_d) < 0.15
    assert np.median(moving_d) < 0.3


def test_fusion_all_fuses_whole_previous_scans(small_dataset, tmp_path):
    summary = run_prepare(small_dataset, tmp_path, PrepareConfig(FusionConfig(mode="all", k=2), frames_per_shard=8), sequences=("08",))
    df, meta = read_manifest(RunDir(tmp_path).manifest)
    n = df["n_single"].to_numpy()
    expected = np.array([n[max(0, i - 2):i].sum() for i in range(len(n))])
    assert np.array_equal(df["n_fused"].to_numpy(), expected)
    assert meta["config"]["fusion"]["mode"] == "all" and summary["scans"] == 8


def test_manifest_schema_and_content(small_dataset, prepared_run):
    run, summary = prepared_run
    table = pq.read_table(RunDir(run).manifest)
    assert table.column_names == list(COLUMNS)
    df, meta = read_manifest(RunDir(run).manifest)
    assert meta["schema_version"] == MANIFEST_SCHEMA_VERSION and meta["config"]["fusion"]["k"] == 4
    assert len(df) == 24 and summary["scans"] == 24
    assert dict(df.groupby("sequence")["split"].first()) == {"00": "train", "08": "val", "11": "test"}
    assert not df[df["sequence"] == "11"]["has_labels"].any() and (df[df["sequence"] == "11"]["n_fused"] == 0).all()
    for _, row in df.iterrows():
        assert row["n_single"] * 16 == sk.Sequence(small_dataset, row["sequence"]).scan_path(row["frame_name"]).stat().st_size
    # a row's shard fingerprint: that of its shard's chunk files, each as [size, CRC-32] of the
    # file's bytes read back here (the standard CRC-32 check value of b"123456789" is cbf43926)
    assert f"{zlib.crc32(b'123456789'):08x}" == "cbf43926"
    assert df.groupby("shard")["shard_fingerprint"].nunique().eq(1).all() and df["shard_fingerprint"].nunique() == df["shard"].nunique()
    row = df[df["has_labels"]].iloc[3]
    shard = RunDir(run).prepare / row["shard"]
    chunks = {f.relative_to(shard).as_posix(): [f.stat().st_size, f"{zlib.crc32(f.read_bytes()):08x}"]
              for f in sorted(shard.rglob("*")) if f.is_file() and f.name != "zarr.json"}
    assert len(chunks) >= 4 and row["shard_fingerprint"] == fingerprint_json(chunks)


def test_changed_config_is_refused(small_dataset, tmp_path):
    run_prepare(small_dataset, tmp_path, PrepareConfig(FusionConfig(k=2), frames_per_shard=8), sequences=("08",))
    with pytest.raises(StaleInputError, match="another configuration"):
        run_prepare(small_dataset, tmp_path, PrepareConfig(FusionConfig(k=3), frames_per_shard=8), sequences=("08",))


def test_changed_shard_codec_is_refused_then_rewritten(small_dataset, tmp_path, monkeypatch):
    """Shards stored with another codec (e.g. by an older m2skd) are not reused: the codec is part
    of the config fingerprint. --overwrite rewrites them to the same decoded arrays."""
    import m2skd.pipeline.prepare as pp

    cfg = PrepareConfig(FusionConfig(k=2), frames_per_shard=8)
    old = {name: {"cname": "zstd", "clevel": 1} for name in pp.SHARD_COMPRESSION}
    with monkeypatch.context() as m:
        m.setattr(pp, "SHARD_COMPRESSION", old)
        first = run_prepare(small_dataset, tmp_path, cfg, sequences=("08",))
        before = {i: scan_rows(tmp_path, row) for i, row in read_manifest(RunDir(tmp_path).manifest)[0].iterrows()}
    with pytest.raises(StaleInputError, match="another configuration"):
        run_prepare(small_dataset, tmp_path, cfg, sequences=("08",))
    again = run_prepare(small_dataset, tmp_path, cfg, sequences=("08",), overwrite=True)
    assert again["shards_written"] == again["shards"] and again["manifest_fingerprint"] != first["manifest_fingerprint"]
    df, _ = read_manifest(RunDir(tmp_path).manifest)
    for i, row in df.iterrows():
        data = scan_rows(tmp_path, row)
        assert all(np.array_equal(data[k], before[i][k]) and data[k].dtype == before[i][k].dtype for k in data)
    codecs = RaggedReader(RunDir(tmp_path).prepare / df["shard"][0]).group["points"].metadata.codecs
    assert [c.to_dict()["configuration"].get("cname") for c in codecs] == [None, "lz4"]


def test_icp_recovers_small_rigid_motion_and_rejects_garbage():
    rng = np.random.default_rng(0)
    target = np.concatenate([rng.uniform([-0.3, -0.9, 0], [0.3, 0.9, 1.1], (300, 3)) * [1, 1, 1]])
    target = target[(np.abs(target[:, 0]) > 0.25) | (np.abs(target[:, 1]) > 0.8)]  # box surface-ish
    a = np.radians(6)
    R = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    source = (target - [0.08, -0.05, 0]) @ R.T
    T, ok = icp_refine(source, target, FusionConfig(align="icp"))
    assert ok
    moved = source @ T[:3, :3].T + T[:3, 3]
    assert np.median(nn_dist(moved, target)) < np.median(nn_dist(source, target)) * 0.5
    _, ok = icp_refine(rng.uniform(-5, 5, (50, 3)) + 30, target, FusionConfig(align="icp"))
    assert not ok


def test_instance_occupancy_by_hand():
    from m2skd.fusion import instance_occupancy

    # single scan: instance 3 has two points in one 1 m voxel, instance 8 one point; then fused
    # points: two for instance 3 (one in a new voxel, one in its old one), one of instance 5
    # (not in the single scan: not counted), one unkeyed point
    xyz = np.array([[0.1, 0.1, 0.1], [0.9, 0.2, 0.5], [5.5, 0, 0], [7, 7, 7],
                    [1.5, 0.1, 0.1], [0.5, 0.5, 0.5], [3, 3, 3], [0.2, 0.2, 0.2]])
    keys = np.array([3, 3, 8, 0, 3, 3, 5, 0])
    out = instance_occupancy(xyz, keys, 4, 1.0)
    assert out["key"].tolist() == [3, 8]
    assert out["points_single"].tolist() == [2, 1] and out["points_fused"].tolist() == [4, 1]
    assert out["voxels_single"].tolist() == [1, 1] and out["voxels_fused"].tolist() == [2, 1]


def test_prepare_reports_the_occupied_voxel_gain_of_hard_instances(small_dataset, prepared_run):
    from m2skd.pipeline.prepare import occupancy_gain

    run, _ = prepared_run
    df, _ = read_manifest(RunDir(run).manifest)
    labelled = df[df["has_labels"]]
    single = sum(sum(v) for v in labelled["hard_instance_points_single"])
    fused = sum(sum(v) for v in labelled["hard_instance_points_fused"])
    coarse = occupancy_gain(run, 1000.0)  # one voxel per instance, up to 8 for those astride the axes (z = 0)
    assert coarse["hard_instances"] == sum(len(v) for v in labelled["hard_instance_points_single"]) > 0
    assert coarse["points_single"] == single and coarse["points_fused"] == fused > single
    assert coarse["hard_instances"] <= coarse["voxels_single"] <= coarse["voxels_fused"] <= 8 * coarse["hard_instances"]
    assert coarse["points_gain"] == pytest.approx(fused / single - 1)
    fine = occupancy_gain(run, 0.2)
    assert 0 < fine["voxel_gain"] < fine["points_gain"]
    assert fine["voxels_single"] <= single and fine["voxels_fused"] <= fused
    summary = run_prepare(small_dataset, run, PrepareConfig(FusionConfig(), frames_per_shard=4), voxel_size=0.2)
    assert summary["hard_instance_voxel_gain"] == pytest.approx(fine["voxel_gain"])


def test_occupancy_gain_is_kept_for_the_shards_it_was_measured_on(prepared_run, monkeypatch):
    """A re-run of a finished demo or study does not read every shard again for the gain; the
    kept figure is used only while the manifest lists the same shard contents."""
    from m2skd.pipeline import prepare

    run, _ = prepared_run
    first = prepare.occupancy_gain(run, 0.3)
    memo = RunDir(run).prepare / "occupancy_gain_0.3.json"
    kept = json.loads(memo.read_text())
    monkeypatch.setattr(prepare, "shard_occupancy", lambda *a: pytest.fail("a shard was read again"))
    assert prepare.occupancy_gain(run, 0.3) == first
    monkeypatch.undo()
    memo.write_text(json.dumps({**kept, "manifest": "other shards", "gain": {**first, "voxel_gain": -1.0}}))
    assert prepare.occupancy_gain(run, 0.3) == first  # measured again
    assert json.loads(memo.read_text())["manifest"] == kept["manifest"]


def _chunk_bytes(run):
    """Every chunk file of the run's shards, by its path under the shards folder."""
    shards = RunDir(run).shards
    return {p.relative_to(shards).as_posix(): p.read_bytes() for p in sorted(shards.rglob("c.*")) if p.is_file()}


def test_next_shard_fuses_with_the_frames_the_last_one_loaded(small_dataset, tmp_path, monkeypatch):
    """A shard's first scans fuse with the k previous frames as the previous shard of the process
    loaded them, read once for the sequence, to the same bytes as shards that each read them."""
    import m2skd.pipeline.prepare as pp

    loads = []
    load_frame = pp.load_frame
    monkeypatch.setattr(pp, "load_frame", lambda seq, name, *a: loads.append(name) or load_frame(seq, name, *a))
    cfg = PrepareConfig(FusionConfig(k=3), frames_per_shard=2)  # 4 shards of 2 frames
    run_prepare(small_dataset, tmp_path / "carried", cfg, sequences=("08",))
    assert sorted(loads) == sorted(sk.Sequence(small_dataset, "08").frames)  # each frame once
    loads.clear()
    monkeypatch.setattr(pp, "_carry_key", lambda *a: object())  # no shard takes another's frames
    run_prepare(small_dataset, tmp_path / "loaded", cfg, sequences=("08",))
    assert len(loads) == 2 + 4 + 5 + 5  # each shard's 2 frames and the up to 3 before them
    carried, loaded = _chunk_bytes(tmp_path / "carried"), _chunk_bytes(tmp_path / "loaded")
    assert len(carried) > 4 and carried == loaded


def test_a_frame_edited_after_its_shard_is_loaded_again_by_the_next(small_dataset, tmp_path):
    """The frames a shard takes from the previous one are checked against their files' stamps: a
    previous frame whose labels changed in between is read again, not fused as it was."""
    import dataclasses
    import os
    import shutil

    import m2skd.pipeline.prepare as pp

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    cfg = PrepareConfig(FusionConfig(k=3), frames_per_shard=4)
    first, second = pp.plan(str(data), RunDir(tmp_path / "run"), cfg, SPEC, sequences=("08",))

    def shard_bytes(task, name):
        path = tmp_path / name
        pp.prepare_shard(dataclasses.replace(task, path=str(path)), cfg, SPEC)
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("c.*"))}

    pp.forget_carried_frames()
    before = shard_bytes(second, "before")  # the frames as they were, each read
    pp.prepare_shard(first, cfg, SPEC)  # leaves its frames for the next shard
    label = sk.Sequence(data, "08").label_path(first.frames[-1])
    raw = np.fromfile(label, np.uint32)
    raw[:] = 40  # every point "road": no hard instance left to fuse from this frame
    raw.tofile(label)
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    after = shard_bytes(second, "after")  # the next shard of this process
    pp.forget_carried_frames()
    assert after == shard_bytes(second, "read")  # the same as from a process that reads the edited file
    assert after != before  # the edit reaches the next shard: fused as it was, the test could not tell


def test_prepare_leaves_at_most_one_shard_publishing_and_waits_for_it(small_dataset, tmp_path, monkeypatch):
    """At 1 job a shard's last chunks, metadata and rename are left to its writer thread while the
    next shard reads and fuses. Publishing made slower than a shard: each shard finds the previous
    one published when it finishes (memory stays bounded), and the manifest lists every shard."""
    import time

    from m2skd import ragged
    from m2skd.ragged import list_groups

    complete, finish = ragged.RaggedWriter._complete, ragged.RaggedWriter.finish
    started, done, publishing, waits = [], [], [], []

    def slow_complete(self, attrs):
        time.sleep(0.2)
        try:
            return complete(self, attrs)
        finally:
            done.append(self.path)

    def watched_finish(self, attrs, wait=True):
        publishing.append(len(started) - len(done))  # shards still publishing as this one finishes
        started.append(self.path)
        waits.append(wait)
        return finish(self, attrs, wait)

    monkeypatch.setattr(ragged.RaggedWriter, "_complete", slow_complete)
    monkeypatch.setattr(ragged.RaggedWriter, "finish", watched_finish)
    cfg = PrepareConfig(FusionConfig(k=3), frames_per_shard=2)
    summary = run_prepare(small_dataset, tmp_path / "run", cfg, sequences=("08",))
    frames = len(sk.Sequence(small_dataset, "08").frames)
    assert len(started) == -(-frames // 2) > 2 and not any(waits)  # the shards were left to publish
    assert publishing == [0] * len(started)
    assert summary["scans"] == frames and len(list_groups(RunDir(tmp_path / "run").shards)) == len(started)


@pytest.mark.parametrize("failing_shard", [0, -1])
def test_a_shard_that_fails_to_publish_fails_prepare_before_its_manifest(small_dataset, tmp_path, monkeypatch, failing_shard):
    """The writer thread of the first (or the last) shard fails on its last file, after prepare went on:
    prepare raises that error, writes no manifest and no record, and publishes no part of that shard."""
    import m2skd.pipeline.prepare as pp
    from m2skd import ragged
    from m2skd.ragged import list_groups

    cfg = PrepareConfig(FusionConfig(k=3), frames_per_shard=2)
    run = RunDir(tmp_path / "run")
    failing = pp.plan(str(small_dataset), run, cfg, SPEC, sequences=("08",))[failing_shard].path
    write_file = ragged._Files._write_file

    def fail_once(self, key, blob):
        if key == "zarr.json" and self.root.name.startswith(Path(failing).name + ".tmp-"):
            raise OSError("disk full")
        write_file(self, key, blob)

    monkeypatch.setattr(ragged._Files, "_write_file", fail_once)
    with pytest.raises(OSError, match="disk full"):
        run_prepare(small_dataset, run.root, cfg, sequences=("08",))
    assert not run.manifest.exists() and not run.prepare_record.exists()
    assert Path(failing) not in list_groups(run.shards)
    assert not list(Path(failing).parent.glob(Path(failing).name + ".tmp-*"))


def test_a_workers_batch_reads_each_frame_once_and_returns_with_its_shards_published(small_dataset, tmp_path, monkeypatch):
    """With jobs, a worker's task is a batch of consecutive shards of one sequence: within it each
    frame is loaded once (the shards carry frames as a serial run's do), and when it returns every
    shard is published and nothing is left pending or carried in the worker's thread."""
    import m2skd.pipeline.prepare as pp
    from m2skd.ragged import list_groups

    loads = []
    load_frame = pp.load_frame
    monkeypatch.setattr(pp, "load_frame", lambda seq, name, *a: loads.append(name) or load_frame(seq, name, *a))
    cfg = PrepareConfig(FusionConfig(k=3), frames_per_shard=2)
    run = RunDir(tmp_path / "run")
    tasks = pp.plan(str(small_dataset), run, cfg, SPEC, sequences=("08",))
    batches = pp.consecutive_batches(tasks, 2)
    assert [len(b) for b in batches] == [2, 2] and [t for b in batches for t in b] == tasks
    results = pp.ensure_shards(batches[1], cfg, SPEC)
    frames = [name for t in batches[1] for name in t.frames]
    assert sorted(loads) == sorted(set(loads)) and set(frames) <= set(loads)  # each once, the 3 before included
    assert len(loads) == len(frames) + 3
    assert [r["path"] for r in results] == [t.path for t in batches[1]]
    assert {str(p) for p in list_groups(run.shards)} == {t.path for t in batches[1]}
    assert pp._kept.publishing is None and pp._kept.carried == (None, {})


def test_prepare_with_jobs_writes_the_bytes_a_serial_prepare_writes(small_dataset, tmp_path):
    """Batches of consecutive shards in two worker processes: the same shards and manifest rows
    as one process preparing every shard in order."""
    cfg = PrepareConfig(FusionConfig(k=3), frames_per_shard=2)
    serial = run_prepare(small_dataset, tmp_path / "serial", cfg, jobs=1)
    batched = run_prepare(small_dataset, tmp_path / "batched", cfg, jobs=2)
    assert serial["shards"] == batched["shards"] > 4 and serial["manifest_fingerprint"] == batched["manifest_fingerprint"]
    assert _chunk_bytes(tmp_path / "serial") == _chunk_bytes(tmp_path / "batched")
