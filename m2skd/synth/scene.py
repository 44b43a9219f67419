"""Procedural street scene for the synthetic LiDAR: ground regions, objects, ego path.

The street runs along +x of a *scene frame* whose ground is z = 0. Every object is a few
primitives (see shapes.py) in its own local frame, placed by a position and a heading; moving
objects follow position = start + velocity * t with their heading along the velocity. The
LiDAR's world frame (SemanticKITTI's pose frame) is the sensor frame of the first scan, so its
first pose is the identity, as in the real data.

The street is a residential one like most of SemanticKITTI: two lanes, a parking strip or
grass verge, a raised sidewalk, a green strip with trees, then fences, hedges, walls and yards
in front of the buildings. Its densities are set so that a drive's class shares come near the
official `content` ratios (`m2skd stats` compares them): much vegetation, sidewalk and
terrain, hard-class things rare and mostly far.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import M2SKDError
from .shapes import (BICYCLE, BICYCLIST, BUILDING, BUS, CAR, FENCE, LANE_MARKING, MOTORCYCLE, MOTORCYCLIST,
                     OTHER_GROUND, OTHER_OBJECT, OTHER_STRUCTURE, OTHER_VEHICLE, OUTLIER, PARKING, PERSON, POLE,
                     ROAD, SIDEWALK, TERRAIN, TRAFFIC_SIGN, TRUCK, TRUNK, UNLABELED, VEGETATION, Box, Cylinder,
                     Ellipsoid, Part, Ring, bicycle_parts, bicyclist_parts, bus_parts, bush_parts, car_parts,
                     clutter_parts, fence_parts, hedge_parts, motorcycle_parts, motorcyclist_parts,
                     other_vehicle_parts, person_parts, pole_parts, sign_parts, tree_parts, truck_parts, wall_parts,
                     building_parts)


class SynthConfigError(M2SKDError, ValueError):
    """Impossible simulation settings (reported by the CLI as one line)."""


#: Official moving-* id of each movable class.
MOVING_ID = {CAR: 252, BICYCLIST: 253, PERSON: 254, MOTORCYCLIST: 255, BUS: 257, TRUCK: 258, OTHER_VEHICLE: 259}
#: Classes whose objects carry an instance id ("things").
THING_IDS = frozenset({CAR, BICYCLE, BUS, MOTORCYCLE, TRUCK, OTHER_VEHICLE, PERSON, BICYCLIST, MOTORCYCLIST,
                       *MOVING_ID.values()})

#: Ground classes, in the order of their primitive ids (ground primitives come first).
GROUND_IDS = (ROAD, LANE_MARKING, PARKING, SIDEWALK, OTHER_GROUND, TERRAIN)
_GROUND_GID_OF_RAW = np.zeros(max(GROUND_IDS) + 1, dtype=np.int64)
_GROUND_GID_OF_RAW[list(GROUND_IDS)] = np.arange(len(GROUND_IDS))
#: Primitive ids every scene has: the ground classes, then the LiDAR's spurious returns.
FIXED_IDS = GROUND_IDS + (OUTLIER,)
OUTLIER_GID = len(GROUND_IDS)

#: Base reflectivity per raw id; the LiDAR adds per-object variation, range falloff and noise.
ALBEDO = {ROAD: 0.18, LANE_MARKING: 0.6, PARKING: 0.22, SIDEWALK: 0.3, OTHER_GROUND: 0.26, TERRAIN: 0.36,
          BUILDING: 0.3, FENCE: 0.34, OTHER_STRUCTURE: 0.3, VEGETATION: 0.42, TRUNK: 0.28, POLE: 0.32,
          TRAFFIC_SIGN: 0.85, OTHER_OBJECT: 0.35, UNLABELED: 0.3, OUTLIER: 0.1,
          CAR: 0.3, TRUCK: 0.34, BUS: 0.34, OTHER_VEHICLE: 0.3, BICYCLE: 0.24, MOTORCYCLE: 0.3,
          PERSON: 0.2, BICYCLIST: 0.22, MOTORCYCLIST: 0.24}
#: Extra range noise (m) of rough surfaces: foliage and grass scatter the return.
ROUGHNESS = {VEGETATION: 0.06, TERRAIN: 0.02}

# --- street cross-section (|y|, metres) -----------------------------------------------------
LANE_HALF_WIDTH = 3.5        # road: a lane each way
PARKING_OUTER = 5.75         # parking strip, road or grass verge, then the curb
SIDEWALK_OUTER = 8.25
GREEN_OUTER = 10.25          # terrain strip (grass / gravel) with trees, then the property line
CURB_HEIGHT = 0.15           # sidewalk and everything beyond it are raised by this
LANE_LINES = (0.0,)          # dashed centre line
MARK_HALF_WIDTH = 0.075
DASH_LENGTH, DASH_PERIOD = 3.0, 9.0
EGO_LANE_Y = -1.75           # right-hand traffic: the ego drives at y < 0 towards +x
ONCOMING_LANE_Y = 1.75
#: (y, direction, density factor) of cyclists keeping to the lane's edge; fewer ride the ego's
#: way, since the ego would spend many scans beside each one at a small relative speed
RIDER_LINES = ((-3.2, +1, 0.3), (3.2, -1, 1.0))
EGO_CLEARANCE = 20.0         # traffic in the ego's lane keeps this far (m) from the ego
#: One parking bay in every this many metres of the parking strip, each side. Bays at a steady
#: rate, rather than long parking stretches drawn at random, let a short drive pass about its
#: share of parking (and of parked cars): with stretches of ~30 m, 8 drives of 2 x 120 m had
#: 0.31-2.10 times SemanticKITTI's parking share.
PARKING_CELL = 50.0
#: Heavy vehicles (truck, bus, van, trailer) together may take at most this share of a
#: sequence's rays (those into their bounding boxes, over its scans): see
#: `_Populator.within_heavy_budget`.
HEAVY_RAY_BUDGET = 0.005
HEAVY_IDS = frozenset({TRUCK, BUS, OTHER_VEHICLE})


@dataclass(frozen=True)
class SynthConfig:
    """Size and content knobs of the simulation. Densities are per 100 m of street per side."""

    # LiDAR (defaults: an HDL-64E as in SemanticKITTI)
    beams: int = 64
    azimuth_steps: int = 2048
    fov_up: float = 2.0
    fov_down: float = -24.8
    max_range: float = 80.0
    sensor_height: float = 1.73
    range_noise_std: float = 0.02
    remission_noise_std: float = 0.03
    dropout: float = 0.03
    outliers: float = 0.0005             # fraction of rays that return a spurious point (raw id 1)
    # ego motion
    ego_speed: float = 8.0
    frame_dt: float = 0.1
    street_length: float | None = None  # populated length; None: the drive plus the range both ways
    sway_amplitude: float = 0.5          # lateral offset (m) of a slow lane wander
    sway_wavelength: float = 140.0
    heading_wobble_deg: float = 1.0
    tilt_deg: float = 0.4                # pitch/roll amplitude (suspension)
    # static stuff
    facade_fraction: float = 0.3         # lots whose building stands at the property line
    building_fill: float = 0.7           # of the other lots: with a building behind the yard
    trees_per_100m: float = 12.0
    bushes_per_100m: float = 18.0
    yard_plants_per_100m: float = 20.0   # bushes and trees in the yards
    hedge_fraction: float = 0.25         # of the property line: hedge, else fence or wall
    wall_fraction: float = 0.12          # of the rest: a wall (other-structure), else a fence
    poles_per_100m: float = 4.0
    signs_per_100m: float = 3.0
    clutter_per_100m: float = 10.0       # bins, benches, bollards (other-object)
    parking_fraction: float = 0.16      # fraction of the parking strip in parking bays (rest: road or grass)
    parked_fill: float = 0.85            # chance that a vehicle's place in a parking bay is taken
    other_ground_fraction: float = 0.15  # fraction of the green strip that is gravel (other-ground)
    # small static things (hard classes)
    parked_bicycles_per_100m: float = 0.4
    parked_motorcycles_per_100m: float = 0.08
    standing_persons_per_100m: float = 0.3
    waiting_bicyclists_per_100m: float = 0.1
    waiting_motorcyclists_per_100m: float = 0.05
    # moving things
    walking_persons_per_100m: float = 0.3
    vehicles_per_100m_per_lane: float = 0.8
    riders_per_100m_per_lane: float = 0.08
    heavy_vehicle_share: float = 0.08    # trucks, buses, vans and trailers among vehicles
    motorcyclist_share: float = 0.04    # of vehicles in the traffic lanes
    min_hard_per_100m: float = 0.0       # each hard class at least this often near the drive (and once)

    def __post_init__(self):
        if self.beams < 2 or self.azimuth_steps < 8:
            raise SynthConfigError("need at least 2 beams and 8 azimuth steps")
        if not -90 < self.fov_down < self.fov_up < 90:
            raise SynthConfigError("need -90 < fov_down < fov_up < 90 degrees")
        if self.max_range <= 0 or self.frame_dt <= 0 or self.sensor_height <= CURB_HEIGHT:
            raise SynthConfigError("max_range and frame_dt must be positive, the sensor above the curb")
        if not 0 <= self.dropout < 1 or not 0 <= self.outliers < 1:
            raise SynthConfigError("dropout and outliers must be in [0, 1)")


@dataclass
class SceneObject:
    raw: int                # raw id written for its points (moving-* for moving objects)
    instance: int           # > 0 for things, 0 for stuff
    position: np.ndarray    # (3,) at t = 0, scene frame; z is the ground level it stands on
    yaw: float
    velocity: np.ndarray    # (3,) m/s, zero for static objects
    parts: list
    albedo_scale: float = 1.0

    @property
    def moving(self) -> bool:
        return bool(np.any(self.velocity))

    def position_at(self, t: float) -> np.ndarray:
        return self.position + self.velocity * t

    def local_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds of all parts in the object's own frame."""
        return _local_bounds(self.parts)

    def to_local(self, points: np.ndarray, t: float) -> np.ndarray:
        """Scene-frame points (n, 3) into the object's frame at time t."""
        rel = points - self.position_at(t)
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.column_stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]])


