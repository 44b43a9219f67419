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

from .scene import CURB_HEIGHT, GROUND_IDS, OUTLIER_GID, PARKING_OUTER, SIDEWALK, Scene, SynthConfig

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
    # height range relative to the sensor, and the most the sensor's pitch and roll tilt a ray
    z_span = np.column_stack([positions[:, 2] + packed.bound_z[:, 0] - origin[2] - 0.01,
                              positions[:, 2] + packed.bound_z[:, 1] - origin[2] + 0.01])
    tilt = np.radians(2.0 * scene.config.tilt_deg + 0.1)
    blocks = _angular_blocks(centers_sensor, packed.bound_radius, grid, scene.config.max_range, z_span, tilt)
    world = _world_primitives(packed, positions, headings)
    # an object of several parts is first tested as its oriented bounding box, a little enlarged:
    # rays that miss the box miss every part, so only the others are cast against the parts
    box_center = centers  # the bounding box shares the bounding sphere's centre
    box_half = packed.bound_half + BOX_MARGIN
    parts = packed.part_count
    for obj, r0, r1, c0, c1 in blocks:
        block_dirs = dirs_scene[r0:r1, c0:c1]
        shape = block_dirs.shape[:2]
        dirs = block_dirs.reshape(-1, 3)
        view_t, view_gid = best_t[r0:r1, c0:c1].reshape(-1), best_gid[r0:r1, c0:c1].reshape(-1)
        if parts[obj] >= PREFILTER_PARTS and not _inside_box(origin, box_center[obj], box_half[obj], headings[obj]):
            through = np.flatnonzero(np.isfinite(intersect_boxes(origin, dirs, box_center[obj:obj + 1],
                                                                 box_half[obj:obj + 1], headings[obj:obj + 1])[0]))
            if not through.size:
                continue
            t, gid = _object_hits(packed, world, obj, origin, dirs[through])
            closer = t < view_t[through]
            view_t[through[closer]] = t[closer]
            view_gid[through[closer]] = gid[closer]
        else:
            t, gid = _object_hits(packed, world, obj, origin, dirs)
            closer = t < view_t
            view_t[closer] = t[closer]
            view_gid[closer] = gid[closer]
        best_t[r0:r1, c0:c1] = view_t.reshape(shape)
        best_gid[r0:r1, c0:c1] = view_gid.reshape(shape)


#: Objects of at least this many parts are tested against their bounding box first.
PREFILTER_PARTS = 3
#: Enlargement (m) of that box, far beyond rounding, so no ray that reaches a part misses it.
BOX_MARGIN = 0.01


def _inside_box(origin, center, half, yaw) -> bool:
    c, s = np.cos(yaw), np.sin(yaw)
    rel = origin - center
    local = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
    return bool(np.all(np.abs(local) <= half))


