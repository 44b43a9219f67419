"""Spinning-LiDAR simulation: vectorised ray casting with occlusion into a `Scene`.

Rays form a (beams x azimuth_steps) grid fixed in the sensor frame. The ground is hit
analytically for every ray at once; objects are tested only against the block of rows and
columns their bounding sphere can reach (a per-object loop over a few hundred objects, each
calling numpy on a small block), and every ray keeps its nearest hit.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .scene import CURB_HEIGHT, PARKING_OUTER, GROUND_IDS, SIDEWALK, Scene, SynthConfig

_SIDEWALK_GID = GROUND_IDS.index(SIDEWALK)


@dataclass(frozen=True)
class RayGrid:
    """Unit ray directions in the sensor frame, row = beam (top first), column = azimuth."""

    elevation: np.ndarray  # (H,) radians, descending
    azimuth: np.ndarray    # (W,) radians, ascending from -pi
    dirs: np.ndarray       # (H, W, 3)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dirs.shape[:2]


#: Like the HDL-64E, the upper half of the beams covers the top 38.5 % of the field (+2 to
#: -8.33 degrees, finer), the lower half the rest: more returns from far structures.
UPPER_BLOCK_FRACTION = 0.385


def beam_elevations(beams: int, fov_up: float, fov_down: float) -> np.ndarray:
    """Elevation (degrees, descending) of each beam."""
    n_upper = beams // 2
    split = fov_up + UPPER_BLOCK_FRACTION * (fov_down - fov_up)
    upper = np.linspace(fov_up, split, n_upper)
    lower = np.linspace(split, fov_down, beams - n_upper + 1)[1:]
    return np.concatenate([upper, lower])


@lru_cache(maxsize=4)
def ray_grid(beams: int, azimuth_steps: int, fov_up: float, fov_down: float) -> RayGrid:
    elevation = np.radians(beam_elevations(beams, fov_up, fov_down))
    azimuth = -np.pi + (np.arange(azimuth_steps) + 0.5) * (2 * np.pi / azimuth_steps)
    cos_el = np.cos(elevation)[:, None]
    dirs = np.stack(np.broadcast_arrays(cos_el * np.cos(azimuth), cos_el * np.sin(azimuth),
                                        np.sin(elevation)[:, None]), axis=-1)
    dirs.setflags(write=False)
    return RayGrid(elevation, azimuth, dirs)


def grid_for(config: SynthConfig) -> RayGrid:
    return ray_grid(config.beams, config.azimuth_steps, config.fov_up, config.fov_down)


@dataclass
class Scan:
    points: np.ndarray    # (N, 4) float32 x, y, z, remission in the sensor frame
    raw: np.ndarray       # (N,) uint32 raw semantic id
    instance: np.ndarray  # (N,) uint32 instance id (0 for stuff)


def simulate_scan(scene: Scene, frame: int, rng: np.random.Generator) -> Scan:
    """One revolution at frame `frame`: nearest hit per ray, then noise, dropout and remission."""
    cfg = scene.config
    grid = grid_for(cfg)
    pose = scene.sensor_pose(frame)
    origin, rotation = pose[:3, 3], pose[:3, :3]
    dirs_scene = rotate(grid.dirs, rotation)
    best_t, best_gid = ground_hits(scene, origin, dirs_scene)
    positions, headings = scene.object_state(float(scene.frame_times[frame]))
    cast_objects(scene, positions, headings, origin, rotation, grid, dirs_scene, best_t, best_gid)
    return make_scan(scene, grid, best_t, best_gid, rng)


def rotate(vectors: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """rotation @ v for (..., 3) vectors, elementwise rather than BLAS, so the result does not
    depend on the thread count (byte-identical output for a seed)."""
    return (vectors[..., 0:1] * rotation[:, 0] + vectors[..., 1:2] * rotation[:, 1]
            + vectors[..., 2:3] * rotation[:, 2])


# --- ground -------------------------------------------------------------------------------------

def ground_hits(scene: Scene, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ground hit per ray: the raised level (|y| >= curb line), the road level inside
    it, or else the vertical curb face between them. Upward rays get t = inf."""
    dz = dirs[..., 2]
    down = dz < -1e-9
    t = np.full(dz.shape, np.inf)
    gid = np.zeros(dz.shape, dtype=np.int64)
    d = dirs[down]
    t_high = (CURB_HEIGHT - origin[2]) / d[:, 2]
    t_low = (0.0 - origin[2]) / d[:, 2]
    y_high = origin[1] + t_high * d[:, 1]
    y_low = origin[1] + t_low * d[:, 1]
    on_high = np.abs(y_high) >= PARKING_OUTER
    on_low = ~on_high & (np.abs(y_low) < PARKING_OUTER)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_curb = (np.sign(y_low) * PARKING_OUTER - origin[1]) / d[:, 1]
    t_hit = np.where(on_high, t_high, np.where(on_low, t_low, t_curb))
    hit_xy = origin[:2] + t_hit[:, None] * d[:, :2]
    hit_gid = scene.ground.ground_gid(hit_xy[:, 0], hit_xy[:, 1])
    hit_gid[~on_high & ~on_low] = _SIDEWALK_GID  # the curb face belongs to the sidewalk
    t[down] = t_hit
    gid[down] = hit_gid
    return t, gid


