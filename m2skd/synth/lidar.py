"""Spinning-LiDAR simulation: vectorised ray casting with occlusion into a `Scene`.

Rays form a (beams x azimuth_steps) grid fixed in the sensor frame. The ground is hit
analytically for every ray at once. Objects are cast primitive by primitive: a primitive is
tested only against the block of rows and columns its own bounding box can reach (the azimuths
of the box's corners, the elevations of its height range over its horizontal distances),
within the block of its object's bounding sphere; an object's primitives of one kind are tested
together on their common block where that costs less than one numpy call each. Every ray keeps
its nearest hit, a tie going to the primitive cast first (objects in order; within an object
boxes, cylinders, ellipsoids, rings, each in order), so how rays are grouped never changes a
scan.
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
    components: tuple      # dirs[..., 0], dirs[..., 1], dirs[..., 2] as contiguous (H, W) arrays

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
    components = tuple(np.ascontiguousarray(dirs[..., axis]) for axis in range(3))
    for c in components:
        c.setflags(write=False)
    return RayGrid(elevation, azimuth, dirs, components)


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
    dirs = rotate(grid.components, rotation)
    best_t, best_gid = ground_hits(scene, origin, dirs)
    positions, headings = scene.object_state(float(scene.frame_times[frame]))
    cast_objects(scene, positions, headings, origin, rotation, grid, dirs, best_t, best_gid)
    return make_scan(scene, grid, best_t, best_gid, rng)


def rotate(components: tuple, rotation: np.ndarray) -> tuple:
    """rotation @ v for vectors given as their x, y, z arrays, elementwise rather than BLAS, so
    the result does not depend on the thread count (byte-identical output for a seed)."""
    x, y, z = components
    return tuple(x * rotation[j, 0] + y * rotation[j, 1] + z * rotation[j, 2] for j in range(3))


# --- ground -------------------------------------------------------------------------------------

def ground_hits(scene: Scene, origin: np.ndarray, dirs: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ground hit per ray (`dirs`: the rays' x, y, z arrays in the scene frame): the
    raised level (|y| >= curb line), the road level inside it, or else the vertical curb face
    between them. Upward rays get t = inf."""
    dz = dirs[2]
    down = dz < -1e-9
    t = np.full(dz.shape, np.inf)
    gid = np.zeros(dz.shape, dtype=np.int64)
    dx, dy, dz = (d[down] for d in dirs)
    t_high = (CURB_HEIGHT - origin[2]) / dz
    t_low = (0.0 - origin[2]) / dz
    y_high = origin[1] + t_high * dy
    y_low = origin[1] + t_low * dy
    on_high = np.abs(y_high) >= PARKING_OUTER
    on_low = ~on_high & (np.abs(y_low) < PARKING_OUTER)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_curb = (np.sign(y_low) * PARKING_OUTER - origin[1]) / dy
    t_hit = np.where(on_high, t_high, np.where(on_low, t_low, t_curb))
    hit_gid = scene.ground.ground_gid(origin[0] + t_hit * dx, origin[1] + t_hit * dy)
    hit_gid[~on_high & ~on_low] = _SIDEWALK_GID  # the curb face belongs to the sidewalk
    t[down] = t_hit
    gid[down] = hit_gid
    return t, gid


# --- objects ------------------------------------------------------------------------------------

#: Primitive kinds in the order an object's primitives are cast (and win ties).
KINDS = ("box", "cylinder", "ellipsoid", "ring")
#: Enlargement (m) of every primitive's bounding box, far beyond rounding, so no ray that
#: reaches the primitive misses its box.
BOX_MARGIN = 0.01
#: What one numpy call costs, in ray-primitive tests: an object's primitives of one kind are
#: cast together on the smallest block holding all their blocks when that block, times their
#: number, plus one call costs less than a call per primitive on its own block.
CALL_COST = 1500


