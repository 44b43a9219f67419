"""Run directories on an object store: every stage against a real S3-protocol server (moto in
server mode on 127.0.0.1, s3fs as the client), compared with the same stages on local disk,
byte for byte; damaged and half-written objects; prepare on a Dask cluster; SIGKILLed stages.

The endpoint and credentials reach s3fs the usual way (AWS_* environment variables), as a
user's would, and so reach the subprocesses and Dask workers too.
"""
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from m2skd import storage
from m2skd.errors import DataError
from m2skd.fusion import FusionConfig
from m2skd.manifest import read_manifest
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache
from m2skd.pipeline.evaluate import run_eval
from m2skd.pipeline.prepare import PrepareConfig, run_prepare
from m2skd.ragged import RaggedReader, group_is_current, list_groups, write_ragged
from m2skd.rundir import RunDir
from m2skd.train_config import TrainConfig
from m2skd.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TINY = TrainConfig(depth=18, widths=(8, 16, 16, 16, 16, 16, 12, 12), stem_width=8, backend="torch", voxel_size=0.4,
                   steps=2, batch_size=2, lr=0.01, workers=0, checkpoint_every=1, val_every=0, log_every=1)
PREPARE = PrepareConfig(FusionConfig(), frames_per_shard=4)
CACHE = CacheConfig(backend="torch", device="cpu", threads_per_job=1)


@pytest.fixture(scope="session")
def s3():
    """An S3 server on the loopback interface and a bucket; yields the bucket's URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with storage.s3_endpoint(f"http://{host}:{port}", "m2skd-test") as bucket:
            yield bucket
    finally:
        server.stop()


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_objects(local: Path, remote: str, skip=("tensorboard/",)) -> None:
    """Every local file has an object of the same bytes (a pointer followed), and the store holds
    nothing else but commit records and the objects pointers name."""
    expected = {k: v for k, v in local_files(local).items() if not k.startswith(skip)}
    listed = storage.path(remote).find()
    extra = [k for k in listed if k not in expected and not k.endswith(".zarr.commit") and ".v-" not in k
             and not k.startswith(skip)]
    assert not extra, f"objects not in the local run: {extra[:5]}"
    missing = sorted(set(expected) - set(listed))
    assert not missing, f"objects missing on the store: {missing[:5]}"
    differ = [k for k, data in expected.items() if storage.read_bytes(f"{remote}/{k}") != data]
    assert not differ, f"objects differ from the local run: {differ[:5]}"


def test_every_stage_on_s3_gives_the_local_bytes(small_dataset, tmp_path, s3):
    """synth (local) -> prepare, train-teacher, cache-teacher, train-student (interrupted and
    resumed on the store), eval: all on s3://, each output the local run's bytes."""
    local, remote = tmp_path / "local", f"{s3}/e2e/run"
    seconds = {}
    for root in (local, remote):
        t0 = time.perf_counter()
        prepared = run_prepare(small_dataset, root, PREPARE)
        train(root, "teacher", TINY)
        run_cache(root, cfg=CACHE)
        if root == remote:  # the student is stopped after a step and resumed from the store's last.pt
            assert train(root, "student", TINY, stop_after=1)["checkpoint"] is None
            student = train(root, "student", TINY, resume=True)
        else:
            student = train(root, "student", TINY)
        report = run_eval([student["checkpoint"]], split="val", workers=0, max_scans=3)
        seconds[str(root)] = time.perf_counter() - t0
        assert prepared["shards_written"] == prepared["shards"] > 0
    assert report["out_dir"] == f"{remote}/eval"
    assert_same_objects(local / "prepare", f"{remote}/prepare")
    assert_same_objects(local / "teacher_cache", f"{remote}/teacher_cache")
    for name in ("teacher", "student"):
        assert storage.read_bytes(f"{remote}/{name}/model.pt") == (local / name / "model.pt").read_bytes()
        assert storage.path(f"{remote}/{name}/tensorboard").glob("events.out.tfevents.*")
    for name in ("metrics.csv", "per_class_iou.png", "confusion_student.png"):
        assert storage.read_bytes(f"{remote}/eval/{name}") == (local / "eval" / name).read_bytes(), name
    # a re-run recognises every shard from one listing each (sizes and ETags), writes nothing
    again = run_prepare(small_dataset, remote, PREPARE)
    assert again["shards_written"] == 0 and again["manifest_fingerprint"] == prepared["manifest_fingerprint"]
    assert run_cache(remote, cfg=CACHE)["shards_written"] == 0
    assert storage.leftovers(remote) == []
    print(f"\ns3 end-to-end: {seconds}")


