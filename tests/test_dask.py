"""prepare and cache-teacher on a dask.distributed cluster give the joblib run's outputs, bit for bit.

The cluster is a LocalCluster of 2 worker processes (1 thread each) on the loopback interface,
reached through its scheduler address exactly as `--dask-scheduler tcp://...` would be.
"""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from m2skd.fusion import FusionConfig
from m2skd.manifest import read_manifest
from m2skd.rundir import RunDir
from m2skd.train_config import TrainConfig
from m2skd.trainer import train
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache
from m2skd.pipeline.prepare import PrepareConfig, run_prepare

distributed = pytest.importorskip("distributed")

TINY = TrainConfig(depth=18, widths=(8, 16, 16, 16, 16, 16, 12, 12), stem_width=8, backend="torch", voxel_size=0.4,
                   steps=1, batch_size=2, lr=0.01, workers=0, checkpoint_every=1000, val_every=0, log_every=1)
PREPARE = PrepareConfig(FusionConfig(), frames_per_shard=4)
# one torch thread per task, as on a Dask worker with one thread, so both runs do the same float work
CACHE = CacheConfig(backend="torch", device="cpu", logit_encoding="fp16", feature_encoding="fp16", threads_per_job=1)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, protocol="tcp") as c:
        yield c


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    """Same files, same bytes: zarr metadata (with the attrs) and every compressed chunk."""
    fa, fb = files_under(a), files_under(b)
    assert fa and sorted(fa) == sorted(fb)
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files differ between the joblib and the Dask run: {differ[:5]}"


def test_prepare_and_cache_on_dask_equal_joblib(small_dataset, tmp_path, cluster):
    address = cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    local, remote = tmp_path / "joblib", tmp_path / "dask"

    sum_local = run_prepare(small_dataset, local, PREPARE, jobs=2)
    advances = []
    sum_remote = run_prepare(small_dataset, remote, PREPARE, dask_scheduler=address,
                             progress=lambda total=None, advance=None: advance and advances.append(advance))
    assert sum_local == sum_remote
    assert len(advances) == sum_remote["shards"] > 2  # a shard a task: the cluster's size is not known to prepare
    df_local, meta_local = read_manifest(RunDir(local).manifest)
    df_remote, meta_remote = read_manifest(RunDir(remote).manifest)
    pd.testing.assert_frame_equal(df_local, df_remote)
    assert meta_local == meta_remote
    assert_same_tree(RunDir(local).shards, RunDir(remote).shards)

    # one teacher for both, copied to the same place in each run directory (cache.json records
    # its path); the Dask run's manifest must carry the same content fingerprint, or run_cache
    # refuses the checkpoint: a second check that the two prepares agree
    teacher = Path(train(local, "teacher", TINY, name="teacher", overwrite=True)["checkpoint"])
    remote_teacher = remote / teacher.relative_to(local)
    remote_teacher.parent.mkdir(parents=True)
    shutil.copy2(teacher, remote_teacher)
    cache_local = run_cache(local, teacher, CACHE, jobs=2)
    cache_remote = run_cache(remote, remote_teacher, CACHE, dask_scheduler=address)
    assert cache_local == cache_remote
    assert_same_tree(*(RunDir(r).teacher_cache for r in (local, remote)))
    records = [json.loads((RunDir(r).teacher_cache / "cache.json").read_text()) for r in (local, remote)]
    assert records[0] == records[1]
    # the cluster's workers ran the tasks: no silent fallback to local execution
    with distributed.Client(address) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and sum(executed.values()) > 0