def _rotate_xy(local: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    out = local.copy()
    out[:, 0] = c * local[:, 0] - s * local[:, 1]
    out[:, 1] = s * local[:, 0] + c * local[:, 1]
    return out


def _angular_blocks(centers, radii, grid: RayGrid, max_range: float, z_span=None,
                    tilt: float = 0.0) -> list[tuple[int, int, int, int, int]]:
    """(object, row0, row1, col0, col1) ray blocks that can hit each object's bounding sphere.

    A ray hits the sphere only if its azimuth is within asin(r / rho) of the centre's (rho:
    horizontal distance) and its elevation within asin(r / dist); a span across the -pi/pi
    seam is split in two blocks. With `z_span` (n, 2), the height range of each object relative
    to the sensor in the level scene frame, the elevations are narrowed further to those that
    reach that height range within the sphere's horizontal distances, widened by `tilt` (rad),
    the most the sensor's attitude turns a ray (long, low things such as fences and hedges).
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
    if z_span is not None:
        rho_near = np.maximum(rho - radii, 0.1)
        rho_far = rho + radii
        z_lo, z_hi = z_span[:, 0], z_span[:, 1]
        el_lo = np.arctan2(z_lo, np.where(z_lo < 0, rho_near, rho_far)) - tilt
        el_hi = np.arctan2(z_hi, np.where(z_hi > 0, rho_near, rho_far)) + tilt
        lower, upper = np.maximum(el - half_el, el_lo), np.minimum(el + half_el, el_hi)
        reachable &= upper >= lower
        el, half_el = (lower + upper) / 2, np.maximum((upper - lower) / 2, 0.0)
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
    for kind, prefix in (("box", "box"), ("ellipsoid", "ell"), ("ring", "ring")):
        table = getattr(packed, kind)
        owner = _owners(packed.start[kind])
        world[f"{prefix}_center"] = positions[owner] + _rotate_xy(table["center"], headings[owner])
        world[f"{prefix}_yaw"] = table["yaw"] + headings[owner]
    cyl = packed.cylinder
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
        box = packed.box
        ts.append(intersect_boxes(origin, dirs, world["box_center"][a:b], box["half"][a:b], world["box_yaw"][a:b],
                                  box["pitch"][a:b]))
        gids.append(box["gid"][a:b])
    a, b = packed.start["cylinder"][obj:obj + 2]
    if b > a:
        ts.append(intersect_cylinders(origin, dirs, world["cyl_xy"][a:b], world["cyl_z"][a:b],
                                      packed.cylinder["radius"][a:b]))
        gids.append(packed.cylinder["gid"][a:b])
    a, b = packed.start["ellipsoid"][obj:obj + 2]
    if b > a:
        ell = packed.ellipsoid
        ts.append(intersect_ellipsoids(origin, dirs, world["ell_center"][a:b], ell["semi"][a:b],
                                       world["ell_yaw"][a:b], ell["pitch"][a:b]))
        gids.append(ell["gid"][a:b])
    a, b = packed.start["ring"][obj:obj + 2]
    if b > a:
        ring = packed.ring
        ts.append(intersect_rings(origin, dirs, world["ring_center"][a:b], world["ring_yaw"][a:b], ring["radius"][a:b],
                                  ring["inner"][a:b], ring["half_width"][a:b]))
        gids.append(ring["gid"][a:b])
    t_all = np.concatenate(ts) if len(ts) > 1 else ts[0]
    gid_all = np.concatenate(gids) if len(gids) > 1 else gids[0]
    if len(t_all) == 1:
        return t_all[0], np.full(dirs.shape[0], gid_all[0])
    nearest = np.argmin(t_all, axis=0)
    return np.take_along_axis(t_all, nearest[None], axis=0)[0], gid_all[nearest]


# --- ray / primitive intersection: origin (3,), dirs (n, 3), k primitives -> t (k, n) ---------

def _to_local(origin, dirs, centers, yaws, pitches=None):
    """Origin (k, 3) and directions (3 arrays broadcasting to (k, n)) in each primitive's frame:
    undo the yaw about z, then the pitch about the primitive's own y."""
    c, s = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    rel = origin - centers
    o_local = np.column_stack([c[:, 0] * rel[:, 0] + s[:, 0] * rel[:, 1],
                               -s[:, 0] * rel[:, 0] + c[:, 0] * rel[:, 1], rel[:, 2]])
    dx, dy, dz = dirs[:, 0][None], dirs[:, 1][None], dirs[:, 2][None]
    d_local = (c * dx + s * dy, -s * dx + c * dy, dz)
    if pitches is None or not np.any(pitches):
        return o_local, d_local
    cp, sp = np.cos(pitches)[:, None], np.sin(pitches)[:, None]
    o_local = np.column_stack([cp[:, 0] * o_local[:, 0] - sp[:, 0] * o_local[:, 2], o_local[:, 1],
                               sp[:, 0] * o_local[:, 0] + cp[:, 0] * o_local[:, 2]])
    return o_local, (cp * d_local[0] - sp * d_local[2], d_local[1], sp * d_local[0] + cp * d_local[2])


def intersect_boxes(origin, dirs, centers, halves, yaws, pitches=None) -> np.ndarray:
    """Slab test against oriented boxes (yaw about z, pitch about their own y)."""
    o_local, d_local = _to_local(origin, dirs, centers, yaws, pitches)
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


def intersect_ellipsoids(origin, dirs, centers, semis, yaws, pitches=None) -> np.ndarray:
    """Ellipsoids (yaw about z, pitch about their own y): scaled to the unit sphere, then a quadratic."""
    o_local, d_local = _to_local(origin, dirs, centers, yaws, pitches)
    o_unit = o_local / semis
    d_unit = [d_local[axis] / semis[:, axis:axis + 1] for axis in range(3)]
    a = d_unit[0] ** 2 + d_unit[1] ** 2 + d_unit[2] ** 2
    b = o_unit[:, :1] * d_unit[0] + o_unit[:, 1:2] * d_unit[1] + o_unit[:, 2:] * d_unit[2]
    c = (o_unit ** 2).sum(axis=1, keepdims=True) - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def intersect_rings(origin, dirs, centers, yaws, radii, inner, half_widths) -> np.ndarray:
    """Wheels: the solid inner <= sqrt(x^2 + z^2) <= radius, |y| <= half_width about the local
    y axis. The first boundary point a ray reaches is the nearest of: a side face inside the
    annulus, the outer cylinder's entry, or the inner cylinder's exit (through the empty hub
    area), each within the slab."""
    o, (dx, dy, dz) = _to_local(origin, dirs, centers, yaws)
    ox, oy, oz = o[:, :1], o[:, 1:2], o[:, 2:]
    r_out2, r_in2, hw = (radii ** 2)[:, None], (inner ** 2)[:, None], half_widths[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_face = (np.sign(oy) * hw - oy) / dy
        px, pz = ox + t_face * dx, oz + t_face * dz
        rho2 = px * px + pz * pz
        face = np.where((t_face > 0) & (rho2 <= r_out2) & (rho2 >= r_in2), t_face, np.inf)
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        c0 = ox * ox + oz * oz
        disc_out = b * b - a * (c0 - r_out2)
        t_out = (-b - np.sqrt(disc_out)) / a
        y_out = oy + t_out * dy
        outer = np.where((disc_out >= 0) & (t_out > 0) & (np.abs(y_out) <= hw), t_out, np.inf)
        disc_in = b * b - a * (c0 - r_in2)
        t_in = (-b + np.sqrt(disc_in)) / a
        y_in = oy + t_in * dy
        inner_wall = np.where((disc_in >= 0) & (t_in > 0) & (np.abs(y_in) <= hw), t_in, np.inf)
    return np.minimum(face, np.minimum(outer, inner_wall))


# --- from hits to points --------------------------------------------------------------------

def make_scan(scene: Scene, grid: RayGrid, best_t, best_gid, rng: np.random.Generator) -> Scan:
    """Points in the sensor frame (row-major over beams, then azimuth) with range noise,
    dropout of random rays, and remission = albedo x range falloff + noise."""
    cfg, packed = scene.config, scene.packed
    draw = rng.random(best_t.shape)
    outlier = draw >= 1.0 - cfg.outliers  # a spurious return before the surface (dust, multipath)
    keep = ((best_t <= cfg.max_range) | outlier) & (draw >= cfg.dropout)
    best_t = np.where(outlier, np.minimum(best_t, cfg.max_range) * rng.random(best_t.shape) + 0.5, best_t)
    t = best_t[keep]
    gid = np.where(outlier, OUTLIER_GID, best_gid)[keep]
    noise_std = np.hypot(cfg.range_noise_std, packed.roughness[gid])
    t_measured = np.maximum(t + rng.standard_normal(t.size) * noise_std, 0.05)
    xyz = grid.dirs[keep] * t_measured[:, None]
    remission = packed.albedo[gid] * np.exp(-t / (1.5 * cfg.max_range))
    remission = np.clip(remission + rng.standard_normal(t.size) * cfg.remission_noise_std, 0.0, 1.0)
    points = np.column_stack([xyz, remission]).astype(np.float32)
    return Scan(points, packed.raw[gid], packed.instance[gid])