def cast_objects(scene, positions, headings, origin, rotation, grid: RayGrid, dirs, best_t, best_gid) -> None:
    """Update best_t / best_gid in place with every object's nearest hits (`dirs`: the rays'
    x, y, z arrays in the scene frame)."""
    packed = scene.packed
    if not len(positions):
        return
    world = _world_primitives(packed, positions, headings)
    params = {kind: _PARAMS[kind](packed, world, origin) for kind in KINDS}
    gids = {kind: getattr(packed, kind)["gid"] for kind in KINDS}
    dx, dy, dz = dirs
    for kind, rows, r0, r1, c0, c1 in _cast_units(scene, positions, headings, origin, rotation, grid):
        view_t, view_gid = best_t[r0:r1, c0:c1], best_gid[r0:r1, c0:c1]
        t = _HITS[kind](params[kind], rows, dx[r0:r1, c0:c1], dy[r0:r1, c0:c1], dz[r0:r1, c0:c1])
        if t.ndim == 2:
            closer = t < view_t
            np.copyto(view_t, t, where=closer)
            np.copyto(view_gid, gids[kind][rows], where=closer)
            continue
        t_min = t.min(axis=0)  # several primitives: the first nearest of them
        closer = t_min < view_t
        if closer.any():
            np.copyto(view_t, t_min, where=closer)
            np.copyto(view_gid, gids[kind][rows][t.argmin(axis=0)], where=closer)


def _cast_units(scene, positions, headings, origin, rotation, grid: RayGrid) -> list[tuple]:
    """(kind, rows, row0, row1, col0, col1) in casting order: `rows` (an index, or an array of
    several) into that kind's primitives, cast on rays [row0:row1, col0:col1]."""
    packed, cfg = scene.packed, scene.config
    n_cols = grid.shape[1]
    # each object's bounding-sphere block, narrowed by its height range: no ray outside reaches it
    centers = positions + _rotate_xy(packed.bound_center, headings)
    centers_sensor = (centers - origin) @ rotation
    z_span = np.column_stack([positions[:, 2] + packed.bound_z[:, 0] - origin[2] - 0.01,
                              positions[:, 2] + packed.bound_z[:, 1] - origin[2] + 0.01])
    tilt = np.radians(2.0 * cfg.tilt_deg + 0.1)
    sphere = _sphere_blocks(centers_sensor, packed.bound_radius, grid, cfg.max_range, z_span, tilt)
    found = []
    for rank, kind in enumerate(KINDS):
        table = getattr(packed, kind)
        owner = table["owner"]
        if not len(owner):
            continue
        center = positions[owner] + _rotate_xy(table["part_center"], headings[owner])
        own = _box_blocks(center, table["part_half"] + BOX_MARGIN, headings[owner], origin, rotation, grid,
                          cfg.max_range, tilt)
        r0, r1, c0, c1, ok = _within(own, tuple(a[owner] for a in sphere), n_cols)
        keep = np.flatnonzero(ok)
        found.append((owner[keep] * len(KINDS) + rank, np.full(len(keep), rank), keep,
                      r0[keep], r1[keep], c0[keep], c1[keep]))
    if not found:
        return []
    group, kind_rank, row, r0, r1, c0, c1 = (np.concatenate(a) for a in zip(*found))
    order = np.lexsort((row, group))
    group, kind_rank, row, r0, r1, c0, c1 = (a[order] for a in (group, kind_rank, row, r0, r1, c0, c1))
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    count = np.diff(np.r_[first, len(group)])
    area = (r1 - r0) * (c1 - c0)
    u_r0, u_r1 = np.minimum.reduceat(r0, first), np.maximum.reduceat(r1, first)
    u_c0, u_c1 = np.minimum.reduceat(c0, first), np.maximum.reduceat(c1, first)
    together = ((count > 1) & (u_c1 - u_c0 < n_cols)
                & (CALL_COST + count * (u_r1 - u_r0) * (u_c1 - u_c0) < np.add.reduceat(area, first) + count * CALL_COST))
    units = []
    for g in range(len(first)):
        a = first[g]
        kind = KINDS[kind_rank[a]]
        if together[g]:
            spans = [(row[a:a + count[g]], u_r0[g], u_r1[g], u_c0[g], u_c1[g])]
        else:
            spans = [(row[i], r0[i], r1[i], c0[i], c1[i]) for i in range(a, a + count[g])]
        for rows, lo_r, hi_r, lo_c, hi_c in spans:
            for lo, hi in _wrapped(int(lo_c), int(hi_c), n_cols):
                units.append((kind, rows, int(lo_r), int(hi_r), lo, hi))
    return units