#: Things within this distance (m, along the street) of the ego at some scan count as seen.
NEAR_DRIVE_M = 25.0
VEHICLE_BUILDERS = {CAR: car_parts, TRUCK: truck_parts, BUS: bus_parts, OTHER_VEHICLE: other_vehicle_parts,
                    MOTORCYCLIST: motorcyclist_parts, BICYCLIST: bicyclist_parts, MOTORCYCLE: motorcycle_parts}

# --- ground layout --------------------------------------------------------------------------

@dataclass(frozen=True)
class Segments:
    """Piecewise-constant class along x: class_ids[i] on [edges[i], edges[i+1])."""

    edges: np.ndarray
    class_ids: np.ndarray

    def lookup(self, x: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(self.edges, x, side="right") - 1, 0, len(self.class_ids) - 1)
        return self.class_ids[idx]

    def spans(self, raw: int) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b, c in zip(self.edges[:-1], self.edges[1:], self.class_ids) if c == raw]


def with_bays(rng, base: Segments, raw: int, fraction: float, cell: float) -> Segments:
    """`base` with one bay of class `raw` in every `cell` m along it: fraction x cell m long
    (+-25 %) at a random place in its cell."""
    x_lo, x_hi = float(base.edges[0]), float(base.edges[-1])
    bays = []
    for a in np.arange(x_lo, x_hi, cell):
        length = min(fraction * cell * rng.uniform(0.75, 1.25), cell)
        start = a + rng.uniform(0.0, cell - length)
        bays.append((start, min(start + length, x_hi)))
    edges = np.unique(np.concatenate([base.edges, np.ravel(bays)]))
    edges = edges[(edges >= x_lo) & (edges <= x_hi)]
    mids = (edges[:-1] + edges[1:]) / 2
    ids = base.lookup(mids)
    for a, b in bays:
        ids[(mids > a) & (mids < b)] = raw
    keep = np.r_[True, ids[1:] != ids[:-1]]  # merge neighbours of one class
    return Segments(np.r_[edges[:-1][keep], edges[-1]], ids[keep])


class Spread:
    """Draws of categories in given shares, spread evenly from a random phase: each draw adds
    every category's share to its credit (the credits start uniform in [0, 1)) and takes the
    category of most credit, which pays 1. After n draws each category has been drawn about
    n x its share times, within about one."""

    def __init__(self, rng, shares: dict):
        self.kinds = list(shares)
        self.shares = np.array([shares[k] for k in self.kinds], float)
        self.shares /= self.shares.sum()
        self.credit = rng.uniform(0.0, 1.0, len(self.kinds))

    def draw(self):
        self.credit += self.shares
        k = int(np.argmax(self.credit))
        self.credit[k] -= 1.0
        return self.kinds[k]


def random_segments(rng, x_lo, x_hi, shares: dict, mean_len: float) -> Segments:
    """Segments of random length around `mean_len`, each of a class drawn with `shares`."""
    classes = list(shares)
    p = np.array([shares[c] for c in classes], float)
    edges, ids, x = [x_lo], [], x_lo
    while x < x_hi:
        kind = classes[rng.choice(len(classes), p=p / p.sum())]
        x = min(x + rng.uniform(0.5, 1.5) * mean_len, x_hi)
        edges.append(x)
        ids.append(kind)
    return Segments(np.asarray(edges), np.asarray(ids))


