"""SemanticKITTI layout: scans, labels, poses and calibration, with validation.

Every reader raises `DataError` naming the file and the problem, so a bad file in a
19k-scan dataset is found from the message alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import storage
from .atomic import write_bytes_atomic
from .errors import DataError

SCAN_DTYPE = np.float32
POINT_BYTES = 16  # x, y, z, remission as float32


def read_bytes(path) -> bytes:
    path = str(path)
    if storage.is_url(path):
        return storage.read_bytes(path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None


def read_scan(path) -> np.ndarray:
    """N x 4 float32 (x, y, z, remission) from a velodyne .bin."""
    return parse_scan(read_bytes(path), path)


def parse_scan(data: bytes, path) -> np.ndarray:
    if len(data) % POINT_BYTES:
        raise DataError(path, f"size {len(data)} bytes is not a multiple of {POINT_BYTES} (float32 x, y, z, remission)")
    scan = np.frombuffer(data, dtype=SCAN_DTYPE).reshape(-1, 4)
    if not np.isfinite(scan).all():  # over the flat array: 40x faster than .all(axis=1) over rows of 4
        finite = np.isfinite(scan).all(axis=1)
        bad = int(np.flatnonzero(~finite)[0])
        raise DataError(path, f"{int((~finite).sum())} points have non-finite values (first at point {bad})")
    return scan


def read_label(path, n_points: int | None = None, learning_lut: np.ndarray | None = None) -> np.ndarray:
    """Raw uint32 labels (semantic = l & 0xFFFF, instance = l >> 16).

    With `n_points`, the count is checked; with `learning_lut` (from DatasetSpec), every
    semantic id must be a known raw id.
    """
    return parse_label(read_bytes(path), path, n_points, learning_lut)


def parse_label(data: bytes, path, n_points: int | None = None, learning_lut: np.ndarray | None = None) -> np.ndarray:
    if len(data) % 4:
        raise DataError(path, f"size {len(data)} bytes is not a multiple of 4 (uint32 per point)")
    label = np.frombuffer(data, dtype=np.uint32)
    if n_points is not None and label.size != n_points:
        raise DataError(path, f"has {label.size} labels but the scan has {n_points} points")
    if learning_lut is not None:
        training_ids(path, label, learning_lut)
    return label


def training_ids(path, label: np.ndarray, learning_lut: np.ndarray) -> np.ndarray:
    """The training id of every point of a raw label array, every semantic id checked known: one
    pass of the lookup table does both (an unknown id maps to 255)."""
    semantic = label & 0xFFFF
    if semantic.size and semantic.max() >= learning_lut.size:
        _raise_unknown_semantics(path, semantic, learning_lut)
    train = learning_lut.take(semantic)
    if semantic.size and train.max() == 255:
        _raise_unknown_semantics(path, semantic, learning_lut)
    return train


def _raise_unknown_semantics(path, semantic: np.ndarray, learning_lut: np.ndarray) -> None:
    """The one-line error naming the raw semantic ids the learning map lacks (the slow path of
    training_ids, taken only when some id is unknown)."""
    known = semantic < learning_lut.size
    known[known] = learning_lut[semantic[known]] != 255
    if not known.all():
        unknown = np.unique(semantic[~known])
        raise DataError(path, f"unknown raw semantic ids {unknown[:10].tolist()} (not in learning_map)")


def split_label(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (label & 0xFFFF).astype(np.uint16), (label >> 16).astype(np.uint32)


def _read_matrices(path, what: str) -> list[np.ndarray]:
    text = read_bytes(path).decode()
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            vals = np.array([float(v) for v in line.split()], dtype=np.float64)
        except ValueError:
            raise DataError(path, f"line {lineno}: not numbers") from None
        if vals.size != 12 or not np.isfinite(vals).all():
            raise DataError(path, f"line {lineno}: expected 12 finite numbers (a row-major 3x4 {what}), got {vals.size}")
        m = np.eye(4)
        m[:3, :4] = vals.reshape(3, 4)
        rows.append(m)
    return rows


def read_calib(path) -> np.ndarray:
    """4x4 `Tr` (velodyne -> left camera) from calib.txt."""
    text = read_bytes(path).decode()
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "Tr":
            vals = np.array(rest.split(), dtype=np.float64)
            if vals.size != 12 or not np.isfinite(vals).all():
                raise DataError(path, f"Tr: expected 12 finite numbers, got {vals.size}")
            tr = np.eye(4)
            tr[:3, :4] = vals.reshape(3, 4)
            return tr
    raise DataError(path, "no 'Tr:' line (velodyne to camera transform)")


def read_poses(poses_path, calib_path, n_scans: int | None = None) -> np.ndarray:
    """S x 4 x 4 LiDAR-frame poses: T_i = inv(Tr) @ P_i @ Tr."""
    mats = _read_matrices(poses_path, "pose")
    if n_scans is not None and len(mats) < n_scans:
        raise DataError(poses_path, f"has {len(mats)} poses but the highest frame number needs {n_scans} (pose line i is frame i)")
    cam = np.stack(mats) if mats else np.zeros((0, 4, 4))
    tr = read_calib(calib_path)
    tr_inv = np.linalg.inv(tr)
    return tr_inv @ cam @ tr


def relative_pose(poses: np.ndarray, i: int, j: int) -> np.ndarray:
    """Transform taking points of frame j into frame i."""
    return np.linalg.inv(poses[i]) @ poses[j]


def transform(points_xyz: np.ndarray, T: np.ndarray) -> np.ndarray:
    return points_xyz @ T[:3, :3].T.astype(points_xyz.dtype) + T[:3, 3].astype(points_xyz.dtype)


@dataclass(frozen=True)
class Sequence:
    """One sequence directory of a SemanticKITTI-layout dataset (root: a path or fsspec URL)."""

    root: Path
    name: str

    def __post_init__(self):
        object.__setattr__(self, "root", storage.path(self.root))

    @property
    def path(self) -> Path:
        return self.root / "sequences" / self.name

    @property
    def frames(self) -> list[str]:
        """File stems of the scans, ordered by frame number."""
        return [name for _, name in self.numbered_frames()]

    def numbered_frames(self) -> list[tuple[int, str]]:
        """(frame number, file stem) of every scan, by number: a frame is its file name's
        number, never its position in a listing, so a missing file shifts nothing."""
        vel = self.path / "velodyne"
        if not vel.is_dir():
            raise DataError(vel, "missing velodyne directory")
        out = []
        for p in vel.glob("*.bin"):
            if not p.stem.isdigit():
                raise DataError(p, "scan file name is not a frame number (expected e.g. 000123.bin)")
            out.append((int(p.stem), p.stem))
        out.sort()
        dupes = [name for (n, name), (m, _) in zip(out[1:], out[:-1]) if n == m]
        if dupes:
            raise DataError(vel / f"{dupes[0]}.bin", "two scan files share one frame number")
        return out

    @property
    def has_labels(self) -> bool:
        return (self.path / "labels").is_dir()

    def scan_path(self, frame: str) -> Path:
        return self.path / "velodyne" / f"{frame}.bin"

    def label_path(self, frame: str) -> Path:
        return self.path / "labels" / f"{frame}.label"

    def poses(self, n_scans: int | None = None) -> np.ndarray:
        """LiDAR poses indexed by frame number (row i of poses.txt is frame i); at least `n_scans`
        of them (default: the last scan's number + 1, from a listing of the scans)."""
        if n_scans is None:
            numbers = self.numbered_frames()
            n_scans = numbers[-1][0] + 1 if numbers else 0
        return read_poses(self.path / "poses.txt", self.path / "calib.txt", n_scans=n_scans)


def list_sequences(root) -> list[str]:
    seq_dir = storage.path(root) / "sequences"
    if not seq_dir.is_dir():
        raise DataError(seq_dir, "not found: expected a SemanticKITTI layout (ROOT/sequences/NN/velodyne/*.bin)")
    return sorted(p.name for p in seq_dir.iterdir() if (p / "velodyne").is_dir())


# --- writers (synthetic data, predictions) -------------------------------------------------

def write_scan(path, scan: np.ndarray) -> None:
    write_bytes_atomic(path, np.ascontiguousarray(scan, dtype=np.float32).tobytes())


def write_label(path, semantic: np.ndarray, instance: np.ndarray | None = None) -> None:
    label = semantic.astype(np.uint32) & 0xFFFF
    if instance is not None:
        label |= instance.astype(np.uint32) << 16
    write_bytes_atomic(path, label.tobytes())


def format_matrices(mats: np.ndarray) -> str:
    return "".join(" ".join(f"{v:.9e}" for v in m[:3, :4].ravel()) + "\n" for m in mats)


def write_poses(path, lidar_poses: np.ndarray, tr: np.ndarray) -> None:
    """Write camera-frame poses P_i = Tr @ T_i @ inv(Tr) so readers recover T_i."""
    cam = tr @ lidar_poses @ np.linalg.inv(tr)
    write_bytes_atomic(path, format_matrices(cam).encode())


def write_calib(path, tr: np.ndarray) -> None:
    p = np.eye(4)[:3].ravel()
    lines = [f"P{i}: " + " ".join(f"{v:.12e}" for v in p) for i in range(4)]
    lines.append("Tr: " + " ".join(f"{v:.12e}" for v in tr[:3, :4].ravel()))
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