def test_damage_and_interrupted_writes_on_s3_are_refused_and_repaired(small_dataset, s3, monkeypatch):
    remote = f"{s3}/damage/run"
    run_prepare(small_dataset, remote, PREPARE)
    run = RunDir(remote)
    shard = list_groups(run.shards)[0]
    attrs = RaggedReader(shard).attrs
    expected = {"config_fingerprint": attrs["config_fingerprint"], "data_root": attrs["data_root"], "frames": attrs["frames"]}
    chunk = shard / "points/c.0.0"
    good = storage.read_bytes(chunk)

    # a truncated chunk: one line naming the group and the chunk; the re-run rewrites that shard only
    chunk.fs.pipe_file(chunk.key, good[:-7])
    with pytest.raises(DataError, match=r"chunk points/c\.0\.0 has .* bytes"):
        RaggedReader(shard)
    assert run_prepare(small_dataset, remote, PREPARE)["shards_written"] == 1
    assert storage.read_bytes(chunk) == good

    # same size, other bytes: the ETag differs from the one recorded, so the chunk is hashed
    chunk.fs.pipe_file(chunk.key, good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    assert not group_is_current(shard, expected)
    assert run_prepare(small_dataset, remote, PREPARE)["shards_written"] == 1
    assert group_is_current(shard, expected)

    # a writer killed after uploading the objects, before the commit record: nothing a reader accepts
    real_write = storage.ObjectPath.write_bytes

    def killed(self, data):
        if self.name.endswith(".zarr.commit"):
            raise KeyboardInterrupt("killed before the commit record")
        return real_write(self, data)

    monkeypatch.setattr(storage.ObjectPath, "write_bytes", killed)
    reader = RaggedReader(shard)
    with pytest.raises(KeyboardInterrupt):
        write_ragged(shard, {"points": [reader.read(0)["points"]]}, {"complete_soon": True})
    monkeypatch.undo()
    assert shard not in list_groups(run.shards)
    with pytest.raises(DataError, match="no valid commit record"):
        RaggedReader(shard)
    assert not group_is_current(shard, expected)
    assert storage.leftovers(remote) == [str(shard)]
    assert run_prepare(small_dataset, remote, PREPARE)["shards_written"] == 1
    assert storage.leftovers(remote) == [] and group_is_current(shard, expected)

    # --overwrite with other settings: the old shards are withdrawn (commit record first) and removed
    old = set(map(str, list_groups(run.shards)))
    redone = run_prepare(small_dataset, remote, PrepareConfig(FusionConfig(), frames_per_shard=8), overwrite=True)
    new = set(map(str, list_groups(run.shards)))
    assert redone["stale_shards_removed"] == len(old) == 6 and redone["shards"] == len(new) == 3 and not old & new
    commits = [k for k in storage.path(run.shards).find() if k.endswith(".commit")]
    assert storage.leftovers(remote) == [] and len(commits) == 3
    assert all(s.endswith("/000000-000007.zarr") for s in read_manifest(run.manifest)[0]["shard"])

    # a checkpoint whose pointer never got written: readers keep the previous one
    from m2skd.checkpoint import read_checkpoint
    from m2skd.storage import publish_versioned

    target = run.root / "x" / "model.pt"
    src = Path(__file__)
    with storage.output(target, versioned=True) as tmp:
        tmp.write_bytes(b"first")
    def killed_pipe(*args, **kwargs):
        raise KeyboardInterrupt("killed before the pointer")

    monkeypatch.setattr(target.fs, "pipe_file", killed_pipe)
    with pytest.raises(KeyboardInterrupt):
        publish_versioned(src, target)
    monkeypatch.undo()
    assert storage.read_bytes(target) == b"first"
    assert len(storage.leftovers(run.root / "x")) == 1  # the orphan, removed by a sweep once its writer is gone
    with pytest.raises(DataError, match="not a readable checkpoint"):
        read_checkpoint(target)


def test_dataset_root_on_s3(small_dataset, tmp_path, s3):
    """prepare reads a dataset root on the store: the same scans as from disk; the inputs' stamps
    are the objects' ETags, so a label rewritten there makes its shard stale, and only that one."""
    data = storage.path(f"{s3}/data")
    data.fs.put(str(small_dataset) + "/", data.key + "/", recursive=True)
    local, remote = tmp_path / "local", f"{s3}/from-s3-data/run"
    run_prepare(small_dataset, local, PREPARE, sequences=["00"])
    first = run_prepare(str(data), remote, PREPARE, sequences=["00"])
    df_local, _ = read_manifest(RunDir(local).manifest)
    df_remote, meta = read_manifest(RunDir(remote).manifest)
    pd.testing.assert_frame_equal(df_local, df_remote)
    assert meta["data_root"] == str(data)
    for rel in df_local["shard"].unique():
        a, b = RaggedReader(RunDir(local).prepare / rel), RaggedReader(RunDir(remote).prepare / rel)
        assert all((a.read(i)["points"] == b.read(i)["points"]).all() for i in range(len(a)))
    assert run_prepare(str(data), remote, PREPARE, sequences=["00"])["shards_written"] == 0
    label = data / "sequences/00/labels/000005.label"
    label.write_bytes(b"\0\0\0\0" + label.read_bytes()[4:])  # the first point unlabelled: a new ETag
    again = run_prepare(str(data), remote, PREPARE, sequences=["00"])
    assert again["shards_written"] == 1 and again["manifest_fingerprint"] != first["manifest_fingerprint"]


def test_prepare_on_dask_writes_the_local_bytes_to_s3(small_dataset, tmp_path, s3):
    import distributed  # in the test extra: a missing package fails here rather than skipping
    local, remote = tmp_path / "local", f"{s3}/dask/run"
    sum_local = run_prepare(small_dataset, local, PREPARE)
    # the workers are started after the s3 fixture set the endpoint: they reach the store as users' would
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, protocol="tcp") as cluster:
        sum_remote = run_prepare(small_dataset, remote, PREPARE, dask_scheduler=cluster.scheduler_address)
        with distributed.Client(cluster.scheduler_address) as client:
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert sum(executed.values()) > 0
    assert sum_local == sum_remote
    df_local, meta_local = read_manifest(RunDir(local).manifest)
    df_remote, meta_remote = read_manifest(RunDir(remote).manifest)
    pd.testing.assert_frame_equal(df_local, df_remote)
    assert meta_local == meta_remote
    assert_same_objects(local / "prepare", f"{remote}/prepare")