@dataclass(frozen=True)
class GroundLayout:
    """Ground class by (x, y): bands across the street, split along x per side (0: y < 0, 1: y >= 0)."""

    parking: tuple[Segments, Segments]  # PARKING or ROAD in the parking strip
    green: tuple[Segments, Segments]    # TERRAIN or OTHER_GROUND in the green strip
    dash_phase: float

    @staticmethod
    def height(abs_y: np.ndarray) -> np.ndarray:
        return np.where(abs_y >= PARKING_OUTER, CURB_HEIGHT, 0.0)

    def ground_gid(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Primitive id (index into GROUND_IDS) of the ground at (x, y)."""
        abs_y = np.abs(y)
        left = y >= 0
        raw = np.full(x.shape, TERRAIN, dtype=np.int64)
        for side, in_side in ((0, ~left), (1, left)):
            green = in_side & (abs_y < GREEN_OUTER) & (abs_y >= SIDEWALK_OUTER)
            raw[green] = self.green[side].lookup(x[green])
            strip = in_side & (abs_y < PARKING_OUTER) & (abs_y >= LANE_HALF_WIDTH)
            raw[strip] = self.parking[side].lookup(x[strip])
        raw[(abs_y >= PARKING_OUTER) & (abs_y < SIDEWALK_OUTER)] = SIDEWALK
        road = abs_y < LANE_HALF_WIDTH
        raw[road] = ROAD
        on_line = np.zeros(x.shape, dtype=bool)
        for line_y in LANE_LINES:
            on_line |= np.abs(abs_y - line_y) < MARK_HALF_WIDTH
        dashed = np.mod(x - self.dash_phase, DASH_PERIOD) < DASH_LENGTH
        raw[road & on_line & dashed] = LANE_MARKING
        return _GROUND_GID_OF_RAW[raw]



# --- ego path ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EgoPath:
    """Sensor pose in the scene frame: along +x at constant speed with a slow lane wander,
    heading along the path plus a small wobble, and a little pitch and roll."""

    speed: float
    height: float
    sway_amplitude: float
    sway_wavelength: float
    sway_phase: float
    wobble_rad: float
    wobble_period: float
    tilt_rad: float
    tilt_periods: tuple[float, float]

    def positions(self, times: np.ndarray) -> np.ndarray:
        """Sensor positions (n, 3) at `times`, as `pose` places them."""
        x = self.speed * np.asarray(times, float)
        y = EGO_LANE_Y + self.sway_amplitude * np.sin(2 * math.pi / self.sway_wavelength * x + self.sway_phase)
        return np.column_stack([x, y, np.full(len(x), self.height)])

    def pose(self, t: float) -> np.ndarray:
        x = self.speed * t
        k = 2 * math.pi / self.sway_wavelength
        y = EGO_LANE_Y + self.sway_amplitude * math.sin(k * x + self.sway_phase)
        yaw = math.atan(self.sway_amplitude * k * math.cos(k * x + self.sway_phase))
        yaw += self.wobble_rad * math.sin(2 * math.pi * t / self.wobble_period)
        pitch = self.tilt_rad * math.sin(2 * math.pi * t / self.tilt_periods[0])
        roll = self.tilt_rad * math.sin(2 * math.pi * t / self.tilt_periods[1] + 1.0)
        pose = np.eye(4)
        pose[:3, :3] = rot_z(yaw) @ rot_y(pitch) @ rot_x(roll)
        pose[:3, 3] = (x, y, self.height)
        return pose


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# --- packed primitives (what the ray caster consumes) ----------------------------------------

#: Columns of each primitive kind in PackedPrimitives.
KIND_COLUMNS = {"box": ("gid", "center", "half", "yaw", "pitch"),
                "cylinder": ("gid", "xy", "z0", "z1", "radius"),
                "ellipsoid": ("gid", "center", "semi", "yaw", "pitch"),
                "ring": ("gid", "center", "radius", "inner", "half_width", "yaw")}
_VECTOR_WIDTH = {"center": 3, "half": 3, "semi": 3, "xy": 2}


@dataclass
class PackedPrimitives:
    """Primitives of all objects as flat arrays, grouped by object, in object-local frames.

    `gid` is the global primitive id (ground ids first) indexing the per-primitive tables
    `raw`, `instance`, `albedo`, `roughness`. `start[kind][o]:start[kind][o + 1]` are the
    rows of object o in the arrays of that kind. Each kind's table also holds every row's
    `owner` (object index) and the local axis-aligned bounds of the primitive in its object's
    frame (`part_center`, `part_half`); boxes and ellipsoids hold `group_pitched`: some
    primitive of that kind in the same object is pitched.
    """

    raw: np.ndarray
    instance: np.ndarray
    albedo: np.ndarray
    roughness: np.ndarray
    box: dict
    cylinder: dict
    ellipsoid: dict
    ring: dict
    start: dict
    bound_center: np.ndarray  # (n_obj, 3) local centre of each object's bounding sphere
    bound_radius: np.ndarray  # (n_obj,)
    bound_z: np.ndarray       # (n_obj, 2) lowest and highest local z of each object


def pack_primitives(objects: list[SceneObject]) -> PackedPrimitives:
    raw = [float(r) for r in FIXED_IDS]
    instance = [0] * len(FIXED_IDS)
    albedo = [ALBEDO[r] for r in FIXED_IDS]
    rows = {kind: [] for kind in KIND_COLUMNS}
    owners = {kind: [] for kind in KIND_COLUMNS}
    part_bounds = {kind: [] for kind in KIND_COLUMNS}
    bound_center, bound_radius, bound_z = [], [], []
    for o, obj in enumerate(objects):
        for part in obj.parts:
            part_raw = part.raw if part.raw is not None else obj.raw
            gid = len(raw)
            raw.append(part_raw)
            instance.append(obj.instance)
            albedo.append(ALBEDO[_static_id(part_raw)] * obj.albedo_scale)
            kind, row = _primitive_row(part.shape, gid)
            rows[kind].append(row)
            owners[kind].append(o)
            part_bounds[kind].append(shape_bounds(part.shape))
        lo, hi = obj.local_bounds()
        bound_center.append((lo + hi) / 2)
        bound_radius.append(np.linalg.norm(hi - lo) / 2)
        bound_z.append((lo[2], hi[2]))
    raw_arr = np.asarray(raw, dtype=np.uint32)
    n_obj = len(objects)
    start = {kind: np.searchsorted(np.asarray(owners[kind], dtype=np.int64), np.arange(n_obj + 1)) for kind in rows}
    tables = {kind: _stack_rows(rows[kind], KIND_COLUMNS[kind]) for kind in KIND_COLUMNS}
    for kind, table in tables.items():
        lo_hi = np.asarray(part_bounds[kind], dtype=float).reshape(-1, 2, 3)
        table["owner"] = np.asarray(owners[kind], dtype=np.int64)
        table["part_center"] = (lo_hi[:, 0] + lo_hi[:, 1]) / 2
        table["part_half"] = (lo_hi[:, 1] - lo_hi[:, 0]) / 2
        if "pitch" in table:
            table["group_pitched"] = np.isin(table["owner"], table["owner"][table["pitch"] != 0])
    return PackedPrimitives(
        raw=raw_arr,
        instance=np.asarray(instance, dtype=np.uint32),
        albedo=np.asarray(albedo),
        roughness=np.asarray([ROUGHNESS.get(_static_id(int(r)), 0.0) for r in raw_arr]),
        **tables,
        start=start,
        bound_center=np.asarray(bound_center).reshape(-1, 3),
        bound_radius=np.asarray(bound_radius),
        bound_z=np.asarray(bound_z, dtype=float).reshape(-1, 2),
    )


def _static_id(raw: int) -> int:
    for static, moving in MOVING_ID.items():
        if raw == moving:
            return static
    return raw


def _primitive_row(shape, gid: int) -> tuple[str, tuple]:
    if isinstance(shape, Box):
        return "box", (gid, shape.center, shape.half, shape.yaw, shape.pitch)
    if isinstance(shape, Cylinder):
        return "cylinder", (gid, (shape.x, shape.y), shape.z0, shape.z1, shape.radius)
    if isinstance(shape, Ring):
        return "ring", (gid, shape.center, shape.radius, shape.inner, shape.half_width, shape.yaw)
    return "ellipsoid", (gid, shape.center, shape.semi, shape.yaw, shape.pitch)


def shape_bounds(shape) -> tuple[np.ndarray, np.ndarray]:
    """Local axis-aligned bounds of a primitive (exact unless it is turned in its object)."""
    if isinstance(shape, Cylinder):
        return (np.array([shape.x - shape.radius, shape.y - shape.radius, shape.z0]),
                np.array([shape.x + shape.radius, shape.y + shape.radius, shape.z1]))
    center = np.asarray(shape.center, float)
    if isinstance(shape, Ring):
        ext = np.array([shape.radius, shape.half_width, shape.radius])
        turned = bool(shape.yaw)
    else:
        ext = np.asarray(shape.half if isinstance(shape, Box) else shape.semi, float)
        turned = bool(shape.yaw)
        if shape.pitch:
            ext = np.full(3, np.linalg.norm(ext))
    if turned:
        r_xy = math.hypot(ext[0], ext[1])
        ext = np.array([r_xy, r_xy, ext[2]])
    return center - ext, center + ext


def _stack_rows(rows: list, names: tuple) -> dict:
    if not rows:
        return {n: np.zeros((0, _VECTOR_WIDTH[n])) if n in _VECTOR_WIDTH else np.zeros(0, dtype=np.int64 if n == "gid" else float)
                for n in names}
    return {n: np.asarray(col, dtype=np.int64 if n == "gid" else float) for n, col in zip(names, zip(*rows))}


def half_length(parts) -> float:
    """Half the x extent of an object in its local frame (for spacing vehicles)."""
    return max(max(abs(lo[0]), abs(hi[0])) for lo, hi in (shape_bounds(p.shape) for p in parts))


# --- the scene --------------------------------------------------------------------------------

@dataclass
class Scene:
    config: SynthConfig
    ground: GroundLayout
    ego: EgoPath
    objects: list[SceneObject]
    frame_times: np.ndarray
    packed: PackedPrimitives = field(init=False)

    def __post_init__(self):
        self.packed = pack_primitives(self.objects)
        self._obj_pos0 = np.array([o.position for o in self.objects]).reshape(-1, 3)
        self._obj_vel = np.array([o.velocity for o in self.objects]).reshape(-1, 3)
        self._obj_yaw = np.array([o.yaw for o in self.objects])

    def sensor_pose(self, frame: int) -> np.ndarray:
        """Sensor pose in the scene frame."""
        return self.ego.pose(float(self.frame_times[frame]))

    @property
    def world_from_scene(self) -> np.ndarray:
        """World (= first sensor frame, SemanticKITTI pose frame) from scene coordinates."""
        return np.linalg.inv(self.sensor_pose(0))

    def lidar_poses(self) -> np.ndarray:
        """F x 4 x 4 LiDAR poses in the world frame (the first is the identity)."""
        w = self.world_from_scene
        return np.stack([w @ self.sensor_pose(i) for i in range(len(self.frame_times))])

    def object_state(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(positions (n, 3), headings (n,)) of all objects at time t."""
        return self._obj_pos0 + self._obj_vel * t, self._obj_yaw



def build_scene(config: SynthConfig, rng: np.random.Generator, frames: int) -> Scene:
    """A random street populated around the ego's drive over `frames` scans."""
    duration = config.frame_dt * max(frames - 1, 0)
    travel = config.ego_speed * duration
    length = config.street_length if config.street_length is not None else travel + 2 * (config.max_range + 10)
    if length < travel:
        raise SynthConfigError(f"street_length {length:.0f} m is shorter than the drive ({travel:.0f} m)")
    x_lo, x_hi = travel / 2 - length / 2, travel / 2 + length / 2
    # the parking strip: road or grass verge, with a parking bay in every PARKING_CELL m
    verge = {ROAD: 0.5, TERRAIN: 0.5}
    green = {TERRAIN: 1 - config.other_ground_fraction, OTHER_GROUND: config.other_ground_fraction}
    ground = GroundLayout(
        parking=tuple(with_bays(rng, random_segments(rng, x_lo, x_hi, verge, 30.0), PARKING, config.parking_fraction,
                                PARKING_CELL) for _ in range(2)),
        green=tuple(random_segments(rng, x_lo, x_hi, green, 25.0) for _ in range(2)),
        dash_phase=rng.uniform(0, DASH_PERIOD),
    )
    ego = EgoPath(speed=config.ego_speed, height=config.sensor_height, sway_amplitude=config.sway_amplitude,
                  sway_wavelength=config.sway_wavelength, sway_phase=rng.uniform(0, 2 * math.pi),
                  wobble_rad=math.radians(config.heading_wobble_deg), wobble_period=rng.uniform(4, 8),
                  tilt_rad=math.radians(config.tilt_deg), tilt_periods=(rng.uniform(1.5, 3), rng.uniform(2, 4)))
    populator = _Populator(rng, config, x_lo, x_hi, duration, ground, ego)
    objects = populator.populate()
    return Scene(config, ground, ego, objects, config.frame_dt * np.arange(frames))


class _Populator:
    """Places objects along the street; hands out instance ids to things."""

    def __init__(self, rng, config: SynthConfig, x_lo, x_hi, duration, ground: GroundLayout, ego: EgoPath):
        self.rng, self.cfg = rng, config
        self.x_lo, self.x_hi, self.duration = x_lo, x_hi, duration
        self.ground = ground
        self.times = np.linspace(0.0, duration, max(int(round(duration / config.frame_dt)) + 1, 1))
        self.sensor = ego.positions(self.times)
        self.heavy_share = 0.0  # of the sequence's rays, taken by the heavy vehicles placed so far
        self._taken = (np.zeros((0, 3)), np.zeros((0, 3)))  # street-frame bounds of the parts placed, for `free`
        self.objects: list[SceneObject] = []
        self.next_instance = 1

    def populate(self) -> list[SceneObject]:
        for side in (-1, 1):
            self.property_line(side)
            self.green_strip(side)
            self.street_furniture(side)
            self.parked_vehicles(side)
            self.sidewalk_things(side)
        self.traffic()
        self.ensure_hard_classes()
        return self.objects

    # -- helpers --
    def add(self, raw, parts, x, y, yaw, velocity=(0.0, 0.0), albedo_scale=None):
        is_thing = raw in THING_IDS
        moving = any(velocity)
        if moving:
            raw = MOVING_ID[raw]
        instance = 0
        if is_thing:
            instance = self.next_instance
            self.next_instance += 1
            if instance > 0xFFFF:
                raise SynthConfigError("more than 65535 instances in one sequence: fewer frames or lower densities")
        z = float(GroundLayout.height(np.abs(np.asarray(y))))
        scale = albedo_scale if albedo_scale is not None else self.rng.uniform(0.7, 1.3)
        self.objects.append(SceneObject(raw, instance, np.array([x, y, z], float), float(yaw),
                                        np.array([velocity[0], velocity[1], 0.0], float), parts, scale))

    def positions(self, per_100m: float, min_gap: float, x_lo=None, x_hi=None) -> np.ndarray:
        """Poisson-distributed x positions at least `min_gap` apart."""
        x_lo = self.x_lo if x_lo is None else x_lo
        x_hi = self.x_hi if x_hi is None else x_hi
        n = self.rng.poisson(max(per_100m, 0.0) * max(x_hi - x_lo, 0.0) / 100.0)
        xs = np.sort(self.rng.uniform(x_lo, x_hi, n))
        kept = []
        for x in xs:
            if not kept or x - kept[-1] >= min_gap:
                kept.append(x)
        return np.asarray(kept)

    def across(self, side: int, inner: float, outer: float) -> float:
        """A lateral position between |y| = inner and outer on one side of the street."""
        return side * self.rng.uniform(inner, outer)

    def any_heading(self) -> float:
        return self.rng.uniform(-math.pi, math.pi)

    def along(self) -> float:
        """Heading along the street, either way, slightly off."""
        return self.rng.choice([0.0, math.pi]) + self.rng.normal(0, 0.1)

    # -- stuff --
    def property_line(self, side: int):
        """Lots along the street: a facade right at the property line, or a hedge, fence or
        wall (with driveway gaps) in front of a yard with bushes and trees and, on most lots,
        a building set back behind it.

        The kinds are spread evenly along the side (`Spread`) rather than drawn lot by lot: a
        120-m drive passes about 10 lots on a side, and drawn lot by lot one drive had no
        facade on the ego's side and another five, so a sequence's building share ranged
        0.38-1.08 of SemanticKITTI's (fences 0.30-1.46); spread, every run of lots holds the
        configured fractions to within about one lot."""
        rng, cfg, x = self.rng, self.cfg, self.x_lo - 20
        line = GREEN_OUTER + 0.3
        wall = (1 - cfg.hedge_fraction) * cfg.wall_fraction
        facades = Spread(rng, {True: cfg.facade_fraction, False: 1 - cfg.facade_fraction})
        buildings = Spread(rng, {True: cfg.building_fill, False: 1 - cfg.building_fill})
        boundaries = Spread(rng, {"hedge": cfg.hedge_fraction, "wall": wall, "fence": 1 - cfg.hedge_fraction - wall})
        while x < self.x_hi + 20:
            length = rng.uniform(10.0, 30.0)
            if facades.draw():
                depth = rng.uniform(8.0, 14.0)
                self.add(BUILDING, building_parts(rng, length - rng.uniform(0.0, 2.0), depth), x + length / 2,
                         side * (line + depth / 2), 0.0)
                x += length
                continue
            gap = rng.uniform(3.0, 5.0) if rng.random() < 0.4 else 0.0  # driveway at the lot's start
            a, b = x + gap, x + length
            boundary = boundaries.draw()
            if boundary == "hedge":
                self.add(VEGETATION, hedge_parts(rng, b - a), (a + b) / 2, side * (line + 0.3), 0.0)
            elif boundary == "wall":
                self.add(OTHER_STRUCTURE, wall_parts(rng, b - a), (a + b) / 2, side * (line + 0.2), 0.0)
            else:
                self.add(FENCE, fence_parts(rng, b - a), (a + b) / 2, side * line, 0.0)
            if buildings.draw():
                depth, front = rng.uniform(8.0, 14.0), line + rng.uniform(1.5, 5.0)
                self.add(BUILDING, building_parts(rng, length * rng.uniform(0.7, 0.95), depth), x + length / 2,
                         side * (front + depth / 2), 0.0)
                yard = (line + 1.0, front - 0.5)
            else:
                yard = (line + 1.0, line + 12.0)
            self.yard_plants(side, x, length, yard)
            x += length

    def yard_plants(self, side: int, x: float, length: float, yard: tuple[float, float]):
        """A lot's bushes and trees as one object (stuff has no instances): one bounding sphere
        to cast rays against instead of one per plant."""
        rng = self.rng
        xs = self.positions(self.cfg.yard_plants_per_100m, 2.5, x + 1, x + length - 1)
        if not len(xs):
            return
        mid = x + length / 2
        parts = []
        for tx in xs:
            y = self.across(side, *yard) if yard[1] > yard[0] else side * yard[0]
            builder = tree_parts if rng.random() < 0.35 else bush_parts
            parts += [_moved(p, tx - mid, y - side * yard[0], self.any_heading()) for p in builder(rng)]
        self.add(VEGETATION, parts, mid, side * yard[0], 0.0)

    def green_strip(self, side: int):
        rng, cfg = self.rng, self.cfg
        for x in self.positions(cfg.trees_per_100m, 5.0):
            y = self.across(side, SIDEWALK_OUTER + 0.8, GREEN_OUTER - 0.8)
            self.add(VEGETATION, tree_parts(rng), x, y, self.any_heading())
        for x in self.positions(cfg.bushes_per_100m, 2.0):
            y = self.across(side, SIDEWALK_OUTER + 0.7, GREEN_OUTER - 0.5)
            self.add(VEGETATION, bush_parts(rng), x, y, self.any_heading())

    def street_furniture(self, side: int):
        """Street lights with the arm over the road and signs facing the traffic at the curb;
        bins, benches and bollards on the sidewalk's outer edge."""
        rng, cfg = self.rng, self.cfg
        for x in self.positions(cfg.poles_per_100m, 8.0):
            y = self.across(side, PARKING_OUTER + 0.25, PARKING_OUTER + 0.45)
            self.add(POLE, pole_parts(rng), x, y, -side * math.pi / 2)
        for x in self.positions(cfg.signs_per_100m, 8.0):
            y = self.across(side, PARKING_OUTER + 0.3, PARKING_OUTER + 0.6)
            self.add(TRAFFIC_SIGN, sign_parts(rng), x, y, 0.0 if side < 0 else math.pi, albedo_scale=1.0)
        for x in self.positions(cfg.clutter_per_100m, 2.0):
            y = self.across(side, SIDEWALK_OUTER - 0.5, SIDEWALK_OUTER + 0.5)
            self.add(OTHER_OBJECT, clutter_parts(rng), x, y, self.along())

    def vehicle_kind(self, kinds_weights: dict) -> int:
        kinds = list(kinds_weights)
        w = np.array([kinds_weights[k] for k in kinds], float)
        return kinds[self.rng.choice(len(kinds), p=w / w.sum())]

    def parked_vehicles(self, side: int):
        """Vehicles along the parking spans, motorcycles in some of the gaps."""
        rng, cfg = self.rng, self.cfg
        heavy = cfg.heavy_vehicle_share
        # heavy vehicles park across the street only: beside the ego's lane each would pass
        # within 3 m of the sensor and fill whole scans
        mix = ({CAR: 1 - heavy / 4, TRUCK: heavy / 8, OTHER_VEHICLE: heavy / 8} if side > 0 else {CAR: 1.0})
        y_mid = side * (LANE_HALF_WIDTH + PARKING_OUTER) / 2
        fill = cfg.parked_fill * (1.0 if side > 0 else 0.8)  # beside the ego's lane each fills many scans
        motorcycle_in_gap = min(1.0, cfg.parked_motorcycles_per_100m / 5)
        for a, b in self.ground.parking[0 if side < 0 else 1].spans(PARKING):
            x = a + rng.uniform(0.0, min(3.0, max(b - a - 5.0, 0.0)))
            while True:
                kind = self.vehicle_kind(mix)
                parts = VEHICLE_BUILDERS[kind](rng)
                half = half_length(parts)
                if x + 2 * half > b:
                    break
                if rng.random() < fill:
                    yaw = (0.0 if rng.random() < 0.7 else math.pi) + rng.normal(0, 0.03)
                    y = y_mid + rng.normal(0, 0.1)
                    if self.within_heavy_budget(kind, parts, x + half, y, yaw):  # else its space stays free
                        self.add(kind, parts, x + half, y, yaw)
                    x += 2 * half + rng.uniform(0.6, 2.5)
                else:
                    if rng.random() < motorcycle_in_gap:
                        yaw = side * math.pi / 2 + rng.normal(0, 0.2)
                        self.add(MOTORCYCLE, motorcycle_parts(rng), x + 1.0, y_mid, yaw)
                    x += rng.uniform(3.0, 6.0)

    def sidewalk_things(self, side: int):
        """Parked two-wheelers at the sidewalk's edge, people and waiting riders on it."""
        rng, cfg = self.rng, self.cfg
        for x in self.positions(cfg.parked_bicycles_per_100m, 1.5):
            yaw = side * math.pi / 2 + rng.normal(0, 0.1) if rng.random() < 0.5 else self.along()
            y = self.across(side, SIDEWALK_OUTER - 0.9, SIDEWALK_OUTER - 0.4)
            self.add(BICYCLE, bicycle_parts(rng), x, y, yaw)
        for x in self.positions(cfg.parked_motorcycles_per_100m * 0.5, 2.5):
            self.add(MOTORCYCLE, motorcycle_parts(rng), x, side * (SIDEWALK_OUTER - 0.8), self.along())
        for x in self.positions(cfg.standing_persons_per_100m, 1.0):
            y = self.across(side, PARKING_OUTER + 0.6, SIDEWALK_OUTER - 0.3)
            self.add(PERSON, person_parts(rng), x, y, self.any_heading())
        for x in self.positions(cfg.waiting_bicyclists_per_100m, 3.0):
            y = self.across(side, PARKING_OUTER + 0.7, PARKING_OUTER + 1.2)
            self.add(BICYCLIST, bicyclist_parts(rng), x, y, self.along())
        for x in self.positions(cfg.waiting_motorcyclists_per_100m, 3.0):
            y = self.across(side, LANE_HALF_WIDTH + 0.6, LANE_HALF_WIDTH + 1.2)
            self.add(MOTORCYCLIST, motorcyclist_parts(rng), x, y, self.along())

    def ensure_hard_classes(self):
        """Every hard class near the drive: at least once, and at least `min_hard_per_100m` per
        100 m of drive. Short drives of a rare class would otherwise often have none, and a
        split without a class cannot score it. A missing instance is a static one at a free spot
        (parked, standing or waiting) along the drive; a missing heavy vehicle is parked across
        the street, the first ahead of the drive, the second behind its start (`park_beyond`),
        any further ones (`min_hard_per_100m`) along the drive whatever the heavy budget."""
        rng, travel = self.rng, self.cfg.ego_speed * self.duration
        near = self.classes_near_drive(NEAR_DRIVE_M)
        wanted = max(1, math.ceil(self.cfg.min_hard_per_100m * (travel + NEAR_DRIVE_M) / 100.0))
        for raw, (builder, inner, outer) in GUARANTEED.items():
            heavy = raw in (TRUCK, OTHER_VEHICLE)
            # a heavy vehicle is in view from far: half as many, the first two beyond the ends
            for k in range((math.ceil(wanted / 2) if heavy else wanted) - near.get(raw, 0)):
                parts = builder(rng)
                if heavy and k < 2:
                    self.park_beyond(raw, parts, inner, outer, ahead=k == 0)
                    continue
                for _ in range(50):
                    x = rng.uniform(-NEAR_DRIVE_M / 2, travel + NEAR_DRIVE_M / 2)
                    side = 1 if heavy or rng.random() < 0.6 else -1
                    y = self.across(side, inner, outer)
                    yaw = self.along()
                    if self.free(parts, x, y, yaw):
                        if heavy:
                            self.heavy_share += self.ray_share(parts, x, y, yaw)
                        self.add(raw, parts, x, y, yaw)
                        break

    def park_beyond(self, raw: int, parts, inner: float, outer: float, ahead: bool):
        """A heavy vehicle parked across the street 10-60 m beyond the drive's end (`ahead`) or
        before its start: at the nearest of 50 random free spots whose rays fit the heavy
        budget, else at the farthest free one (every drive shows each class); at the other end
        if that one has no free spot."""
        rng, travel = self.rng, self.cfg.ego_speed * self.duration
        spot = None
        for end, distance in [(e, d) for e in (ahead, not ahead) for d in np.sort(rng.uniform(10.0, 60.0, 50))]:
            if spot is not None and end != ahead:
                break
            x = travel + distance if end else -distance
            y, yaw = self.across(1, inner, outer), rng.choice([0.0, math.pi]) + rng.normal(0, 0.03)  # along the curb
            if not self.free(parts, x, y, yaw):
                continue
            spot = (x, y, yaw, self.ray_share(parts, x, y, yaw))
            if self.heavy_share + spot[3] <= HEAVY_RAY_BUDGET:
                break
        if spot is not None:
            x, y, yaw, share = spot
            self.heavy_share += share
            self.add(raw, parts, x, y, yaw)

    def classes_near_drive(self, distance: float) -> dict:
        """Static raw id -> number of things that come within `distance` (along the street) of
        the ego at some scan."""
        times = np.linspace(0.0, self.duration, max(int(self.duration / self.cfg.frame_dt) + 1, 1))
        ego_x = self.cfg.ego_speed * times
        found: dict[int, int] = {}
        for obj in self.objects:
            if obj.instance:
                x = obj.position[0] + obj.velocity[0] * times
                if np.min(np.abs(x - ego_x)) < distance:
                    raw = _static_id(obj.raw)
                    found[raw] = found.get(raw, 0) + 1
        return found

    def free(self, parts, x: float, y: float, yaw: float) -> bool:
        """No part of another object (where it is at t = 0) within 0.1 m of the candidate's
        bounding box at (x, y), by axis-aligned bounds in the street frame: a tree's crown
        leaves room under it, a fence or a pole beside it."""
        lo, hi = _world_bounds([Part(_bounding_box(parts))], x, y, yaw,
                               float(GroundLayout.height(np.abs(np.asarray(y)))))
        if len(self._taken[0]) < sum(len(obj.parts) for obj in self.objects):
            bounds = [_world_bounds(obj.parts, *obj.position[:2], obj.yaw, obj.position[2]) for obj in self.objects]
            self._taken = tuple(np.concatenate(b) for b in zip(*bounds))
        taken_lo, taken_hi = self._taken
        gap = 0.1
        return not np.any(np.all((taken_lo < hi + gap) & (taken_hi > lo - gap), axis=1))

    def ray_share(self, parts, x: float, y: float, yaw: float, velocity=(0.0, 0.0)) -> float:
        return ray_share(self.cfg, self.sensor, parts, x, y, yaw, velocity, self.times)

    def within_heavy_budget(self, kind: int, parts, x: float, y: float, yaw: float, velocity=(0.0, 0.0)) -> bool:
        """Whether a vehicle may be placed: any but a heavy one may; a heavy one (truck, bus,
        van, trailer) only while the heavy vehicles' rays (`ray_share`) stay within
        HEAVY_RAY_BUDGET of the sequence's, and then it is booked.

        Why: SemanticKITTI's trucks and other vehicles together hold 0.40 % of its points,
        gathered over drives of a thousand scans and more. In a drive of 150 scans one van
        parked 6 m from the sensor's path takes ~1 % of the points and one bus meeting the
        ego in the oncoming lane ~1.8 %, so whether a short drive happens to pass one would
        decide its hard-class share (0.4-2.3 % over 8 drives). A close pass does not fit the
        budget, so they are seen from afar (over the 8 drives most instances beyond 30 m, trucks
        and other vehicles together about half their real share), and `park_beyond` puts the
        missing ones at the nearest spot beyond the drive that fits."""
        if kind not in HEAVY_IDS:
            return True
        share = self.ray_share(parts, x, y, yaw, velocity)
        if self.heavy_share + share > HEAVY_RAY_BUDGET:
            return False
        self.heavy_share += share
        return True

    # -- moving things --
    def spawn_range(self, speed: float) -> tuple[float, float]:
        """Start positions that keep the density steady over the drive despite the motion."""
        shift = speed * self.duration
        return self.x_lo - max(shift, 0.0), self.x_hi - min(shift, 0.0)

    def traffic(self):
        """Cars, heavy vehicles and motorcyclists in the oncoming lane, cars in the ego's lane
        at the ego's speed (so they never reach it), cyclists at the lanes' edges at 3-7 m/s,
        pedestrians walking the sidewalks at 0.8-1.8 m/s."""
        rng, cfg = self.rng, self.cfg
        heavy, moto = cfg.heavy_vehicle_share, cfg.motorcyclist_share
        mix = {CAR: 1 - heavy - moto, TRUCK: heavy * 0.5, BUS: heavy * 0.2, OTHER_VEHICLE: heavy * 0.3,
               MOTORCYCLIST: moto}
        density = cfg.vehicles_per_100m_per_lane
        # the ego's lane keeps pace with the ego: what drives there stays in view for the whole
        # drive, so it holds cars only (a truck ahead would fill every scan)
        self.lane(EGO_LANE_Y, cfg.ego_speed, density, {CAR: 1.0}, gap=6.0, keep_clear=True)
        self.lane(ONCOMING_LANE_Y, -rng.uniform(6.0, 13.0), density, mix, gap=6.0)
        for lane_y, direction, factor in RIDER_LINES:
            speed = direction * rng.uniform(3.0, 7.0)
            self.lane(lane_y, speed, cfg.riders_per_100m_per_lane * factor, {BICYCLIST: 1.0}, gap=3.0)
        for side in (-1, 1):
            for _ in range(rng.poisson(cfg.walking_persons_per_100m * (self.x_hi - self.x_lo) / 100)):
                speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.8)
                a, b = self.spawn_range(speed)
                velocity = (speed, rng.uniform(-0.03, 0.03))
                y = self.across(side, PARKING_OUTER + 0.8, SIDEWALK_OUTER - 0.5)
                heading = math.atan2(velocity[1], velocity[0])
                self.add(PERSON, person_parts(rng, walking=True), rng.uniform(a, b), y, heading, velocity)

    def lane(self, lane_y, speed, per_100m, mix: dict, gap, keep_clear=False):
        """One lane of traffic at a common speed, so its vehicles never overlap (nor, with
        `keep_clear`, come near the ego, which starts at x = 0)."""
        a, b = self.spawn_range(speed)
        heading = 0.0 if speed > 0 else math.pi
        prev_front = -math.inf  # largest x reached by the previous vehicle in the lane
        for x in self.positions(per_100m, 0.0, a, b):
            kind = self.vehicle_kind(mix)
            parts = VEHICLE_BUILDERS[kind](self.rng)
            half = half_length(parts)
            if x - half - prev_front < gap or (keep_clear and abs(x) < half + EGO_CLEARANCE):
                continue
            y = lane_y + self.rng.normal(0, 0.1)
            if not self.within_heavy_budget(kind, parts, x, y, heading, (speed, 0.0)):
                continue
            self.add(kind, parts, x, y, heading, (speed, 0.0))
            prev_front = x + half


