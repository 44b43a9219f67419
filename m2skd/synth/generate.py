"""Write simulated sequences in the SemanticKITTI layout and summarise what was written.

Every sequence gets its own street from (seed, sequence name) and every scan its own noise
stream from (seed, sequence name, frame), so the output is byte-identical for a seed whatever
the number of parallel jobs.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import dataset_stats as ds
from .. import semantickitti as sk
from .. import storage
from ..atomic import write_bytes_atomic
from ..dataset_spec import DatasetSpec, load_spec
from ..dataset_stats import ScanInstances, label_stats
from .lidar import simulate_scan
from .scene import Scene, SynthConfig, SynthConfigError, build_scene

#: Velodyne -> left camera of KITTI sequence 00, so poses.txt is in a realistic camera frame.
KITTI_TR = np.array([
    [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
    [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
    [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
    [0.0, 0.0, 0.0, 1.0],
])
def sequence_key(name: str) -> int:
    return zlib.crc32(name.encode())


def scene_for(sequence: str, frames: int, seed: int = 0, config: SynthConfig | None = None) -> Scene:
    """The street of one sequence (what generate_dataset simulates), e.g. for tests."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, sequence_key(sequence), 0]))
    return build_scene(config or SynthConfig(), rng, frames)


@dataclass
class FrameStats:
    sequence: str
    n_points: int
    raw_counts: np.ndarray        # points per raw id (bincount)
    hard: ScanInstances           # hard-class instances: class, points, centroid range
    instance_ids: np.ndarray      # thing instances seen in the scan
    instance_raw: np.ndarray      # their raw ids
    seconds: float                # simulation time, without writing


def generate_dataset(out_dir, sequences=("00",), frames: int = 20, seed: int = 0, config: SynthConfig | None = None,
                     jobs: int = 1, progress: Callable[[int], None] | None = None, *,
                     spec: DatasetSpec | None = None) -> dict:
    """Simulate `frames` scans for each sequence under out_dir/sequences/NN and return summary stats.

    Sequences of the spec's test split are written without labels, as in SemanticKITTI.
    `progress(n)` is called with the number of scans just finished (1 per scan).
    Existing files of a sequence are overwritten; scans beyond `frames` left from an earlier
    run are removed so the sequence stays consistent with its poses.
    """
    config = config or SynthConfig()
    spec = spec or load_spec()
    if frames < 1:
        raise SynthConfigError("frames must be at least 1")
    sequences = [str(s) for s in sequences]
    bad = [s for s in sequences if not s.isalnum()]
    if bad or not sequences or len(set(sequences)) != len(sequences):
        raise SynthConfigError(f"sequence names must be distinct and alphanumeric (like 00, 08), got {sequences}")
    out_dir = storage.path(out_dir)  # a local folder or an fsspec URL
    per_sequence, all_stats = {}, []
    for name in sequences:
        labelled = spec.split_of(name) != "test"
        stats = write_sequence(out_dir / "sequences" / name, name, frames, seed, config, labelled, jobs, progress, spec)
        per_sequence[name] = {"split": spec.split_of(name), "frames": frames, "labelled": labelled}
        all_stats += stats
    return summarize(all_stats, per_sequence, spec)


def write_sequence(seq_dir: Path, name: str, frames: int, seed: int, config: SynthConfig, labelled: bool,
                   jobs: int, progress, spec: DatasetSpec) -> list[FrameStats]:
    scene = scene_for(name, frames, seed, config)
    _remove_stale(seq_dir, frames, labelled)
    tasks = range(frames)
    if jobs == 1:
        stream = (write_frame(scene, seq_dir, name, i, seed, labelled, spec) for i in tasks)
    else:
        from joblib import Parallel, delayed

        stream = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(write_frame)(scene, seq_dir, name, i, seed, labelled, spec) for i in tasks)
    stats = []
    for frame_stats in stream:
        stats.append(frame_stats)
        if progress is not None:
            progress(1)
    tr = calibration()
    sk.write_calib(seq_dir / "calib.txt", tr)
    sk.write_poses(seq_dir / "poses.txt", scene.lidar_poses(), tr)
    write_bytes_atomic(seq_dir / "times.txt", "".join(f"{t:.6e}\n" for t in scene.frame_times).encode())
    return stats


