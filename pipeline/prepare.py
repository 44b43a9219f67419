"""`m2skd prepare`: read a SemanticKITTI-layout dataset, fuse hard-class instances from the k
previous scans, write Zarr shards (one per block of consecutive frames) and a Parquet manifest.

Resumable: a shard is written whole under a temporary name and renamed; a re-run skips shards
that are complete and were made with the same configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from m2skd import semantickitti as sk
from m2skd.dataset_spec import DatasetSpec, load_spec
from m2skd.errors import StaleInputError
from m2skd.fingerprint import fingerprint_bytes, fingerprint_json
from m2skd.fusion import Frame, FusionConfig, fuse
from m2skd.manifest import write_manifest
from m2skd.ragged import RaggedReader, dir_bytes, read_json, sweep_temporaries, write_json_atomic, write_ragged
from m2skd.rundir import RunDir

from .parallel import run_tasks


@dataclass(frozen=True)
class PrepareConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    frames_per_shard: int = 50
    dataset: str = "semantickitti"
    hard_classes: tuple[int, ...] | None = None  # None: the dataset description's set

    def to_dict(self) -> dict:
        return {**asdict(self), "fusion": self.fusion.to_dict()}

    def fingerprint(self) -> str:
        return fingerprint_json(self.to_dict())


@dataclass(frozen=True)
class ShardTask:
    data_root: str
    sequence: str
    split: str
    start: int
    stop: int
    path: str


def load_frame(seq: sk.Sequence, frame_name: str, pose: np.ndarray, labelled: bool, spec: DatasetSpec) -> tuple[Frame, str]:
    scan_path = seq.scan_path(frame_name)
    scan_bytes = sk.read_bytes(scan_path)
    points = sk.parse_scan(scan_bytes, scan_path)
    if not labelled:
        return Frame(points, None, None, pose), fingerprint_bytes(scan_bytes)
    label_path = seq.label_path(frame_name)
    label_bytes = sk.read_bytes(label_path)
    raw = sk.parse_label(label_bytes, label_path, len(points), spec.learning_lut)
    train = spec.learning_lut[raw & 0xFFFF]
    return Frame(points, raw, train, pose), fingerprint_bytes(scan_bytes, label_bytes)


def prepare_shard(task: ShardTask, cfg: PrepareConfig, spec: DatasetSpec) -> dict:
    """Fuse and write frames [start, stop) of one sequence; returns the shard's summary."""
    seq = sk.Sequence(Path(task.data_root), task.sequence)
    names = seq.frames
    poses = seq.poses()
    labelled = seq.has_labels
    fcfg = cfg.fusion if (labelled or cfg.fusion.mode != "hard") else FusionConfig(**{**cfg.fusion.to_dict(), "mode": "none"})
    k = fcfg.k if fcfg.mode != "none" else 0
    window: dict[int, Frame] = {}
    points, labels, sources, rows = [], [], [], []
    icp = [0, 0]
    row_start = 0
    for i in range(max(0, task.start - k), task.stop):
        frame, fp = load_frame(seq, names[i], poses[i], labelled, spec)
        if i >= task.start:
            previous = [(j, window[i - j]) for j in range(1, k + 1) if i - j in window]
            fused = fuse(frame, previous, spec.hard_mask, spec.moving_lut, fcfg)
            n_single, n_fused = len(frame.points), len(fused.points)
            single_label = frame.raw_label if labelled else np.zeros(n_single, np.uint32)
            points.append(np.concatenate([frame.points, fused.points]))
            labels.append(np.concatenate([single_label, fused.raw_label]))
            sources.append(np.concatenate([np.zeros(n_single, np.uint8), fused.source]))
            icp[0] += fused.icp_accepted
            icp[1] += fused.icp_rejected
            rows.append({
                "sequence": task.sequence, "frame": i, "frame_name": names[i], "split": task.split,
                "has_labels": labelled, "n_single": n_single, "n_fused": n_fused,
                "n_hard_instances": len(fused.instance_points_single),
                "shard": Path(task.path).relative_to(Path(task.path).parents[2]).as_posix(),  # shards/SEQ/NAME
                "shard_index": i - task.start, "row_start": row_start, "row_stop": row_start + n_single + n_fused,
                "fingerprint": fp,
                "hard_instance_points_single": fused.instance_points_single.tolist(),
                "hard_instance_points_fused": fused.instance_points_fused.tolist(),
            })
            row_start += n_single + n_fused
        window[i] = frame
        window.pop(i - k, None)
    attrs = {"sequence": task.sequence, "config_fingerprint": cfg.fingerprint(), "rows": rows, "icp_accepted": icp[0], "icp_rejected": icp[1]}
    nbytes = write_ragged(
        task.path,
        {"points": points, "label": labels, "source": sources},
        attrs,
        per_scan={"single_count": np.array([r["n_single"] for r in rows], np.int64)},
    )
    return {"path": task.path, "frames": len(rows), "bytes": nbytes}