#: Where a missing hard class is placed: builder and lateral band (|y|, m).
GUARANTEED = {
    BICYCLE: (bicycle_parts, SIDEWALK_OUTER - 0.9, SIDEWALK_OUTER - 0.4),
    MOTORCYCLE: (motorcycle_parts, SIDEWALK_OUTER - 0.9, SIDEWALK_OUTER - 0.5),
    PERSON: (person_parts, PARKING_OUTER + 0.6, SIDEWALK_OUTER - 0.3),
    BICYCLIST: (bicyclist_parts, PARKING_OUTER + 0.7, PARKING_OUTER + 1.2),
    MOTORCYCLIST: (motorcyclist_parts, LANE_HALF_WIDTH + 0.6, LANE_HALF_WIDTH + 1.2),
    TRUCK: (truck_parts, LANE_HALF_WIDTH + 1.0, LANE_HALF_WIDTH + 1.2),
    OTHER_VEHICLE: (other_vehicle_parts, LANE_HALF_WIDTH + 1.0, LANE_HALF_WIDTH + 1.2),
}


def ray_share(config: SynthConfig, sensor: np.ndarray, parts, x: float, y: float, yaw: float,
              velocity=(0.0, 0.0), times: np.ndarray | None = None) -> float:
    """The share of a sequence's rays that enter an object's bounding box, occlusion aside:
    at each scan (sensor positions (T, 3) at `times`, the object at (x, y) + velocity x t),
    the azimuths spanned by its corners times the beams between the elevations of its lowest
    and highest point; its points (what occlusion, dropout and open structure leave of those
    rays) are fewer."""
    from .lidar import beam_elevations  # lidar builds on this module

    times = np.zeros(len(sensor)) if times is None else np.asarray(times, float)
    lo, hi = _local_bounds(parts)
    half, mid = (hi - lo) / 2, (hi + lo) / 2
    c, s = math.cos(yaw), math.sin(yaw)
    ground = float(GroundLayout.height(np.abs(np.asarray(y))))
    rel = np.column_stack([x + velocity[0] * times + c * mid[0] - s * mid[1] - sensor[:, 0],
                           y + velocity[1] * times + s * mid[0] + c * mid[1] - sensor[:, 1]])   # centre - sensor
    corner = np.array([(sx * half[0], sy * half[1]) for sx in (-1, 1) for sy in (-1, 1)])
    corners = rel[:, None, :] + np.stack([c * corner[:, 0] - s * corner[:, 1], s * corner[:, 0] + c * corner[:, 1]], -1)
    az_mid = np.arctan2(rel[:, 1], rel[:, 0])
    turn = np.mod(np.arctan2(corners[..., 1], corners[..., 0]) - az_mid[:, None] + np.pi, 2 * np.pi) - np.pi
    span = turn.max(axis=1) - turn.min(axis=1)
    local = np.column_stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]])
    near = np.hypot(*np.maximum(np.abs(local) - half[:2], 0.0).T)
    far = np.hypot(corners[..., 0], corners[..., 1]).max(axis=1)
    z_lo, z_hi = ground + lo[2] - sensor[:, 2], ground + hi[2] - sensor[:, 2]
    near_ = np.maximum(near, 0.1)
    el_lo = np.degrees(np.arctan2(z_lo, np.where(z_lo < 0, near_, far)))
    el_hi = np.degrees(np.arctan2(z_hi, np.where(z_hi > 0, near_, far)))
    beams = beam_elevations(config.beams, config.fov_up, config.fov_down)
    rows = ((beams[None] >= el_lo[:, None]) & (beams[None] <= el_hi[:, None])).sum(axis=1)
    share = np.where(near < config.max_range, span / (2 * math.pi) * rows / config.beams, 0.0)
    return float(share.mean())