# --- objects ------------------------------------------------------------------------------------

def cast_objects(scene, positions, headings, origin, rotation, grid: RayGrid, dirs_scene, best_t, best_gid) -> None:
    """Update best_t / best_gid in place with every object's nearest hits."""
    packed = scene.packed
    if not len(positions):
        return
    centers = positions + _rotate_xy(packed.bound_center, headings)
    centers_sensor = (centers - origin) @ rotation
    blocks = _angular_blocks(centers_sensor, packed.bound_radius, grid, scene.config.max_range)
    world = _world_primitives(packed, positions, headings)
    for obj, r0, r1, c0, c1 in blocks:
        block_dirs = dirs_scene[r0:r1, c0:c1]
        t, gid = _object_hits(packed, world, obj, origin, block_dirs.reshape(-1, 3))
        t = t.reshape(block_dirs.shape[:2])
        view_t, view_gid = best_t[r0:r1, c0:c1], best_gid[r0:r1, c0:c1]
        closer = t < view_t
        view_t[closer] = t[closer]
        view_gid[closer] = gid.reshape(t.shape)[closer]


def _rotate_xy(local: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    out = local.copy()
    out[:, 0] = c * local[:, 0] - s * local[:, 1]
    out[:, 1] = s * local[:, 0] + c * local[:, 1]
    return out


def _angular_blocks(centers, radii, grid: RayGrid, max_range: float) -> list[tuple[int, int, int, int, int]]:
    """(object, row0, row1, col0, col1) ray blocks that can hit each object's bounding sphere.

    A ray hits the sphere only if its azimuth is within asin(r / rho) of the centre's (rho:
    horizontal distance) and its elevation within asin(r / dist); a span across the -pi/pi
    seam is split in two blocks.
    """
    n_rows, n_cols = grid.shape
    dist = np.linalg.norm(centers, axis=1)
    rho = np.hypot(centers[:, 0], centers[:, 1])
    reachable = dist - radii < max_range
    az = np.arctan2(centers[:, 1], centers[:, 0])
    el = np.arctan2(centers[:, 2], rho)
    with np.errstate(divide="ignore", invalid="ignore"):
        half_az = np.where(rho > radii, np.arcsin(np.clip(radii / rho, 0, 1)), np.pi)
        half_el = np.where(dist > radii, np.arcsin(np.clip(radii / dist, 0, 1)), np.pi)
    col_step = 2 * np.pi / n_cols
    col_lo = np.floor((az - half_az + np.pi) / col_step).astype(np.int64)
    col_hi = np.floor((az + half_az + np.pi) / col_step).astype(np.int64) + 1
    descending = -grid.elevation  # ascending, for searchsorted
    row_lo = np.searchsorted(descending, -(el + half_el), side="left")
    row_hi = np.searchsorted(descending, -(el - half_el), side="right")
    full = half_az >= np.pi / 2
    blocks = []
    for o in np.flatnonzero(reachable & (row_hi > row_lo)):
        r0, r1 = int(row_lo[o]), int(row_hi[o])
        lo, hi = int(col_lo[o]), int(col_hi[o])
        if full[o] or hi - lo >= n_cols:
            blocks.append((o, r0, r1, 0, n_cols))
        elif lo < 0:
            blocks += [(o, r0, r1, 0, hi), (o, r0, r1, lo + n_cols, n_cols)]
        elif hi > n_cols:
            blocks += [(o, r0, r1, lo, n_cols), (o, r0, r1, 0, hi - n_cols)]
        else:
            blocks.append((o, r0, r1, lo, hi))
    return blocks


def _world_primitives(packed, positions, headings) -> dict:
    """Primitive parameters in the scene frame at this time (all objects at once)."""
    world = {}
    box, ell, cyl = packed.box, packed.ellipsoid, packed.cylinder
    owner = _owners(packed.start["box"])
    world["box_center"] = positions[owner] + _rotate_xy(box["center"], headings[owner])
    world["box_yaw"] = box["yaw"] + headings[owner]
    owner = _owners(packed.start["ellipsoid"])
    world["ell_center"] = positions[owner] + _rotate_xy(ell["center"], headings[owner])
    world["ell_yaw"] = ell["yaw"] + headings[owner]
    owner = _owners(packed.start["cylinder"])
    xy = np.column_stack([cyl["xy"], np.zeros(len(owner))]) if len(owner) else np.zeros((0, 3))
    world["cyl_xy"] = (positions[owner] + _rotate_xy(xy, headings[owner]))[:, :2]
    world["cyl_z"] = np.column_stack([cyl["z0"], cyl["z1"]]) + positions[owner][:, 2:3]
    return world


def _owners(start: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(start) - 1), np.diff(start))


