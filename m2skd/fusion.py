"""Multi-scan fusion of hard-class instances (docs/method.md, multi-scan fusion).

For scan t, the points of each hard-class instance present in t are taken from scans
t-1..t-k, brought into frame t with the poses, aligned to the instance in t (moving
instances: centroid offset; optional ICP refinement with a rejection test that falls back
to the initial alignment), and appended with their labels. Whether an instance moves is
decided over the whole window: a moving-* label in any of its scans, or its centroid (brought
into frame t by the poses, i.e. in the world) travelling further than `moving_threshold_m`
between any of its scans and scan t. Nothing else is fused in `hard`
mode; `all` fuses whole previous scans by pose (the ablation), `none` fuses nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FUSION_MODES = ("hard", "all", "none")
ALIGN_MODES = ("centroid", "icp")


@dataclass(frozen=True)
class FusionConfig:
    mode: str = "hard"
    k: int = 4
    align: str = "centroid"
    icp_iterations: int = 15
    icp_max_points: int = 400  # per instance and side: keeps ICP cost bounded
    icp_max_correction_m: float = 0.5  # larger ICP corrections are rejected as failures
    icp_max_rotation_deg: float = 20.0
    moving_threshold_m: float = 0.5  # world-frame centroid travel that marks an instance as moving

    def __post_init__(self):
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {self.mode!r} not in {FUSION_MODES}")
        if self.align not in ALIGN_MODES:
            raise ValueError(f"alignment {self.align!r} not in {ALIGN_MODES}")
        if self.k < 0:
            raise ValueError("k must be >= 0")
        if not self.moving_threshold_m > 0:
            raise ValueError("moving_threshold_m must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Frame:
    """One scan with what fusion needs. `train` and `instance` are None without labels."""

    points: np.ndarray  # (N, 4) float32
    raw_label: np.ndarray | None  # (N,) uint32
    train: np.ndarray | None  # (N,) uint8 training ids
    pose: np.ndarray  # (4, 4) LiDAR pose in the world

    @property
    def instance(self) -> np.ndarray:
        return (self.raw_label >> 16).astype(np.int64)

    def hard_instance_points(self, hard_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices, instance keys) of the points of hard-class instances, ascending. Computed
        once per frame: a frame serves as "previous" for k scans, and scanning all its points
        each time was most of fusion's cost."""
        cached = getattr(self, "_hard", None)
        if cached is None or cached[0] is not hard_mask:
            idx = np.flatnonzero(hard_mask.take(self.train))  # hard points are a few percent: the instance
            instance = self.raw_label[idx] >> 16  # ids are taken of those only
            keep = instance > 0
            idx, instance = idx[keep], instance[keep]
            cached = (hard_mask, idx, instance_keys(self.train[idx], instance))
            self._hard = cached
        return cached[1], cached[2]


@dataclass
class Fused:
    """Points appended to the single scan; `source` is k for points from scan t-k."""

    points: np.ndarray  # (M, 4) float32
    raw_label: np.ndarray  # (M,) uint32
    source: np.ndarray  # (M,) uint8
    instance_points_single: np.ndarray  # per hard instance of scan t: its points in t
    instance_points_fused: np.ndarray  # ... and in t plus what was fused
    icp_accepted: int = 0
    icp_rejected: int = 0