def _local_bounds(parts) -> tuple[np.ndarray, np.ndarray]:
    bounds = [shape_bounds(part.shape) for part in parts]
    return np.min([b[0] for b in bounds], axis=0), np.max([b[1] for b in bounds], axis=0)


def _bounding_box(parts) -> Box:
    lo, hi = _local_bounds(parts)
    return Box(tuple((lo + hi) / 2), tuple((hi - lo) / 2))


def _world_bounds(parts, x: float, y: float, yaw: float, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds (n, 3) of each part in the street frame, its object at (x, y, z) turned by yaw."""
    bounds = np.array([shape_bounds(part.shape) for part in parts])           # (n, 2, 3)
    mid, half = bounds.mean(axis=1), (bounds[:, 1] - bounds[:, 0]) / 2
    c, s = math.cos(yaw), math.sin(yaw)
    center = np.column_stack([x + c * mid[:, 0] - s * mid[:, 1], y + s * mid[:, 0] + c * mid[:, 1], z + mid[:, 2]])
    extent = np.column_stack([abs(c) * half[:, 0] + abs(s) * half[:, 1], abs(s) * half[:, 0] + abs(c) * half[:, 1],
                              half[:, 2]])
    return center - extent, center + extent


def _moved(part: Part, dx: float, dy: float, yaw: float) -> Part:
    """A plant's part turned by `yaw` about its plant's origin and moved by (dx, dy) within a group."""
    shape = part.shape
    c, si = math.cos(yaw), math.sin(yaw)
    if isinstance(shape, Cylinder):
        x, y = c * shape.x - si * shape.y + dx, si * shape.x + c * shape.y + dy
        return Part(Cylinder(x, y, shape.z0, shape.z1, shape.radius), part.raw)
    cx, cy, cz = shape.center
    center = (c * cx - si * cy + dx, si * cx + c * cy + dy, cz)
    if isinstance(shape, Ellipsoid):
        return Part(Ellipsoid(center, shape.semi, shape.yaw + yaw, shape.pitch), part.raw)
    return Part(Box(center, shape.half, shape.yaw + yaw, shape.pitch), part.raw)