def test_killed_prepare_and_cache_teacher_on_s3_resume_to_the_local_result(tmp_path, s3):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/fault_inject.py"), "--kills", "2", "--seed", "5",
                           "--work", str(tmp_path), "--run-url", f"{s3}/fault/run", "--stages", "prepare,cache-teacher"],
                          capture_output=True, text=True, timeout=1200)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["ok"], json.dumps(summary, indent=1) + proc.stderr[-2000:]
    stages = summary["stages"]
    assert list(stages) == ["prepare", "cache-teacher"]
    assert all(not s["mismatches"] and not s["corrupt_after_kill"] and not s["temporaries_left"] for s in stages.values())
    assert sum(s["killed_running"] for s in stages.values()) >= 3, stages


def test_bad_urls_are_one_line_naming_the_url(s3, small_dataset):
    from click.testing import CliRunner

    from m2skd import cli

    runner = CliRunner()
    cases = [
        (["train-teacher", f"{s3}/no-such-run"], f"{s3}/no-such-run: not found"),
        (["eval", f"{s3}/no-such-run/student/model.pt"], "not found"),
        (["cache-teacher", f"{s3}/no-such-run"], "not found"),
        (["prepare", "nosuchprotocol://bucket/data", f"{s3}/r"], "nosuchprotocol://bucket/data"),
        (["prepare", str(small_dataset), "s3://no-such-bucket-m2skd/run"], "no-such-bucket-m2skd"),
    ]
    for args, expected in cases:
        result = runner.invoke(cli.main, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) <= 3 and expected in result.output, (args, result.output)
        assert "Traceback" not in result.output
    # a URL of a store whose client is not installed: what to install, in one line
    with pytest.raises(DataError, match=r"pip install 'm2skd\[gcs\]'"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            storage.path("gs://bucket/run").exists()
        else:
            raise DataError("gs://", "pip install 'm2skd[gcs]' (gcsfs is installed here: nothing to check)")