def _wrapped(lo: int, hi: int, n_cols: int) -> list[tuple[int, int]]:
    """Columns [lo, hi) of an unwrapped range as at most two ranges within [0, n_cols)."""
    if hi - lo >= n_cols:
        return [(0, n_cols)]
    shift = (lo // n_cols) * n_cols
    lo, hi = lo - shift, hi - shift
    return [(lo, hi)] if hi <= n_cols else [(lo, n_cols), (0, hi - n_cols)]


def _within(own: tuple, outer: tuple, n_cols: int) -> tuple:
    """Blocks `own` (row0, row1, col0, col1 unwrapped, reachable, all columns) cut to the blocks
    `outer` of the same form: (row0, row1, col0, col1, non-empty)."""
    r0, r1, c0, c1, ok, full = own
    o_r0, o_r1, o_c0, o_c1, o_ok, o_full = outer
    # the same turn for both: shift own by whole revolutions next to outer
    shift = np.round(((o_c0 + o_c1) - (c0 + c1)) / (2 * n_cols)).astype(np.int64) * n_cols
    c0_both, c1_both = np.maximum(c0 + shift, o_c0), np.minimum(c1 + shift, o_c1)
    col0 = np.where(full, np.where(o_full, 0, o_c0), np.where(o_full, c0, c0_both))
    col1 = np.where(full, np.where(o_full, n_cols, o_c1), np.where(o_full, c1, c1_both))
    row0, row1 = np.maximum(r0, o_r0), np.minimum(r1, o_r1)
    return row0, row1, col0, col1, ok & o_ok & (row1 > row0) & (col1 > col0)


def _rotate_xy(local: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    out = local.copy()
    out[:, 0] = c * local[:, 0] - s * local[:, 1]
    out[:, 1] = s * local[:, 0] + c * local[:, 1]
    return out


def _rows(grid: RayGrid, el_lo: np.ndarray, el_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose elevation lies in [el_lo, el_hi]."""
    descending = -grid.elevation  # ascending, for searchsorted
    return np.searchsorted(descending, -el_hi, side="left"), np.searchsorted(descending, -el_lo, side="right")


def _sphere_blocks(centers, radii, grid: RayGrid, max_range: float, z_span, tilt: float) -> tuple:
    """(row0, row1, col0, col1, reachable, all columns) of the rays that can hit each object's
    bounding sphere; columns unwrapped (col0 may be negative, col1 beyond the last column).

    A ray hits the sphere only if its azimuth is within asin(r / rho) of the centre's (rho:
    horizontal distance) and its elevation within asin(r / dist). With `z_span` (n, 2), the
    height range of each object relative to the sensor in the level scene frame, the
    elevations are narrowed further to those that reach that height range within the
    sphere's horizontal distances, widened by `tilt` (rad), the most the sensor's attitude
    turns a ray (long, low things such as fences and hedges).
    """
    n_cols = grid.shape[1]
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
    rho_near = np.maximum(rho - radii, 0.1)
    rho_far = rho + radii
    z_lo, z_hi = z_span[:, 0], z_span[:, 1]
    el_lo = np.arctan2(z_lo, np.where(z_lo < 0, rho_near, rho_far)) - tilt
    el_hi = np.arctan2(z_hi, np.where(z_hi > 0, rho_near, rho_far)) + tilt
    lower, upper = np.maximum(el - half_el, el_lo), np.minimum(el + half_el, el_hi)
    reachable &= upper >= lower
    el, half_el = (lower + upper) / 2, np.maximum((upper - lower) / 2, 0.0)
    row_lo, row_hi = _rows(grid, el - half_el, el + half_el)
    full = (half_az >= np.pi / 2) | (col_hi - col_lo >= n_cols)
    return row_lo, row_hi, col_lo, col_hi, reachable, full


#: Corners of the unit box, (8, 3).
_CORNERS = np.array([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])


def _box_blocks(centers, halves, yaws, origin, rotation, grid: RayGrid, max_range: float, tilt: float) -> tuple:
    """(row0, row1, col0, col1, reachable, all columns) of the rays that can hit each box
    (centre (n, 3) in the scene frame, half extents (n, 3), turned by yaw about z).

    Columns: a box that leaves the sensor's axis outside lies within the wedge of azimuths
    spanned by its corners (a convex set is inside a wedge narrower than pi when its corners
    are), so the corners' azimuths in the sensor frame bound the columns exactly; a box
    around or next to the axis gets every column. Rows: the elevations of its height range
    over its nearest and farthest horizontal distance, widened by `tilt` (rad), the most the
    sensor's attitude turns a ray.
    """
    n_cols = grid.shape[1]
    c, s = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    lx, ly, lz = (_CORNERS[:, axis] * halves[:, axis:axis + 1] for axis in range(3))
    rel = np.stack([centers[:, :1] - origin[0] + c * lx - s * ly, centers[:, 1:2] - origin[1] + s * lx + c * ly,
                    centers[:, 2:] - origin[2] + lz], axis=-1)                  # (n, 8, 3) from the sensor
    corners = rel @ rotation                                                    # in the sensor frame
    middle = (centers - origin) @ rotation
    az_mid = np.arctan2(middle[:, 1], middle[:, 0])
    turn = np.mod(np.arctan2(corners[..., 1], corners[..., 0]) - az_mid[:, None] + np.pi, 2 * np.pi) - np.pi
    lo, hi = az_mid + turn.min(axis=1), az_mid + turn.max(axis=1)
    col_step = 2 * np.pi / n_cols
    col_lo = np.floor((lo + np.pi) / col_step).astype(np.int64)
    col_hi = np.floor((hi + np.pi) / col_step).astype(np.int64) + 1
    # horizontal distances from the sensor, level frame: to the footprint rectangle and its corners
    rx, ry = origin[0] - centers[:, 0], origin[1] - centers[:, 1]
    qx = np.abs(c[:, 0] * rx + s[:, 0] * ry) - halves[:, 0]
    qy = np.abs(-s[:, 0] * rx + c[:, 0] * ry) - halves[:, 1]
    rho_near = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    rho_far = np.hypot(rel[..., 0], rel[..., 1]).max(axis=1)
    near = np.maximum(rho_near, 0.1)
    z_lo, z_hi = centers[:, 2] - halves[:, 2] - origin[2], centers[:, 2] + halves[:, 2] - origin[2]
    el_lo = np.arctan2(z_lo, np.where(z_lo < 0, near, rho_far)) - tilt
    el_hi = np.arctan2(z_hi, np.where(z_hi > 0, near, rho_far)) + tilt
    row_lo, row_hi = _rows(grid, el_lo, el_hi)
    full = (hi - lo > 0.9 * np.pi) | (rho_near < 0.5)
    return row_lo, row_hi, col_lo, col_hi, rho_near <= max_range, full


def _world_primitives(packed, positions, headings) -> dict:
    """Primitive parameters in the scene frame at this time (all objects at once)."""
    world = {}
    for kind, prefix in (("box", "box"), ("ellipsoid", "ell"), ("ring", "ring")):
        table = getattr(packed, kind)
        owner = table["owner"]
        world[f"{prefix}_center"] = positions[owner] + _rotate_xy(table["center"], headings[owner])
        world[f"{prefix}_yaw"] = table["yaw"] + headings[owner]
    cyl = packed.cylinder
    owner = cyl["owner"]
    xy = np.column_stack([cyl["xy"], np.zeros(len(owner))]) if len(owner) else np.zeros((0, 3))
    world["cyl_xy"] = (positions[owner] + _rotate_xy(xy, headings[owner]))[:, :2]
    world["cyl_z"] = np.column_stack([cyl["z0"], cyl["z1"]]) + positions[owner][:, 2:3]
    return world


# --- ray / primitive intersection ----------------------------------------------------------------
#
# Each kind has a `_*_params` step that turns the scene-frame primitives into what its test
# needs per primitive for this sensor origin (all primitives at once), and a `_*_hits` test of
# primitives `rows` against rays given as x, y, z arrays of one shape S: t of shape S for one
# primitive, (k,) + S for k of them, inf where a ray misses. The public `intersect_*`
# functions (origin (3,), dirs (n, 3), k primitives -> t (k, n)) run the same arithmetic.

def _column(values) -> np.ndarray:
    """Per-primitive values shaped (k, 1, 1), so that one row broadcasts against a block of rays."""
    return np.asarray(values, dtype=float).reshape(-1, 1, 1)


def _yaw_pitch(yaws, pitches, pitched) -> dict:
    pitched = np.asarray(pitched, dtype=bool)
    return {"c": _column(np.cos(yaws)), "s": _column(np.sin(yaws)), "cp": _column(np.cos(pitches)),
            "sp": _column(np.sin(pitches)), "pitched": pitched.tolist()}


def _local_origin(origin, centers, yaws, pitches, pitched) -> np.ndarray:
    """The sensor origin in each primitive's frame (k, 3): undo the yaw about z, then (where
    the primitive's group is pitched) the pitch about its own y."""
    c, s = np.cos(yaws), np.sin(yaws)
    rel = origin - centers
    o = np.empty_like(rel)
    o[:, 0] = c * rel[:, 0] + s * rel[:, 1]
    o[:, 1] = -s * rel[:, 0] + c * rel[:, 1]
    o[:, 2] = rel[:, 2]
    turned = np.flatnonzero(pitched)
    if len(turned):
        cp, sp = np.cos(pitches[turned]), np.sin(pitches[turned])
        o0, o2 = o[turned, 0], o[turned, 2]
        o[turned, 0] = cp * o0 - sp * o2
        o[turned, 2] = sp * o0 + cp * o2
    return o


def _local_dirs(p, rows, dx, dy, dz) -> tuple:
    """Ray directions in the frame of primitives `rows` (one object's: pitched or not alike)."""
    c, s = p["c"][rows], p["s"][rows]
    d0, d1 = c * dx + s * dy, -s * dx + c * dy
    if not p["pitched"][rows if isinstance(rows, (int, np.integer)) else rows[0]]:
        return d0, d1, dz
    cp, sp = p["cp"][rows], p["sp"][rows]
    return cp * d0 - sp * dz, d1, sp * d0 + cp * dz


def _box_params(origin, centers, halves, yaws, pitches, pitched) -> dict:
    o = _local_origin(origin, centers, yaws, pitches, pitched)
    p = _yaw_pitch(yaws, pitches, pitched)
    for axis in range(3):
        p[f"lo{axis}"] = _column(-halves[:, axis] - o[:, axis])
        p[f"hi{axis}"] = _column(halves[:, axis] - o[:, axis])
    return p


def _box_hits(p, rows, dx, dy, dz) -> np.ndarray:
    """Slab test against oriented boxes (yaw about z, pitch about their own y)."""
    d_local = _local_dirs(p, rows, dx, dy, dz)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            inv = 1.0 / d_local[axis]
            t1 = p[f"lo{axis}"][rows] * inv
            t2 = p[f"hi{axis}"][rows] * inv
            if axis == 0:
                t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
            else:
                np.maximum(t_near, np.minimum(t1, t2), out=t_near)
                np.minimum(t_far, np.maximum(t1, t2), out=t_far)
        hit = (t_far >= t_near) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def _cylinder_params(origin, xy, z_range, radii) -> dict:
    ox, oy = origin[0] - xy[:, 0], origin[1] - xy[:, 1]
    r2 = radii ** 2
    return {"ox": _column(ox), "oy": _column(oy), "oz": float(origin[2]), "r2": _column(r2),
            "c_quad": _column(ox * ox + oy * oy - r2), "z0": _column(z_range[:, 0]), "z1": _column(z_range[:, 1]),
            "top": _column(z_range[:, 1] - origin[2])}


def _cylinder_hits(p, rows, dx, dy, dz) -> np.ndarray:
    """Vertical finite cylinders: the side, or the top cap seen from above."""
    ox, oy, r2 = p["ox"][rows], p["oy"][rows], p["r2"][rows]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy  # half of the usual b
    disc = b * b - a * p["c_quad"][rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
        z = p["oz"] + t_side * dz
        side_ok = (disc >= 0) & (t_side > 0) & (z >= p["z0"][rows]) & (z <= p["z1"][rows])
        t_top = p["top"][rows] / dz
        px, py = ox + t_top * dx, oy + t_top * dy
        top_ok = (t_top > 0) & (px * px + py * py <= r2)
    return np.minimum(np.where(side_ok, t_side, np.inf), np.where(top_ok, t_top, np.inf))


def _ellipsoid_params(origin, centers, semis, yaws, pitches, pitched) -> dict:
    o_unit = _local_origin(origin, centers, yaws, pitches, pitched) / semis
    p = _yaw_pitch(yaws, pitches, pitched)
    for axis in range(3):
        p[f"o{axis}"] = _column(o_unit[:, axis])
        p[f"semi{axis}"] = _column(semis[:, axis])
    p["c_quad"] = _column((o_unit ** 2).sum(axis=1) - 1.0)
    return p


def _ellipsoid_hits(p, rows, dx, dy, dz) -> np.ndarray:
    """Ellipsoids (yaw about z, pitch about their own y): scaled to the unit sphere, then a quadratic."""
    d_unit = [d / p[f"semi{axis}"][rows] for axis, d in enumerate(_local_dirs(p, rows, dx, dy, dz))]
    a = d_unit[0] ** 2 + d_unit[1] ** 2 + d_unit[2] ** 2
    b = p["o0"][rows] * d_unit[0] + p["o1"][rows] * d_unit[1] + p["o2"][rows] * d_unit[2]
    disc = b * b - a * p["c_quad"][rows]
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def _ring_params(origin, centers, yaws, radii, inner, half_widths) -> dict:
    zeros = np.zeros(len(yaws))
    o = _local_origin(origin, centers, yaws, zeros, zeros)
    p = _yaw_pitch(yaws, zeros, zeros)
    ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
    c0 = ox * ox + oz * oz
    r_out2, r_in2 = radii ** 2, inner ** 2
    p.update(ox=_column(ox), oy=_column(oy), oz=_column(oz), r_out2=_column(r_out2), r_in2=_column(r_in2),
             hw=_column(half_widths), face=_column(np.sign(oy) * half_widths - oy),
             c_out=_column(c0 - r_out2), c_in=_column(c0 - r_in2))
    return p


def _ring_hits(p, rows, dx, dy, dz) -> np.ndarray:
    """Wheels: the solid inner <= sqrt(x^2 + z^2) <= radius, |y| <= half_width about the local
    y axis. The first boundary point a ray reaches is the nearest of: a side face inside the
    annulus, the outer cylinder's entry, or the inner cylinder's exit (through the empty hub
    area), each within the slab."""
    dx, dy, dz = _local_dirs(p, rows, dx, dy, dz)
    ox, oy, oz = p["ox"][rows], p["oy"][rows], p["oz"][rows]
    r_out2, r_in2, hw = p["r_out2"][rows], p["r_in2"][rows], p["hw"][rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_face = p["face"][rows] / dy
        px, pz = ox + t_face * dx, oz + t_face * dz
        rho2 = px * px + pz * pz
        face = np.where((t_face > 0) & (rho2 <= r_out2) & (rho2 >= r_in2), t_face, np.inf)
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        disc_out = b * b - a * p["c_out"][rows]
        t_out = (-b - np.sqrt(disc_out)) / a
        y_out = oy + t_out * dy
        outer = np.where((disc_out >= 0) & (t_out > 0) & (np.abs(y_out) <= hw), t_out, np.inf)
        disc_in = b * b - a * p["c_in"][rows]
        t_in = (-b + np.sqrt(disc_in)) / a
        y_in = oy + t_in * dy
        inner_wall = np.where((disc_in >= 0) & (t_in > 0) & (np.abs(y_in) <= hw), t_in, np.inf)
    return np.minimum(face, np.minimum(outer, inner_wall))


_PARAMS = {
    "box": lambda packed, world, origin: _box_params(origin, world["box_center"], packed.box["half"], world["box_yaw"],
                                                     packed.box["pitch"], packed.box["group_pitched"]),
    "cylinder": lambda packed, world, origin: _cylinder_params(origin, world["cyl_xy"], world["cyl_z"],
                                                               packed.cylinder["radius"]),
    "ellipsoid": lambda packed, world, origin: _ellipsoid_params(origin, world["ell_center"], packed.ellipsoid["semi"],
                                                                 world["ell_yaw"], packed.ellipsoid["pitch"],
                                                                 packed.ellipsoid["group_pitched"]),
    "ring": lambda packed, world, origin: _ring_params(origin, world["ring_center"], world["ring_yaw"],
                                                       packed.ring["radius"], packed.ring["inner"],
                                                       packed.ring["half_width"]),
}
_HITS = {"box": _box_hits, "cylinder": _cylinder_hits, "ellipsoid": _ellipsoid_hits, "ring": _ring_hits}


def _all_rows(k: int) -> np.ndarray:
    return np.arange(k)


def _flat(dirs: np.ndarray) -> tuple:
    return dirs[:, 0][None], dirs[:, 1][None], dirs[:, 2][None]


def intersect_boxes(origin, dirs, centers, halves, yaws, pitches=None) -> np.ndarray:
    """Slab test against oriented boxes (yaw about z, pitch about their own y): t (k, n)."""
    pitches = np.zeros(len(centers)) if pitches is None else np.asarray(pitches, float)
    pitched = np.full(len(centers), bool(np.any(pitches)))
    p = _box_params(origin, np.asarray(centers, float), np.asarray(halves, float), np.asarray(yaws, float), pitches,
                    pitched)
    return _box_hits(p, _all_rows(len(centers)), *_flat(dirs))[:, 0]


def intersect_cylinders(origin, dirs, xy, z_range, radii) -> np.ndarray:
    """Vertical finite cylinders: the side, or the top cap seen from above: t (k, n)."""
    p = _cylinder_params(origin, np.asarray(xy, float), np.asarray(z_range, float), np.asarray(radii, float))
    return _cylinder_hits(p, _all_rows(len(xy)), *_flat(dirs))[:, 0]


def intersect_ellipsoids(origin, dirs, centers, semis, yaws, pitches=None) -> np.ndarray:
    """Ellipsoids (yaw about z, pitch about their own y): t (k, n)."""
    pitches = np.zeros(len(centers)) if pitches is None else np.asarray(pitches, float)
    pitched = np.full(len(centers), bool(np.any(pitches)))
    p = _ellipsoid_params(origin, np.asarray(centers, float), np.asarray(semis, float), np.asarray(yaws, float),
                          pitches, pitched)
    return _ellipsoid_hits(p, _all_rows(len(centers)), *_flat(dirs))[:, 0]


def intersect_rings(origin, dirs, centers, yaws, radii, inner, half_widths) -> np.ndarray:
    """Wheels (see `_ring_hits`): t (k, n)."""
    p = _ring_params(origin, np.asarray(centers, float), np.asarray(yaws, float), np.asarray(radii, float),
                     np.asarray(inner, float), np.asarray(half_widths, float))
    return _ring_hits(p, _all_rows(len(centers)), *_flat(dirs))[:, 0]


# --- from hits to points --------------------------------------------------------------------

def make_scan(scene: Scene, grid: RayGrid, best_t, best_gid, rng: np.random.Generator) -> Scan:
    """Points in the sensor frame (row-major over beams, then azimuth) with range noise,
    dropout of random rays, and remission = albedo x range falloff + noise."""
    cfg, packed = scene.config, scene.packed
    draw = rng.random(best_t.shape)
    outlier = draw >= 1.0 - cfg.outliers  # a spurious return before the surface (dust, multipath)
    keep = ((best_t <= cfg.max_range) | outlier) & (draw >= cfg.dropout)
    before = rng.random(best_t.shape)[keep & outlier]  # where on the ray a spurious return lies
    t = best_t[keep]
    gid = best_gid[keep]
    spurious = outlier[keep]
    t[spurious] = np.minimum(t[spurious], cfg.max_range) * before + 0.5
    gid[spurious] = OUTLIER_GID
    noise_std = np.hypot(cfg.range_noise_std, packed.roughness)[gid]
    t_measured = np.maximum(t + rng.standard_normal(t.size) * noise_std, 0.05)
    remission = packed.albedo[gid] * np.exp(-t / (1.5 * cfg.max_range))
    remission = np.clip(remission + rng.standard_normal(t.size) * cfg.remission_noise_std, 0.0, 1.0)
    points = np.empty((t.size, 4), dtype=np.float32)
    for axis, component in enumerate(grid.components):
        points[:, axis] = component[keep] * t_measured
    points[:, 3] = remission
    return Scan(points, packed.raw[gid], packed.instance[gid])