def plan(data_root, run: RunDir, cfg: PrepareConfig, spec: DatasetSpec, splits=None, sequences=None) -> list[ShardTask]:
    tasks = []
    for name in sk.list_sequences(data_root):
        split = spec.split_of(name)
        if (splits and split not in splits) or (sequences and name not in sequences):
            continue
        n = len(sk.Sequence(Path(data_root), name).frames)
        for start in range(0, n, cfg.frames_per_shard):
            stop = min(n, start + cfg.frames_per_shard)
            path = run.shards / name / f"{start:06d}-{stop - 1:06d}.zarr"
            tasks.append(ShardTask(str(data_root), name, split, start, stop, str(path)))
    return tasks


def shard_is_done(path, cfg: PrepareConfig) -> bool:
    try:
        return RaggedReader(path).attrs.get("config_fingerprint") == cfg.fingerprint()
    except Exception:
        return False


def check_run_config(run: RunDir, record: dict, overwrite: bool) -> None:
    config_path = run.prepare / "config.json"
    if config_path.exists() and not overwrite:
        old = read_json(config_path)
        if old.get("config_fingerprint") != record["config_fingerprint"] or old.get("data_root") != record["data_root"]:
            raise StaleInputError(
                f"{config_path}: this run directory was prepared from {old.get('data_root')} with another configuration "
                f"({old.get('config')}); use a new run directory or --overwrite"
            )
    write_json_atomic(config_path, record)


def run_prepare(data_root, run_dir, cfg: PrepareConfig, jobs: int = 1, splits=None, sequences=None, overwrite=False, progress=None, dask_scheduler=None) -> dict:
    """Prepare every planned shard not already done, then (re)write the manifest."""
    spec = load_spec(cfg.dataset)
    if cfg.hard_classes is not None:
        spec = spec.with_hard_classes(cfg.hard_classes)
    cfg = PrepareConfig(cfg.fusion, cfg.frames_per_shard, cfg.dataset, spec.hard_classes)
    run = RunDir(run_dir)
    data_root = str(Path(data_root).resolve())
    record = {"config": cfg.to_dict(), "config_fingerprint": cfg.fingerprint(), "data_root": data_root}
    tasks = plan(data_root, run, cfg, spec, splits, sequences)
    if not tasks:
        raise StaleInputError(f"{data_root}: no sequences match splits={splits} sequences={sequences}")
    check_run_config(run, record, overwrite)
    swept = sweep_temporaries(run.shards) if run.shards.exists() else 0
    todo = [t for t in tasks if overwrite or not shard_is_done(t.path, cfg)]
    if progress:
        total = sum(t.stop - t.start for t in tasks)
        progress(total=total, done=total - sum(t.stop - t.start for t in todo))
    run_tasks(
        lambda t: prepare_shard(t, cfg, spec), todo, jobs,
        on_done=(lambda t, r: progress(advance=r["frames"])) if progress else None,
        dask_scheduler=dask_scheduler,
    )
    rows, nbytes = [], 0
    for t in tasks:
        reader = RaggedReader(t.path)
        rows.extend(reader.attrs["rows"])
        nbytes += dir_bytes(t.path)
    df = write_manifest(rows, run.manifest, {"stage": "prepare", **record})
    single = int(df["n_single"].sum())
    inst_single = np.concatenate([np.asarray(v, np.int64) for v in df["hard_instance_points_single"]] or [np.zeros(0, np.int64)])
    inst_fused = np.concatenate([np.asarray(v, np.int64) for v in df["hard_instance_points_fused"]] or [np.zeros(0, np.int64)])
    return {
        "scans": len(df), "shards": len(tasks), "shards_written": len(todo), "temporaries_removed": swept,
        "single_points": single, "fused_points": int(df["n_fused"].sum()), "shard_bytes": nbytes,
        "bytes_per_single_point": nbytes / max(single, 1),
        "median_points_per_hard_instance_single": float(np.median(inst_single)) if inst_single.size else 0.0,
        "median_points_per_hard_instance_fused": float(np.median(inst_fused)) if inst_fused.size else 0.0,
        "hard_instances": int(inst_single.size),
    }