def _object_hits(packed, world, obj: int, origin, dirs) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit (t, primitive gid) of one object's primitives for each ray (inf: miss)."""
    ts, gids = [], []
    a, b = packed.start["box"][obj:obj + 2]
    if b > a:
        ts.append(intersect_boxes(origin, dirs, world["box_center"][a:b], packed.box["half"][a:b],
                                  world["box_yaw"][a:b]))
        gids.append(packed.box["gid"][a:b])
    a, b = packed.start["cylinder"][obj:obj + 2]
    if b > a:
        ts.append(intersect_cylinders(origin, dirs, world["cyl_xy"][a:b], world["cyl_z"][a:b],
                                      packed.cylinder["radius"][a:b]))
        gids.append(packed.cylinder["gid"][a:b])
    a, b = packed.start["ellipsoid"][obj:obj + 2]
    if b > a:
        ts.append(intersect_ellipsoids(origin, dirs, world["ell_center"][a:b], packed.ellipsoid["semi"][a:b],
                                       world["ell_yaw"][a:b]))
        gids.append(packed.ellipsoid["gid"][a:b])
    t_all = np.concatenate(ts) if len(ts) > 1 else ts[0]
    gid_all = np.concatenate(gids) if len(gids) > 1 else gids[0]
    if len(t_all) == 1:
        return t_all[0], np.full(dirs.shape[0], gid_all[0])
    nearest = np.argmin(t_all, axis=0)
    return np.take_along_axis(t_all, nearest[None], axis=0)[0], gid_all[nearest]


# --- ray / primitive intersection: origin (3,), dirs (n, 3), k primitives -> t (k, n) ---------