def calibration() -> np.ndarray:
    """KITTI's Tr rounded as calib.txt stores it, so written poses round-trip exactly."""
    tr = np.eye(4)
    tr[:3] = np.array([float(f"{v:.12e}") for v in KITTI_TR[:3].ravel()]).reshape(3, 4)
    return tr


def _remove_stale(seq_dir: Path, frames: int, labelled: bool) -> None:
    """Drop scans/labels of an earlier, longer run, and labels in an unlabelled split."""
    for sub, ext in (("velodyne", ".bin"), ("labels", ".label")):
        folder = seq_dir / sub
        if not folder.is_dir():
            continue
        for path in folder.glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]{ext}"):
            if int(path.stem) >= frames or (sub == "labels" and not labelled):
                path.unlink()
        if sub == "labels" and not labelled and not any(folder.iterdir()):
            folder.rmdir()


def write_frame(scene: Scene, seq_dir: Path, name: str, frame: int, seed: int, labelled: bool,
                spec: DatasetSpec) -> FrameStats:
    rng = np.random.default_rng(np.random.SeedSequence([seed, sequence_key(name), 1, frame]))
    start = time.perf_counter()
    scan = simulate_scan(scene, frame, rng)
    seconds = time.perf_counter() - start
    sk.write_scan(seq_dir / "velodyne" / f"{frame:06d}.bin", scan.points)
    if labelled:
        sk.write_label(seq_dir / "labels" / f"{frame:06d}.label", scan.raw, scan.instance)
    return frame_stats(name, scan, seconds, spec)


def frame_stats(sequence: str, scan, seconds: float, spec: DatasetSpec) -> FrameStats:
    raw_counts, hard = label_stats(scan.points[:, :3], scan.raw, scan.instance, spec)
    things = scan.instance > 0
    ids, first = np.unique(scan.instance[things], return_index=True)
    return FrameStats(sequence=sequence, n_points=len(scan.points), raw_counts=raw_counts, hard=hard,
                      instance_ids=ids, instance_raw=scan.raw[things][first], seconds=seconds)


def summarize(stats: list[FrameStats], per_sequence: dict, spec: DatasetSpec) -> dict:
    """Scalars at the top level (what a CLI prints), details in nested dicts: the class shares
    and hard-instance histograms of `m2skd stats`, over every labelled scan written."""
    n_points = np.array([s.n_points for s in stats])
    labelled = [s for s in stats if per_sequence[s.sequence]["labelled"]]
    figures = ds.combine([(s.sequence, s.raw_counts, s.hard) for s in labelled], spec)
    shares = ds.share_rows(figures, spec)
    hard_share = shares[-1]
    instances = ds.instance_histograms(figures, spec)
    return {
        "sequences": per_sequence,
        "scans": len(stats),
        "points_per_scan_mean": float(n_points.mean()),
        "points_per_scan_min": int(n_points.min()),
        "points_per_scan_max": int(n_points.max()),
        "seconds_per_scan": float(np.mean([s.seconds for s in stats])),
        "hard_class_share": hard_share["share"],
        "hard_class_share_vs_semantickitti": hard_share["ratio"],
        f"hard_instances_with_{ds.MEASURABLE_POINTS}+_points": sum(
            h[f"with_{ds.MEASURABLE_POINTS}+_points"] for h in instances.values()),
        "shares": shares,
        "hard_instances": instances,
        "instances": _instances_per_class(stats, spec),
    }


def _instances_per_class(stats: list[FrameStats], spec: DatasetSpec) -> dict:
    """Distinct instances seen per raw class (ids are unique within a sequence)."""
    seen: dict[str, set] = {}
    for s in stats:
        for inst, raw in zip(s.instance_ids.tolist(), s.instance_raw.tolist()):
            seen.setdefault(spec.labels.get(raw, str(raw)), set()).add((s.sequence, inst))
    return {label: len(ids) for label, ids in sorted(seen.items())}
