"""`m2skd prepare`: read a SemanticKITTI-layout dataset, fuse hard-class instances from the k
previous scans, write Zarr shards (one per block of consecutive frames) and a Parquet manifest.

Frames are their file names' numbers (docs/method.md, multi-scan fusion): the k previous scans of frame t are
the frame numbers t-1..t-k that exist, and frame t's pose is line t of poses.txt.

Resumable: a shard is written whole under a temporary name and renamed; a re-run skips shards
that are complete, intact and made with the same configuration from the same input files, and
rewrites any other. "Same" is decided in O(files) by sizes and modification stamps (of the
shard's chunks and of the scans, labels, poses and calibration it was made from), hashes only
where a stamp differs or with `verify` (ragged.group_is_current). The manifest lists every
complete shard in the run directory, so preparing some splits or sequences adds to it.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from m2skd import semantickitti as sk
from m2skd import storage
from m2skd.dataset_spec import DatasetSpec, load_spec
from m2skd.atomic import read_json, write_json_atomic
from m2skd.errors import DataError, StaleInputError
from m2skd.fingerprint import fingerprint_json
from m2skd.fusion import Frame, FusionConfig, fuse, instance_keys, instance_occupancy
from m2skd.malloc import retain_freed_memory
from m2skd.manifest import read_manifest, write_manifest
from m2skd.ragged import RaggedReader, dir_bytes, file_stamp, group_is_current, list_groups, RaggedWriter
from m2skd.rundir import RunDir, spec_for_run

from .parallel import run_tasks


#: blosc settings of the shard fields, chosen by measurement on 64-beam scans (docs/results.md):
#: lz4 at level 9 with byte shuffle stores the points smaller than zstd at level 1 did (0.768 against
#: 0.780 of their raw bytes) and encodes them 7x faster, decodes them 5x faster; labels and source
#: ids take 8 kB more a scan (of 1.65 MB) for 3x faster coding. Part of the config fingerprint, so
#: shards stored otherwise are refused (or, with --overwrite, rewritten).
SHARD_COMPRESSION = {name: {"cname": "lz4", "clevel": 9} for name in ("points", "label", "source")}


@dataclass(frozen=True)
class PrepareConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    frames_per_shard: int = 50
    dataset: str = "semantickitti"
    hard_classes: tuple[int, ...] | None = None  # None: the dataset description's set

    def __post_init__(self):
        if self.frames_per_shard < 1:
            raise ValueError(f"frames_per_shard must be >= 1, got {self.frames_per_shard}")

    def to_dict(self) -> dict:
        return {**asdict(self), "fusion": self.fusion.to_dict()}

    def fingerprint(self) -> str:
        return fingerprint_json({**self.to_dict(), "shard_compression": SHARD_COMPRESSION})


@dataclass(frozen=True)
class ShardTask:
    data_root: str
    sequence: str
    split: str
    start: int  # positions in the sequence's frames ordered by number
    stop: int
    path: str
    overwrite: bool = False
    verify: bool = False  # hash every chunk of an existing shard, not only those whose stamp differs
    frames: tuple[str, ...] = ()  # the shard's frame names
    # (number, name) of the shard's frames and of up to k frames before them, and the sequence's
    # last frame number + 1: from the plan's one listing of the sequence, not one per shard
    window: tuple[tuple[int, str], ...] = ()
    n_scans: int = 0


class _KeptBetweenShards(threading.local):
    """What a thread keeps from one shard to the next of a run of consecutive shards (the caller's
    at 1 job; a worker's batch with jobs, `ensure_shards`):

    - carried: (sequence key, {frame number: (frame name, input stamps, Frame)}), the last k frames
      the previous shard loaded. The next shard of the sequence fuses its first scans with them:
      loaded again, they were a third of the loads of a shard of 8 frames at k = 4. Taken only
      where the frame's files, pose and the learning map are what the shard itself sees.
    - poses: (key, poses) of the sequence last read: poses.txt parsed once a sequence, not once a
      shard (2 ms a shard on the bench's 48 lines; real sequences have up to 4,541). Taken only
      where the poses and calibration files' stamps are those the shard records.
    - publishing: the future of the last shard left to its writer thread to publish
      (prepare_shard's publish_later): its last chunks, metadata and rename done while the next shard
      reads and fuses; waiting for them cost about 1 ms a scan at 8 frames a shard."""

    carried: tuple = (None, {})
    poses: tuple = (None, None)
    publishing = None


_kept = _KeptBetweenShards()


def _carry_key(seq: sk.Sequence, labelled: bool, spec: DatasetSpec) -> tuple:
    return str(seq.path), labelled, spec.learning_lut.tobytes()


def forget_carried_frames() -> None:
    """Drop the frames and poses this thread kept from its last shard."""
    _kept.carried, _kept.poses = (None, {}), (None, None)


def _sequence_poses(seq: sk.Sequence, n_scans: int, stamps: dict) -> np.ndarray:
    files = (seq.path / "poses.txt", seq.path / "calib.txt")
    key = (str(seq.path), n_scans, *(tuple(stamps[str(f)]) for f in files))
    if _kept.poses[0] != key:
        poses = seq.poses(n_scans=n_scans)
        poses.flags.writeable = False  # shared by the sequence's shards
        _kept.poses = (key, poses)
    return _kept.poses[1]


def wait_for_published() -> None:
    """Wait for the shard this thread left publishing; its failure, if any, is raised here."""
    pending, _kept.publishing = _kept.publishing, None
    if pending is not None:
        pending.result()


def load_frame(seq: sk.Sequence, frame_name: str, pose: np.ndarray, labelled: bool, spec: DatasetSpec) -> Frame:
    scan_path = seq.scan_path(frame_name)
    points = sk.parse_scan(sk.read_bytes(scan_path), scan_path)
    if not labelled:
        return Frame(points, None, None, pose)
    label_path = seq.label_path(frame_name)
    raw = sk.parse_label(sk.read_bytes(label_path), label_path, len(points))
    return Frame(points, raw, sk.training_ids(label_path, raw, spec.learning_lut), pose)


def shard_attrs(cfg: PrepareConfig, data_root: str) -> dict:
    """What a finished shard must record for a re-run to reuse it."""
    return {"config_fingerprint": cfg.fingerprint(), "data_root": data_root}


def ensure_shards(batch: list[ShardTask], cfg: PrepareConfig, spec: DatasetSpec, leave_last: bool = False) -> list[dict]:
    """ensure_shard of consecutive shards of one sequence, in this thread: each shard takes the
    frames the one before loaded, and is published by its writer thread while the next one reads
    and fuses. Returns once all are published, or with `leave_last` the last may still be (the
    caller then waits for it: wait_for_published)."""
    try:
        results = [ensure_shard(task, cfg, spec, publish_later=True) for task in batch]
        if not leave_last:
            wait_for_published()
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            wait_for_published()
        raise
    finally:
        if not leave_last:
            forget_carried_frames()  # a worker's next batch may be of another sequence
    return results


def consecutive_batches(tasks: list[ShardTask], n: int) -> list[list[ShardTask]]:
    """The shards in about `n` batches, each of consecutive shards of one sequence (a worker's task)."""
    size = max(1, -(-len(tasks) // n))
    batches = []
    for _, group in itertools.groupby(tasks, key=lambda t: t.sequence):
        group = list(group)
        batches.extend(group[i : i + size] for i in range(0, len(group), size))
    return batches


def ensure_shard(task: ShardTask, cfg: PrepareConfig, spec: DatasetSpec, publish_later: bool = False) -> dict:
    """Reuse the shard if current (same settings, frames and input files; intact), else (re)write it."""
    expected = {**shard_attrs(cfg, task.data_root), "frames": list(task.frames)}
    if not task.overwrite and group_is_current(task.path, expected, task.verify):
        return {"path": task.path, "frames": task.stop - task.start, "written": False}
    return prepare_shard(task, cfg, spec, publish_later)


def prepare_shard(task: ShardTask, cfg: PrepareConfig, spec: DatasetSpec, publish_later: bool = False) -> dict:
    """Fuse and write the frames at positions [start, stop) of one sequence; returns the shard's summary.
    `publish_later`: the shard's last chunks, metadata and rename are left to its writer thread, at
    most one shard pending in this thread (wait_for_published)."""
    retain_freed_memory()  # in whichever process runs the shard
    seq = sk.Sequence(task.data_root, task.sequence)
    labelled = seq.has_labels
    fcfg = cfg.fusion if (labelled or cfg.fusion.mode != "hard") else FusionConfig(**{**cfg.fusion.to_dict(), "mode": "none"})
    k = fcfg.k if fcfg.mode != "none" else 0
    first = int(task.frames[0])
    window: dict[int, Frame] = {}  # frame number -> frame, the k numbers before the current one
    rows = []
    icp = [0, 0]
    row_start = 0
    todo = [(n, name) for n, name in task.window if n >= first - k]
    # stamps taken before reading: a file changed while it is read differs at the next run
    frame_files = {name: [seq.scan_path(name)] + ([seq.label_path(name)] if labelled else []) for _, name in todo}
    inputs = [seq.path / "poses.txt", seq.path / "calib.txt"] + [p for files in frame_files.values() for p in files]
    stamps = {str(p): file_stamp(p) for p in inputs}
    frame_stamps = {name: [stamps[str(p)] for p in files] for name, files in frame_files.items()}
    poses = _sequence_poses(seq, task.n_scans, stamps)
    shard_rel = storage.path(task.path).relative_to(storage.path(task.path).parents[2]).as_posix()  # shards/SEQ/NAME
    key = _carry_key(seq, labelled, spec)
    carried = _kept.carried[1] if _kept.carried[0] == key else {}
    with RaggedWriter(task.path, SHARD_COMPRESSION) as writer:  # scan by scan: earlier chunks are written while later scans fuse
        for i, name in todo:
            kept = carried.get(i) if i < first else None
            if kept is not None and kept[:2] == (name, frame_stamps[name]) and np.array_equal(kept[2].pose, poses[i]):
                frame = kept[2]
            else:
                frame = load_frame(seq, name, poses[i], labelled, spec)
            if i >= first:
                previous = [(j, window[i - j]) for j in range(1, k + 1) if i - j in window]
                fused = fuse(frame, previous, spec.hard_mask, spec.moving_lut, fcfg)
                n_single, n_fused = len(frame.points), len(fused.points)
                single_label = frame.raw_label if labelled else np.zeros(n_single, np.uint32)
                writer.append({"points": (frame.points, fused.points), "label": (single_label, fused.raw_label),
                               "source": (np.zeros(n_single, np.uint8), fused.source)})
                icp[0] += fused.icp_accepted
                icp[1] += fused.icp_rejected
                rows.append({
                    "sequence": task.sequence, "frame": i, "frame_name": name, "split": task.split,
                    "has_labels": labelled, "n_single": n_single, "n_fused": n_fused,
                    "n_hard_instances": len(fused.instance_points_single),
                    "shard": shard_rel,
                    "shard_index": len(rows), "row_start": row_start, "row_stop": row_start + n_single + n_fused,
                    "class_points_single": (np.bincount(frame.train, minlength=spec.num_classes)
                                            if labelled else np.zeros(spec.num_classes, np.int64)).tolist(),
                    "hard_instance_points_single": fused.instance_points_single.tolist(),
                    "hard_instance_points_fused": fused.instance_points_fused.tolist(),
                })
                row_start += n_single + n_fused
            window[i] = frame
            window = {j: f for j, f in window.items() if j > i - k}
        wait_for_published()  # the previous shard's: at most one pending, so memory stays bounded
        published = writer.finish({"sequence": task.sequence, **shard_attrs(cfg, task.data_root), "rows": rows,
                                   "frames": [r["frame_name"] for r in rows], "input_stamps": stamps,
                                   "icp_accepted": icp[0], "icp_rejected": icp[1]}, wait=not publish_later)
    if publish_later:
        _kept.publishing = published
    names = dict(todo)
    _kept.carried = (key, {j: (names[j], frame_stamps[names[j]], f) for j, f in window.items()})
    return {"path": task.path, "frames": len(rows), "written": True}


def plan(data_root, run: RunDir, cfg: PrepareConfig, spec: DatasetSpec, splits=None, sequences=None, overwrite=False,
         verify=False) -> list[ShardTask]:
    tasks = []
    for name in sk.list_sequences(data_root):
        split = spec.split_of(name)
        if (splits and split not in splits) or (sequences and name not in sequences):
            continue
        numbered = sk.Sequence(data_root, name).numbered_frames()
        n_scans = numbered[-1][0] + 1 if numbered else 0
        for start in range(0, len(numbered), cfg.frames_per_shard):
            stop = min(len(numbered), start + cfg.frames_per_shard)
            path = run.shards / name / f"{numbered[start][0]:06d}-{numbered[stop - 1][0]:06d}.zarr"
            frames = tuple(f for _, f in numbered[start:stop])
            window = tuple(numbered[max(0, start - cfg.fusion.k):stop])
            tasks.append(ShardTask(str(data_root), name, split, start, stop, str(path), overwrite, verify, frames, window, n_scans))
    return tasks


def check_existing_shards(run: RunDir, record: dict, planned: set[str], overwrite: bool) -> list[Path]:
    """Shards already in the run directory made with other settings or data: refused unless
    --overwrite, which removes those it does not rewrite. Returns the shards to remove."""
    stale = []
    for path in list_groups(run.shards):
        try:
            attrs = RaggedReader(path).attrs
        except DataError:
            continue  # damaged: rewritten if planned, reported when the manifest is built otherwise
        if attrs.get("config_fingerprint") == record["config_fingerprint"] and attrs.get("data_root") == record["data_root"]:
            continue
        if not overwrite:
            raise StaleInputError(
                f"{path}: prepared with another configuration or dataset (config {attrs.get('config_fingerprint')} from "
                f"{attrs.get('data_root')}; now {record['config_fingerprint']} from {record['data_root']}); "
                "use a new run directory or --overwrite"
            )
        if str(path) not in planned:
            stale.append(path)
    return stale


def manifest_rows(run: RunDir) -> tuple[list[dict], int]:
    """Rows of every complete shard in the run directory, and their bytes on disk. A row's
    `shard_fingerprint` is that of its shard's chunks as recorded when written (size and CRC-32 of
    each). A shard holds every point and raw label of its scans verbatim, and the poses act
    through the fused points it holds, so this covers the inputs without hashing them again;
    later stages go stale exactly when a byte they read changes."""
    rows, nbytes = [], 0
    for path in list_groups(run.shards):
        reader = RaggedReader(path)
        digest = fingerprint_json(reader.attrs["chunk_files"])
        rows.extend({**row, "shard_fingerprint": digest} for row in reader.attrs["rows"])
        nbytes += dir_bytes(path)
    return rows, nbytes


def shard_occupancy(path, spec: DatasetSpec, voxel_size: float) -> dict[str, np.ndarray]:
    """instance_occupancy of every hard instance of every labelled scan in one shard, concatenated."""
    reader = RaggedReader(path)
    parts = []
    for i, row in enumerate(reader.attrs["rows"]):
        if not row["has_labels"]:
            continue
        data = reader.read(i, names=["points", "label"])
        raw = data["label"]
        train = spec.learning_lut.take(raw & 0xFFFF)
        keys = np.where(spec.hard_mask[train] & ((raw >> 16) > 0), instance_keys(train, raw >> 16), 0)
        parts.append(instance_occupancy(data["points"][:, :3], keys, row["n_single"], voxel_size))
    names = ("points_single", "points_fused", "voxels_single", "voxels_fused")
    return {n: np.concatenate([p[n] for p in parts]) if parts else np.zeros(0, np.int64) for n in names}


def occupancy_gain(run_dir, voxel_size: float, splits=None, jobs: int = 1) -> dict:
    """What fusion adds to the hard instances at `voxel_size`: points and occupied voxels, fused
    vs single, pooled over every hard instance of the prepared labelled scans (of `splits`).
    A gain is fused / single - 1 (1.0 = +100%); `median_voxel_gain` is per instance."""
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    run = RunDir(run_dir)
    spec = spec_for_run(run)
    manifest, meta = read_manifest(run.manifest)
    # kept beside the manifest for the shards it lists: a re-run of a finished demo or study reads no shard for it
    memo = run.prepare / f"occupancy_gain_{float(voxel_size)!r}{''.join('_' + s for s in sorted(splits or ()))}.json"
    key = meta.get("content_fingerprint")
    kept = read_json(memo) if key and storage.path(memo).exists() else {}
    if kept.get("manifest") == key and "gain" in kept:
        return kept["gain"]
    if splits:
        manifest = manifest[manifest["split"].isin(list(splits))]
    shards = sorted(manifest["shard"].unique())
    parts = run_tasks(lambda shard: shard_occupancy(run.prepare / shard, spec, voxel_size), shards, jobs)
    total = {n: int(sum(int(p[n].sum()) for p in parts)) for n in ("points_single", "points_fused", "voxels_single", "voxels_fused")}
    per_instance = np.concatenate([p["voxels_fused"] / np.maximum(p["voxels_single"], 1) for p in parts] or [np.zeros(0)])
    gain = {"voxel_size": float(voxel_size), "hard_instances": int(per_instance.size), **total,
            "points_gain": total["points_fused"] / max(total["points_single"], 1) - 1.0,
            "voxel_gain": total["voxels_fused"] / max(total["voxels_single"], 1) - 1.0,
            "median_voxel_gain": float(np.median(per_instance) - 1.0) if per_instance.size else 0.0}
    if key:
        write_json_atomic(memo, {"manifest": key, "gain": gain})
    return gain


def run_prepare(data_root, run_dir, cfg: PrepareConfig, jobs: int = 1, splits=None, sequences=None, overwrite=False, progress=None,
                dask_scheduler=None, verify=False, voxel_size: float | None = None) -> dict:
    """Prepare every planned shard not already done, then rewrite the manifest over all shards.
    `verify`: hash every chunk of the existing shards (else only where a size or stamp differs).
    With `voxel_size`, the summary adds the occupied-voxel gain fusion gives hard instances
    there (`occupancy_gain`, over every prepared labelled scan)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    spec = load_spec(cfg.dataset)
    if cfg.hard_classes is not None:
        spec = spec.with_hard_classes(cfg.hard_classes)
    cfg = PrepareConfig(cfg.fusion, cfg.frames_per_shard, cfg.dataset, spec.hard_classes)
    run = RunDir(run_dir)
    data_root = str(storage.path(data_root).resolve())
    record = {"config": cfg.to_dict(), "config_fingerprint": cfg.fingerprint(), "data_root": data_root}
    tasks = plan(data_root, run, cfg, spec, splits, sequences, overwrite, verify)
    if not tasks:
        raise StaleInputError(f"{data_root}: no sequences match splits={splits} sequences={sequences}")
    swept = storage.sweep(run.prepare)
    stale = check_existing_shards(run, record, {t.path for t in tasks}, overwrite)
    if progress:
        progress(total=sum(t.stop - t.start for t in tasks))
    # in this thread shard by shard (progress by shard), the frames carried and the pending publish
    # spanning all; with jobs, batches of consecutive shards, each a worker's task, two a job; on a
    # Dask cluster, whose size is not known here, a shard a task
    serial = jobs == 1 and not dask_scheduler
    batches = [[t] for t in tasks] if serial or dask_scheduler else consecutive_batches(tasks, 2 * jobs)
    try:
        results = run_tasks(
            lambda batch: ensure_shards(batch, cfg, spec, leave_last=serial), batches, jobs,
            on_done=(lambda batch, r: progress(advance=sum(s["frames"] for s in r))) if progress else None,
            dask_scheduler=dask_scheduler,
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report; none left pending
            wait_for_published()
        raise
    finally:
        forget_carried_frames()  # this thread's last shard's frames and poses: no later stage needs them
    wait_for_published()  # every shard on disk (or its failure raised) before the manifest lists them
    results = [r for batch in results for r in batch]
    for path in stale:
        storage.remove_tree(path)
    rows, nbytes = manifest_rows(run)
    df = write_manifest(rows, run.manifest, {"stage": "prepare", **record})
    write_json_atomic(run.prepare_record, record)  # last: a failed prepare leaves no record
    single = int(df["n_single"].sum())
    inst_single = np.concatenate([np.asarray(v, np.int64) for v in df["hard_instance_points_single"]] or [np.zeros(0, np.int64)])
    inst_fused = np.concatenate([np.asarray(v, np.int64) for v in df["hard_instance_points_fused"]] or [np.zeros(0, np.int64)])
    return {
        "scans": len(df), "shards": len(list_groups(run.shards)), "shards_written": sum(r["written"] for r in results),
        "stale_shards_removed": len(stale), "temporaries_removed": swept,
        "single_points": single, "fused_points": int(df["n_fused"].sum()), "shard_bytes": nbytes,
        "bytes_per_single_point": nbytes / max(single, 1),
        "median_points_per_hard_instance_single": float(np.median(inst_single)) if inst_single.size else 0.0,
        "median_points_per_hard_instance_fused": float(np.median(inst_fused)) if inst_fused.size else 0.0,
        "hard_instances": int(inst_single.size),
        "manifest_fingerprint": df.attrs.get("content_fingerprint"),
        **({f"hard_instance_{k}": v for k, v in occupancy_gain(run.root, voxel_size, jobs=jobs).items()
            if k != "hard_instances"} if voxel_size else {}),
    }