def _to_local(origin, dirs, centers, yaws):
    """Origin (k, 3) and directions (3 arrays broadcasting to (k, n)) in each primitive's frame."""
    c, s = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    rel = origin - centers
    o_local = np.column_stack([c[:, 0] * rel[:, 0] + s[:, 0] * rel[:, 1],
                               -s[:, 0] * rel[:, 0] + c[:, 0] * rel[:, 1], rel[:, 2]])
    dx, dy, dz = dirs[:, 0][None], dirs[:, 1][None], dirs[:, 2][None]
    return o_local, (c * dx + s * dy, -s * dx + c * dy, dz)


def intersect_boxes(origin, dirs, centers, halves, yaws) -> np.ndarray:
    """Slab test against oriented boxes (yaw about z)."""
    o_local, d_local = _to_local(origin, dirs, centers, yaws)
    t_near = np.full((len(centers), len(dirs)), -np.inf)
    t_far = np.full((len(centers), len(dirs)), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            inv = 1.0 / d_local[axis]
            o = o_local[:, axis:axis + 1]
            h = halves[:, axis:axis + 1]
            t1 = (-h - o) * inv
            t2 = (h - o) * inv
            np.maximum(t_near, np.minimum(t1, t2), out=t_near)
            np.minimum(t_far, np.maximum(t1, t2), out=t_far)
    hit = (t_far >= t_near) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def intersect_cylinders(origin, dirs, xy, z_range, radii) -> np.ndarray:
    """Vertical finite cylinders: the side, or the top cap seen from above."""
    ox = (origin[0] - xy[:, 0])[:, None]
    oy = (origin[1] - xy[:, 1])[:, None]
    dx, dy, dz = dirs[:, 0][None], dirs[:, 1][None], dirs[:, 2][None]
    r2 = (radii ** 2)[:, None]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy  # half of the usual b
    c = ox * ox + oy * oy - r2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
        z = origin[2] + t_side * dz
        side_ok = (disc >= 0) & (t_side > 0) & (z >= z_range[:, :1]) & (z <= z_range[:, 1:])
        t_top = (z_range[:, 1:] - origin[2]) / dz
        px, py = ox + t_top * dx, oy + t_top * dy
        top_ok = (t_top > 0) & (px * px + py * py <= r2)
    return np.minimum(np.where(side_ok, t_side, np.inf), np.where(top_ok, t_top, np.inf))


def intersect_ellipsoids(origin, dirs, centers, semis, yaws) -> np.ndarray:
    """Ellipsoids (yaw about z): scaled to the unit sphere, then a quadratic."""
    o_local, d_local = _to_local(origin, dirs, centers, yaws)
    o_unit = o_local / semis
    d_unit = [d_local[axis] / semis[:, axis:axis + 1] for axis in range(3)]
    a = d_unit[0] ** 2 + d_unit[1] ** 2 + d_unit[2] ** 2
    b = o_unit[:, :1] * d_unit[0] + o_unit[:, 1:2] * d_unit[1] + o_unit[:, 2:] * d_unit[2]
    c = (o_unit ** 2).sum(axis=1, keepdims=True) - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


# --- from hits to points --------------------------------------------------------------------

def make_scan(scene: Scene, grid: RayGrid, best_t, best_gid, rng: np.random.Generator) -> Scan:
    """Points in the sensor frame (row-major over beams, then azimuth) with range noise,
    dropout of random rays, and remission = albedo x range falloff + noise."""
    cfg, packed = scene.config, scene.packed
    keep = (best_t <= cfg.max_range) & (rng.random(best_t.shape) >= cfg.dropout)
    t = best_t[keep]
    gid = best_gid[keep]
    noise_std = np.hypot(cfg.range_noise_std, packed.roughness[gid])
    t_measured = np.maximum(t + rng.standard_normal(t.size) * noise_std, 0.05)
    xyz = grid.dirs[keep] * t_measured[:, None]
    remission = packed.albedo[gid] * np.exp(-t / (1.5 * cfg.max_range))
    remission = np.clip(remission + rng.standard_normal(t.size) * cfg.remission_noise_std, 0.0, 1.0)
    points = np.column_stack([xyz, remission]).astype(np.float32)
    return Scan(points, packed.raw[gid], packed.instance[gid])