def instance_keys(train: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """One int64 per (class, instance): instance ids are only unique within a class."""
    return (train.astype(np.int64) << 32) | instance.astype(np.int64)


def _to_frame(points: np.ndarray, T: np.ndarray) -> np.ndarray:
    xyz = points[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    out = points.copy()
    out[:, :3] = xyz
    return out


def _empty(n_inst: int = 0) -> Fused:
    z = np.zeros(0, dtype=np.uint32)
    counts = np.zeros(n_inst, dtype=np.int64)
    return Fused(np.zeros((0, 4), np.float32), z, z.astype(np.uint8), counts, counts.copy())


def fuse(current: Frame, previous: list[tuple[int, Frame]], hard_mask: np.ndarray, moving_lut: np.ndarray, cfg: FusionConfig) -> Fused:
    """Points to append to `current` from `previous` [(k, frame_t_minus_k), ...]."""
    if cfg.mode == "none" or not previous:
        return _fuse_none(current, hard_mask)
    if cfg.mode == "all":
        return _fuse_all(current, previous, hard_mask)
    if current.raw_label is None:
        raise ValueError("hard-class fusion needs labels; use --fusion all or none for unlabelled sequences")
    return _fuse_hard(current, previous, hard_mask, moving_lut, cfg)


def _current_instances(current: Frame, hard_mask: np.ndarray):
    """(keys, inverse, counts, indices) of the current scan's hard-class instance points."""
    hard, point_keys = current.hard_instance_points(hard_mask)
    keys, inverse, counts = np.unique(point_keys, return_inverse=True, return_counts=True)
    return keys, inverse, counts, hard


def _fuse_none(current: Frame, hard_mask: np.ndarray) -> Fused:
    if current.raw_label is None:
        return _empty()
    keys, _, counts, _ = _current_instances(current, hard_mask)
    out = _empty(len(keys))
    out.instance_points_single = counts
    out.instance_points_fused = counts.copy()
    return out


def _fuse_all(current: Frame, previous, hard_mask) -> Fused:
    inv_cur = np.linalg.inv(current.pose)
    parts, labels, sources = [], [], []
    for k, frame in previous:
        parts.append(_to_frame(frame.points, inv_cur @ frame.pose))
        labels.append(frame.raw_label if frame.raw_label is not None else np.zeros(len(frame.points), np.uint32))
        sources.append(np.full(len(frame.points), k, np.uint8))
    fused = Fused(np.concatenate(parts), np.concatenate(labels), np.concatenate(sources), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if current.raw_label is not None:
        keys, _, counts, _ = _current_instances(current, hard_mask)
        fused.instance_points_single = counts
        fused.instance_points_fused = counts + _count_keys(keys, [(f.train, f.instance) for _, f in previous if f.raw_label is not None])
    return fused


def _count_keys(keys: np.ndarray, labelled: list) -> np.ndarray:
    total = np.zeros(len(keys), np.int64)
    for train, inst in labelled:
        k = instance_keys(train, inst)
        pos = np.searchsorted(keys, k).clip(0, max(len(keys) - 1, 0))
        hit = (keys[pos] == k) if len(keys) else np.zeros(len(k), bool)
        total += np.bincount(pos[hit], minlength=len(keys))
    return total


def _fuse_hard(current: Frame, previous, hard_mask, moving_lut, cfg: FusionConfig) -> Fused:
    keys, cur_inverse, cur_counts, cur_hard = _current_instances(current, hard_mask)
    if len(keys) == 0:
        return _empty()
    cur_xyz = current.points[cur_hard, :3].astype(np.float64)
    cur_centroid = np.stack([np.bincount(cur_inverse, cur_xyz[:, d], len(keys)) for d in range(3)], 1) / cur_counts[:, None]
    cur_sem = (current.raw_label[cur_hard] & 0xFFFF).astype(np.int64)
    moving_votes = np.bincount(cur_inverse, moving_lut[cur_sem].astype(np.float64), len(keys))

    inv_cur = np.linalg.inv(current.pose)
    pts, lab, src, grp = [], [], [], []
    for k, frame in previous:
        if frame.raw_label is None:
            continue
        idx, fk = frame.hard_instance_points(hard_mask)
        pos = np.searchsorted(keys, fk).clip(0, len(keys) - 1)
        sel = keys[pos] == fk
        if not sel.any():
            continue
        chosen = idx[sel]
        pts.append(_to_frame(frame.points[chosen], inv_cur @ frame.pose))
        lab.append(frame.raw_label[chosen])
        src.append(np.full(len(chosen), k, np.uint8))
        grp.append(pos[sel] * (cfg.k + 1) + k)  # group = (instance, source scan)
    if not pts:
        out = _empty(len(keys))
        out.instance_points_single = cur_counts
        out.instance_points_fused = cur_counts.copy()
        return out
    points, raw, source, group = np.concatenate(pts), np.concatenate(lab), np.concatenate(src), np.concatenate(grp)

    n_groups = len(keys) * (cfg.k + 1)
    g_count = np.bincount(group, minlength=n_groups)
    g_centroid = np.stack([np.bincount(group, points[:, d].astype(np.float64), n_groups) for d in range(3)], 1)
    g_centroid /= np.maximum(g_count, 1)[:, None]
    g_inst = np.arange(n_groups) // (cfg.k + 1)
    # moving over the window: a moving-* label in any scan, or the centroid travelling
    moving_votes = moving_votes + np.bincount(g_inst[group], moving_lut[(raw & 0xFFFF).astype(np.int64)].astype(np.float64), len(keys))
    travel = np.where(g_count > 0, np.linalg.norm(cur_centroid[g_inst] - g_centroid, axis=1), 0.0)
    moving = (moving_votes > 0) | (travel.reshape(len(keys), cfg.k + 1).max(1) > cfg.moving_threshold_m)
    offset = np.where(moving[g_inst][:, None], cur_centroid[g_inst] - g_centroid, 0.0)
    xyz = points[:, :3].astype(np.float64) + offset[group]

    accepted = rejected = 0
    if cfg.align == "icp":
        order = np.argsort(group, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(g_count)])
        cur_order = np.argsort(cur_inverse, kind="stable")
        cur_bounds = np.concatenate([[0], np.cumsum(cur_counts)])
        for g in np.flatnonzero(g_count >= 3):
            idx = order[bounds[g] : bounds[g + 1]]
            inst = g_inst[g]
            target = cur_xyz[cur_order[cur_bounds[inst] : cur_bounds[inst + 1]]]
            if len(target) < 3:
                continue
            T, ok = icp_refine(xyz[idx], target, cfg)
            if ok:
                xyz[idx] = xyz[idx] @ T[:3, :3].T + T[:3, 3]
                accepted += 1
            else:
                rejected += 1
    points = points.copy()
    points[:, :3] = xyz
    fused_counts = cur_counts + np.bincount(g_inst[group], minlength=len(keys))
    return Fused(points.astype(np.float32), raw, source, cur_counts, fused_counts, accepted, rejected)


def _subsample(xyz: np.ndarray, n: int) -> np.ndarray:
    if len(xyz) <= n:
        return xyz
    return xyz[np.linspace(0, len(xyz) - 1, n).astype(np.int64)]


def _nearest(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = (src * src).sum(1)[:, None] + (dst * dst).sum(1)[None, :] - 2.0 * src @ dst.T
    j = d2.argmin(1)
    return j, np.maximum(d2[np.arange(len(src)), j], 0.0)


def _kabsch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rigid transform minimising |R a + t - b|."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    R = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = cb - R @ ca
    return T


def icp_refine(source: np.ndarray, target: np.ndarray, cfg: FusionConfig) -> tuple[np.ndarray, bool]:
    """Point-to-point ICP; rejected (identity, False) if it does not reduce the residual or
    moves the instance implausibly far, so a bad registration never beats the centroid."""
    src = _subsample(source, cfg.icp_max_points)
    dst = _subsample(target, cfg.icp_max_points)
    _, d2 = _nearest(src, dst)
    initial = float(np.sqrt(d2.mean()))
    T = np.eye(4)
    moved = src
    for _ in range(cfg.icp_iterations):
        j, _ = _nearest(moved, dst)
        T = _kabsch(src, dst[j])
        moved = src @ T[:3, :3].T + T[:3, 3]
    _, d2 = _nearest(moved, dst)
    final = float(np.sqrt(d2.mean()))
    angle = np.degrees(np.arccos(np.clip((np.trace(T[:3, :3]) - 1) / 2, -1, 1)))
    shift = np.linalg.norm(moved.mean(0) - src.mean(0))
    ok = final < initial and angle <= cfg.icp_max_rotation_deg and shift <= cfg.icp_max_correction_m
    return (T, True) if ok else (np.eye(4), False)


def instance_occupancy(xyz: np.ndarray, keys: np.ndarray, n_single: int, voxel_size: float) -> dict[str, np.ndarray]:
    """Points and occupied voxels of each hard instance of a scan, single vs fused.

    Fusion teaches the teacher something only where fused points reach voxels the single scan
    leaves empty, so more points are not enough: this counts distinct voxels (floor(xyz / v),
    as training voxelises) per instance. xyz (N, 3) of the fused scan (the single scan's
    n_single points first, in its own frame); keys (N,) int, 0 outside hard-class instances,
    else one id per instance (e.g. instance_keys). Instances are those of the single scan;
    fused points of other keys are not counted. Returns arrays over the instances: key,
    points_single, points_fused, voxels_single, voxels_fused (fused counts include the single
    scan's)."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    uniq = np.unique(keys[:n_single][keys[:n_single] > 0])
    inside = np.flatnonzero(np.isin(keys, uniq) & (keys > 0))
    inst = np.searchsorted(uniq, keys[inside])
    single = inside < n_single
    vox = np.floor(np.asarray(xyz, np.float64)[inside, :3] / voxel_size).astype(np.int64)
    rows = np.column_stack([inst, vox])

    def counts(sel):
        occupied = np.unique(rows[sel], axis=0)
        return (np.bincount(inst[sel], minlength=len(uniq)), np.bincount(occupied[:, 0], minlength=len(uniq)))

    points_single, voxels_single = counts(single)
    points_fused, voxels_fused = counts(np.ones(len(inside), bool))
    return {"key": uniq, "points_single": points_single, "points_fused": points_fused,
            "voxels_single": voxels_single, "voxels_fused": voxels_fused}
