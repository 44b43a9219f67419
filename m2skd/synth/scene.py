"""Procedural street scene for the synthetic LiDAR: ground regions, objects, ego path.

The street runs along +x of a *scene frame* whose ground is z = 0. Every object is a few
primitives (oriented boxes, vertical cylinders, ellipsoids) in its own local frame, placed by a
position and a heading; moving objects follow position = start + velocity * t with their
heading along the velocity. The LiDAR's world frame (SemanticKITTI's pose frame) is the
sensor frame of the first scan, so its first pose is the identity, as in the real data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import M2SKDError


class SynthConfigError(M2SKDError, ValueError):
    """Impossible simulation settings (reported by the CLI as one line)."""


# --- raw SemanticKITTI ids ------------------------------------------------------------------
CAR, BICYCLE, BUS, MOTORCYCLE, TRUCK, OTHER_VEHICLE = 10, 11, 13, 15, 18, 20
PERSON, BICYCLIST, MOTORCYCLIST = 30, 31, 32
ROAD, PARKING, SIDEWALK, OTHER_GROUND = 40, 44, 48, 49
BUILDING, FENCE, LANE_MARKING = 50, 51, 60
VEGETATION, TRUNK, TERRAIN, POLE, TRAFFIC_SIGN = 70, 71, 72, 80, 81

#: Official moving-* id of each movable class.
MOVING_ID = {CAR: 252, BICYCLIST: 253, PERSON: 254, MOTORCYCLIST: 255, BUS: 257, TRUCK: 258, OTHER_VEHICLE: 259}
#: Classes whose objects carry an instance id ("things").
THING_IDS = frozenset({CAR, BICYCLE, BUS, MOTORCYCLE, TRUCK, OTHER_VEHICLE, PERSON, BICYCLIST, MOTORCYCLIST,
                       *MOVING_ID.values()})

#: Ground classes, in the order of their primitive ids (ground primitives come first).
GROUND_IDS = (ROAD, LANE_MARKING, PARKING, SIDEWALK, OTHER_GROUND, TERRAIN)
_GROUND_GID_OF_RAW = np.zeros(max(GROUND_IDS) + 1, dtype=np.int64)
_GROUND_GID_OF_RAW[list(GROUND_IDS)] = np.arange(len(GROUND_IDS))

#: Base reflectivity per raw id; the LiDAR adds per-object variation, range falloff and noise.
ALBEDO = {ROAD: 0.18, LANE_MARKING: 0.6, PARKING: 0.22, SIDEWALK: 0.3, OTHER_GROUND: 0.26, TERRAIN: 0.36,
          BUILDING: 0.3, FENCE: 0.34, VEGETATION: 0.42, TRUNK: 0.28, POLE: 0.32, TRAFFIC_SIGN: 0.85,
          CAR: 0.3, TRUCK: 0.34, BUS: 0.34, OTHER_VEHICLE: 0.3, BICYCLE: 0.24, MOTORCYCLE: 0.3,
          PERSON: 0.2, BICYCLIST: 0.22, MOTORCYCLIST: 0.24}
#: Extra range noise (m) of rough surfaces: foliage and grass scatter the return.
ROUGHNESS = {VEGETATION: 0.06, TERRAIN: 0.02}

# --- street cross-section (|y|, metres) -----------------------------------------------------
LANE_HALF_WIDTH = 5.25       # road: a lane each way and a bike lane at each edge
PARKING_OUTER = 7.75         # parking strip, then the curb
SIDEWALK_OUTER = 10.25
GREEN_OUTER = 13.25          # terrain strip (grass / gravel), then buildings and yards
CURB_HEIGHT = 0.15           # sidewalk and everything beyond it are raised by this
LANE_LINES = (0.0, 3.5)      # dashed markings at y = 0 and y = +-3.5
MARK_HALF_WIDTH = 0.075
DASH_LENGTH, DASH_PERIOD = 3.0, 9.0
EGO_LANE_Y = -1.75           # right-hand traffic: the ego drives at y < 0 towards +x
ONCOMING_LANE_Y = 1.75
BIKE_LANES = ((-4.4, +1), (4.4, -1))  # (y, direction)
EGO_CLEARANCE = 12.0         # traffic in the ego's lane keeps this far (m) from the ego


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
    # ego motion
    ego_speed: float = 8.0
    frame_dt: float = 0.1
    street_length: float | None = None  # populated length; None: the drive plus the range both ways
    sway_amplitude: float = 0.8          # lateral offset (m) of a slow lane wander
    sway_wavelength: float = 140.0
    heading_wobble_deg: float = 1.0
    tilt_deg: float = 0.4                # pitch/roll amplitude (suspension)
    # static stuff
    building_fill: float = 0.7           # fraction of the building line that is built
    trees_per_100m: float = 10.0
    bushes_per_100m: float = 12.0
    hedges_per_100m: float = 3.0
    poles_per_100m: float = 4.0
    signs_per_100m: float = 3.0
    parking_fraction: float = 0.7        # fraction of the parking strip that is parking (rest: road)
    parked_fill: float = 0.65            # fraction of parking length occupied by parked vehicles
    other_ground_fraction: float = 0.15  # fraction of the green strip that is gravel (other-ground)
    # small static things
    parked_bicycles_per_100m: float = 3.0
    parked_motorcycles_per_100m: float = 1.5
    standing_persons_per_100m: float = 3.0
    waiting_bicyclists_per_100m: float = 0.6
    waiting_motorcyclists_per_100m: float = 0.4
    # moving things
    walking_persons_per_100m: float = 4.0
    vehicles_per_100m_per_lane: float = 1.5
    riders_per_100m_per_lane: float = 1.5
    motorcyclist_share: float = 0.3      # of riders in the bike lanes

    def __post_init__(self):
        if self.beams < 2 or self.azimuth_steps < 8:
            raise SynthConfigError("need at least 2 beams and 8 azimuth steps")
        if not -90 < self.fov_down < self.fov_up < 90:
            raise SynthConfigError("need -90 < fov_down < fov_up < 90 degrees")
        if self.max_range <= 0 or self.frame_dt <= 0 or self.sensor_height <= CURB_HEIGHT:
            raise SynthConfigError("max_range and frame_dt must be positive, the sensor above the curb")
        if not 0 <= self.dropout < 1:
            raise SynthConfigError("dropout must be in [0, 1)")


# --- primitives and objects -------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    center: tuple
    half: tuple
    yaw: float = 0.0


@dataclass(frozen=True)
class Cylinder:
    """Vertical cylinder (objects only turn about z, so it stays vertical)."""

    x: float
    y: float
    z0: float
    z1: float
    radius: float


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple
    semi: tuple
    yaw: float = 0.0


@dataclass(frozen=True)
class Part:
    shape: Box | Cylinder | Ellipsoid
    raw: int | None = None  # overrides the object's class (tree trunk vs crown, sign pole vs board)


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
        bounds = [shape_bounds(part.shape) for part in self.parts]
        return np.min([b[0] for b in bounds], axis=0), np.max([b[1] for b in bounds], axis=0)

    def to_local(self, points: np.ndarray, t: float) -> np.ndarray:
        """Scene-frame points (n, 3) into the object's frame at time t."""
        rel = points - self.position_at(t)
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.column_stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]])


# --- shape builders (local frame: x forward, y left, z up, origin on the ground) -------------

def car_parts(rng) -> list:
    length, width, height = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
    body = Box((0.0, 0.0, 0.62), (length / 2, width / 2, 0.47))
    cabin_h = (height - 1.09) / 2
    cabin = Box((-0.08 * length, 0.0, 1.09 + cabin_h), (0.27 * length, 0.45 * width, cabin_h))
    return [Part(body), Part(cabin)]


def truck_parts(rng) -> list:
    length, top = rng.uniform(7.0, 10.0), rng.uniform(3.2, 3.9)
    cargo_len = length - 2.4
    cargo = Box((-length / 2 + cargo_len / 2, 0.0, (0.55 + top) / 2), (cargo_len / 2, 1.25, (top - 0.55) / 2))
    cab = Box((length / 2 - 1.15, 0.0, 1.65), (1.1, 1.2, 1.25))
    return [Part(cargo), Part(cab)]


def bus_parts(rng) -> list:
    length = rng.uniform(10.0, 12.5)
    return [Part(Box((0.0, 0.0, 1.7), (length / 2, 1.25, 1.4)))]


def other_vehicle_parts(rng) -> list:
    length, width, top = rng.uniform(4.5, 6.0), rng.uniform(1.9, 2.2), rng.uniform(2.2, 2.8)
    return [Part(Box((0.0, 0.0, (0.3 + top) / 2), (length / 2, width / 2, (top - 0.3) / 2)))]


def bicycle_parts(rng=None) -> list:
    """About 1.7 x 0.5 x 1.1 m, mostly thin members: few points even when near."""
    return [Part(Box((0.52, 0.0, 0.34), (0.34, 0.025, 0.34))),
            Part(Box((-0.52, 0.0, 0.34), (0.34, 0.025, 0.34))),
            Part(Box((0.0, 0.0, 0.62), (0.45, 0.04, 0.17))),
            Part(Box((-0.25, 0.0, 0.93), (0.12, 0.07, 0.06))),
            Part(Box((0.45, 0.0, 1.02), (0.05, 0.27, 0.06)))]


def motorcycle_parts(rng=None) -> list:
    """About 2.0 x 0.75 x 1.2 m."""
    return [Part(Box((0.7, 0.0, 0.31), (0.31, 0.06, 0.31))),
            Part(Box((-0.7, 0.0, 0.31), (0.31, 0.06, 0.31))),
            Part(Box((0.0, 0.0, 0.62), (0.6, 0.2, 0.27))),
            Part(Box((-0.1, 0.0, 0.98), (0.45, 0.16, 0.1))),
            Part(Box((0.55, 0.0, 1.12), (0.06, 0.37, 0.06)))]


def person_parts(rng) -> list:
    """About 0.5 m wide and 1.75 m tall (scaled per person): legs, torso, head."""
    s = rng.uniform(0.9, 1.08)
    return [Part(Cylinder(0.0, 0.1, 0.0, 0.85 * s, 0.075)),
            Part(Cylinder(0.0, -0.1, 0.0, 0.85 * s, 0.075)),
            Part(Ellipsoid((0.0, 0.0, 1.17 * s), (0.13, 0.24, 0.34 * s))),
            Part(Ellipsoid((0.0, 0.0, 1.63 * s), (0.1, 0.09, 0.12 * s)))]


def rider_parts(helmet: bool) -> list:
    head = 0.14 if helmet else 0.11
    return [Part(Cylinder(-0.1, 0.14, 0.6, 1.1, 0.07)),
            Part(Cylinder(-0.1, -0.14, 0.6, 1.1, 0.07)),
            Part(Ellipsoid((-0.12, 0.0, 1.38), (0.22, 0.22, 0.3))),
            Part(Ellipsoid((0.05, 0.0, 1.76), (head, head * 0.9, head)))]


def bicyclist_parts(rng=None) -> list:
    return bicycle_parts() + rider_parts(helmet=False)


def motorcyclist_parts(rng=None) -> list:
    return motorcycle_parts() + rider_parts(helmet=True)


def building_parts(rng, length: float, depth: float) -> list:
    height = rng.uniform(5.0, 20.0)
    parts = [Part(Box((0.0, 0.0, height / 2), (length / 2, depth / 2, height / 2)))]
    if rng.random() < 0.3:  # a set-back upper storey
        top = rng.uniform(2.5, 5.0)
        parts.append(Part(Box((0.0, 0.15 * depth, height + top / 2), (0.4 * length, 0.3 * depth, top / 2))))
    return parts


def tree_parts(rng) -> list:
    trunk_top, crown_h = rng.uniform(1.8, 3.5), rng.uniform(1.5, 3.0)
    crown_r = rng.uniform(1.3, 3.0)
    return [Part(Cylinder(0.0, 0.0, 0.0, trunk_top + 0.5, rng.uniform(0.12, 0.3)), raw=TRUNK),
            Part(Ellipsoid((0.0, 0.0, trunk_top + 0.8 * crown_h), (crown_r, crown_r * rng.uniform(0.8, 1.0), crown_h)),
                 raw=VEGETATION)]


def bush_parts(rng) -> list:
    semi = (rng.uniform(0.6, 1.6), rng.uniform(0.5, 1.1), rng.uniform(0.4, 1.0))
    return [Part(Ellipsoid((0.0, 0.0, 0.6 * semi[2]), semi))]


def hedge_parts(rng) -> list:
    length, height = rng.uniform(4.0, 15.0), rng.uniform(0.8, 1.6)
    return [Part(Box((0.0, 0.0, height / 2), (length / 2, 0.4, height / 2)))]


def pole_parts(rng) -> list:
    """A street light: tall cylinder with an arm over the road (local +x)."""
    height = rng.uniform(5.0, 9.0)
    return [Part(Cylinder(0.0, 0.0, 0.0, height, rng.uniform(0.08, 0.14))),
            Part(Box((0.9, 0.0, height - 0.1), (0.9, 0.05, 0.05)))]


def sign_parts(rng) -> list:
    """A sign post (pole) carrying a board facing local +x (traffic)."""
    height = rng.uniform(2.0, 2.6)  # board centre; the field of view ends 2 degrees above the horizon
    board = (Box((0.0, 0.0, height), (0.02, 0.33, 0.33)) if rng.random() < 0.5
             else Ellipsoid((0.0, 0.0, height), (0.02, 0.36, 0.36)))
    return [Part(Cylinder(0.0, 0.0, 0.0, height + 0.35, 0.045), raw=POLE), Part(board, raw=TRAFFIC_SIGN)]


def fence_parts(rng, length: float) -> list:
    height = rng.uniform(1.0, 2.0)
    return [Part(Box((0.0, 0.0, height / 2), (length / 2, 0.03, height / 2)))]


VEHICLE_BUILDERS = {CAR: car_parts, TRUCK: truck_parts, BUS: bus_parts, OTHER_VEHICLE: other_vehicle_parts,
                    MOTORCYCLIST: motorcyclist_parts, BICYCLIST: bicyclist_parts}


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


def random_segments(rng, x_lo, x_hi, main: int, alt: int, main_fraction: float, mean_len: float) -> Segments:
    edges, ids, x = [x_lo], [], x_lo
    while x < x_hi:
        is_main = rng.random() < main_fraction
        x = min(x + rng.uniform(0.5, 1.5) * mean_len, x_hi)
        edges.append(x)
        ids.append(main if is_main else alt)
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

@dataclass
class PackedPrimitives:
    """Primitives of all objects as flat arrays, grouped by object, in object-local frames.

    `gid` is the global primitive id (ground ids first) indexing the per-primitive tables
    `raw`, `instance`, `albedo`, `roughness`. `start[kind][o]:start[kind][o + 1]` are the
    rows of object o in the arrays of that kind.
    """

    raw: np.ndarray
    instance: np.ndarray
    albedo: np.ndarray
    roughness: np.ndarray
    box: dict
    cylinder: dict
    ellipsoid: dict
    start: dict
    bound_center: np.ndarray  # (n_obj, 3) local centre of each object's bounding sphere
    bound_radius: np.ndarray  # (n_obj,)


def pack_primitives(objects: list[SceneObject]) -> PackedPrimitives:
    raw = [float(r) for r in GROUND_IDS]
    instance = [0] * len(GROUND_IDS)
    albedo = [ALBEDO[r] for r in GROUND_IDS]
    rows = {"box": [], "cylinder": [], "ellipsoid": []}
    owners = {"box": [], "cylinder": [], "ellipsoid": []}
    bound_center, bound_radius = [], []
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
        lo, hi = obj.local_bounds()
        bound_center.append((lo + hi) / 2)
        bound_radius.append(np.linalg.norm(hi - lo) / 2)
    raw_arr = np.asarray(raw, dtype=np.uint32)
    n_obj = len(objects)
    start = {kind: np.searchsorted(np.asarray(owners[kind], dtype=np.int64), np.arange(n_obj + 1)) for kind in rows}
    return PackedPrimitives(
        raw=raw_arr,
        instance=np.asarray(instance, dtype=np.uint32),
        albedo=np.asarray(albedo),
        roughness=np.asarray([ROUGHNESS.get(_static_id(int(r)), 0.0) for r in raw_arr]),
        box=_stack_rows(rows["box"], ("gid", "center", "half", "yaw")),
        cylinder=_stack_rows(rows["cylinder"], ("gid", "xy", "z0", "z1", "radius")),
        ellipsoid=_stack_rows(rows["ellipsoid"], ("gid", "center", "semi", "yaw")),
        start=start,
        bound_center=np.asarray(bound_center).reshape(-1, 3),
        bound_radius=np.asarray(bound_radius),
    )


def _static_id(raw: int) -> int:
    for static, moving in MOVING_ID.items():
        if raw == moving:
            return static
    return raw


def _primitive_row(shape, gid: int) -> tuple[str, tuple]:
    if isinstance(shape, Box):
        return "box", (gid, np.asarray(shape.center, float), np.asarray(shape.half, float), shape.yaw)
    if isinstance(shape, Cylinder):
        return "cylinder", (gid, (shape.x, shape.y), shape.z0, shape.z1, shape.radius)
    return "ellipsoid", (gid, np.asarray(shape.center, float), np.asarray(shape.semi, float), shape.yaw)


def shape_bounds(shape) -> tuple[np.ndarray, np.ndarray]:
    """Local axis-aligned bounds of a primitive (exact unless it is turned in its object)."""
    if isinstance(shape, Cylinder):
        return (np.array([shape.x - shape.radius, shape.y - shape.radius, shape.z0]),
                np.array([shape.x + shape.radius, shape.y + shape.radius, shape.z1]))
    center = np.asarray(shape.center, float)
    ext = np.asarray(shape.half if isinstance(shape, Box) else shape.semi, float)
    if shape.yaw:
        r_xy = math.hypot(ext[0], ext[1])
        ext = np.array([r_xy, r_xy, ext[2]])
    return center - ext, center + ext


def _stack_rows(rows: list, names: tuple) -> dict:
    if not rows:
        widths = {"center": 3, "half": 3, "semi": 3, "xy": 2}
        return {n: (np.zeros((0, widths[n])) if n in widths else np.zeros(0, dtype=np.int64 if n == "gid" else float))
                for n in names}
    cols = list(zip(*rows))
    out = {n: np.asarray(col, dtype=np.int64 if n == "gid" else float) for n, col in zip(names, cols)}
    return out


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
    ground = GroundLayout(
        parking=tuple(random_segments(rng, x_lo, x_hi, PARKING, ROAD, config.parking_fraction, 40.0) for _ in range(2)),
        green=tuple(random_segments(rng, x_lo, x_hi, TERRAIN, OTHER_GROUND, 1 - config.other_ground_fraction, 25.0)
                    for _ in range(2)),
        dash_phase=rng.uniform(0, DASH_PERIOD),
    )
    ego = EgoPath(speed=config.ego_speed, height=config.sensor_height, sway_amplitude=config.sway_amplitude,
                  sway_wavelength=config.sway_wavelength, sway_phase=rng.uniform(0, 2 * math.pi),
                  wobble_rad=math.radians(config.heading_wobble_deg), wobble_period=rng.uniform(4, 8),
                  tilt_rad=math.radians(config.tilt_deg), tilt_periods=(rng.uniform(1.5, 3), rng.uniform(2, 4)))
    populator = _Populator(rng, config, x_lo, x_hi, duration, ground)
    objects = populator.populate()
    return Scene(config, ground, ego, objects, config.frame_dt * np.arange(frames))


class _Populator:
    """Places objects along the street; hands out instance ids to things."""

    def __init__(self, rng, config: SynthConfig, x_lo, x_hi, duration, ground: GroundLayout):
        self.rng, self.cfg = rng, config
        self.x_lo, self.x_hi, self.duration = x_lo, x_hi, duration
        self.ground = ground
        self.objects: list[SceneObject] = []
        self.next_instance = 1

    def populate(self) -> list[SceneObject]:
        for side in (-1, 1):
            self.buildings_and_fences(side)
            self.green_strip(side)
            self.street_furniture(side)
            self.parked_vehicles(side)
            self.sidewalk_things(side)
        self.traffic()
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
        n = self.rng.poisson(max(per_100m, 0.0) * (x_hi - x_lo) / 100.0)
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
    def buildings_and_fences(self, side: int):
        rng, x = self.rng, self.x_lo - 20
        while x < self.x_hi + 20:
            length = rng.uniform(8.0, 35.0)
            middle = x + length / 2
            if rng.random() < self.cfg.building_fill:
                depth, front = rng.uniform(8.0, 16.0), GREEN_OUTER + rng.uniform(0.0, 2.0)
                self.add(BUILDING, building_parts(rng, length, depth), middle, side * (front + depth / 2), 0.0)
            else:  # a yard: fence along the street, vegetation behind
                self.add(FENCE, fence_parts(rng, length), middle, side * (GREEN_OUTER + 0.2), 0.0)
                for tx in self.positions(15.0, 4.0, x + 1, x + length - 1):
                    builder = tree_parts if rng.random() < 0.5 else bush_parts
                    y = self.across(side, GREEN_OUTER + 2.0, GREEN_OUTER + 10.0)
                    self.add(VEGETATION, builder(rng), tx, y, self.any_heading())
            x += length + rng.uniform(1.0, 6.0)

    def green_strip(self, side: int):
        rng, cfg = self.rng, self.cfg
        for x in self.positions(cfg.trees_per_100m, 5.0):
            y = self.across(side, SIDEWALK_OUTER + 1.0, GREEN_OUTER - 1.0)
            self.add(VEGETATION, tree_parts(rng), x, y, self.any_heading())
        for x in self.positions(cfg.bushes_per_100m, 2.0):
            y = self.across(side, SIDEWALK_OUTER + 0.7, GREEN_OUTER - 0.5)
            self.add(VEGETATION, bush_parts(rng), x, y, self.any_heading())
        for x in self.positions(cfg.hedges_per_100m, 16.0):
            self.add(VEGETATION, hedge_parts(rng), x, side * (GREEN_OUTER - 0.6), 0.0)

    def street_furniture(self, side: int):
        """Street lights with the arm over the road, and signs facing the traffic, at the curb."""
        rng, cfg = self.rng, self.cfg
        for x in self.positions(cfg.poles_per_100m, 8.0):
            y = self.across(side, PARKING_OUTER + 0.25, PARKING_OUTER + 0.45)
            self.add(POLE, pole_parts(rng), x, y, -side * math.pi / 2)
        for x in self.positions(cfg.signs_per_100m, 8.0):
            y = self.across(side, PARKING_OUTER + 0.3, PARKING_OUTER + 0.6)
            self.add(TRAFFIC_SIGN, sign_parts(rng), x, y, 0.0 if side < 0 else math.pi, albedo_scale=1.0)

    def parked_vehicles(self, side: int):
        """Vehicles along the parking spans, motorcycles in some of the gaps."""
        rng, cfg = self.rng, self.cfg
        kinds = [CAR, TRUCK, BUS, OTHER_VEHICLE]
        weights = np.array([0.86, 0.05, 0.04, 0.05])
        y_mid = side * (LANE_HALF_WIDTH + PARKING_OUTER) / 2
        motorcycle_in_gap = min(1.0, cfg.parked_motorcycles_per_100m / 5)
        for a, b in self.ground.parking[0 if side < 0 else 1].spans(PARKING):
            x = a + rng.uniform(0.0, 3.0)
            while True:
                kind = kinds[rng.choice(len(kinds), p=weights)]
                parts = VEHICLE_BUILDERS[kind](rng)
                half_len = _half_length(parts)
                if x + 2 * half_len > b:
                    break
                if rng.random() < cfg.parked_fill:
                    yaw = (0.0 if rng.random() < 0.7 else math.pi) + rng.normal(0, 0.03)
                    self.add(kind, parts, x + half_len, y_mid + rng.normal(0, 0.1), yaw)
                    x += 2 * half_len + rng.uniform(0.6, 2.5)
                else:
                    if rng.random() < motorcycle_in_gap:
                        yaw = side * math.pi / 2 + rng.normal(0, 0.2)
                        self.add(MOTORCYCLE, motorcycle_parts(), x + 1.0, y_mid, yaw)
                    x += rng.uniform(3.0, 6.0)

    def sidewalk_things(self, side: int):
        """Parked two-wheelers near the green strip, people and waiting riders on the sidewalk."""
        rng, cfg = self.rng, self.cfg
        for x in self.positions(cfg.parked_bicycles_per_100m, 1.5):
            yaw = side * math.pi / 2 + rng.normal(0, 0.1) if rng.random() < 0.6 else self.along()
            y = self.across(side, SIDEWALK_OUTER - 0.9, SIDEWALK_OUTER - 0.4)
            self.add(BICYCLE, bicycle_parts(), x, y, yaw)
        for x in self.positions(cfg.parked_motorcycles_per_100m * 0.5, 2.5):
            self.add(MOTORCYCLE, motorcycle_parts(), x, side * (SIDEWALK_OUTER - 0.8), self.along())
        for x in self.positions(cfg.standing_persons_per_100m, 1.0):
            y = self.across(side, PARKING_OUTER + 0.8, SIDEWALK_OUTER - 0.3)
            self.add(PERSON, person_parts(rng), x, y, self.any_heading())
        for x in self.positions(cfg.waiting_bicyclists_per_100m, 3.0):
            y = self.across(side, PARKING_OUTER + 0.9, PARKING_OUTER + 1.4)
            self.add(BICYCLIST, bicyclist_parts(), x, y, self.along())
        for x in self.positions(cfg.waiting_motorcyclists_per_100m, 3.0):
            y = self.across(side, PARKING_OUTER + 1.0, PARKING_OUTER + 1.5)
            self.add(MOTORCYCLIST, motorcyclist_parts(), x, y, self.along())

    # -- moving things --
    def spawn_range(self, speed: float) -> tuple[float, float]:
        """Start positions that keep the density steady over the drive despite the motion."""
        shift = speed * self.duration
        return self.x_lo - max(shift, 0.0), self.x_hi - min(shift, 0.0)

    def traffic(self):
        rng, cfg = self.rng, self.cfg
        kinds = [CAR, TRUCK, BUS, OTHER_VEHICLE, MOTORCYCLIST]
        weights = np.array([0.78, 0.07, 0.04, 0.04, 0.07])
        # the ego's lane moves at the ego's speed (following traffic), so it never reaches the ego
        density = cfg.vehicles_per_100m_per_lane
        self.lane(EGO_LANE_Y, cfg.ego_speed, density, kinds, weights, gap=6.0, keep_clear=True)
        self.lane(ONCOMING_LANE_Y, -rng.uniform(6.0, 13.0), density, kinds, weights, gap=6.0)
        riders = np.array([1 - cfg.motorcyclist_share, cfg.motorcyclist_share])
        for lane_y, direction in BIKE_LANES:
            speed = direction * rng.uniform(3.0, 6.0)
            self.lane(lane_y, speed, cfg.riders_per_100m_per_lane, [BICYCLIST, MOTORCYCLIST], riders, gap=3.0)
        for side in (-1, 1):
            for _ in range(rng.poisson(cfg.walking_persons_per_100m * (self.x_hi - self.x_lo) / 100)):
                speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.6)
                a, b = self.spawn_range(speed)
                velocity = (speed, rng.uniform(-0.03, 0.03))
                y = self.across(side, PARKING_OUTER + 1.0, SIDEWALK_OUTER - 0.5)
                heading = math.atan2(velocity[1], velocity[0])
                self.add(PERSON, person_parts(rng), rng.uniform(a, b), y, heading, velocity)

    def lane(self, lane_y, speed, per_100m, kinds, weights, gap, keep_clear=False):
        """One lane of traffic at a common speed, so its vehicles never overlap (nor, with
        `keep_clear`, come near the ego, which starts at x = 0)."""
        a, b = self.spawn_range(speed)
        heading = 0.0 if speed > 0 else math.pi
        prev_front = -math.inf  # largest x reached by the previous vehicle in the lane
        for x in self.positions(per_100m, 0.0, a, b):
            kind = kinds[self.rng.choice(len(kinds), p=weights / weights.sum())]
            parts = VEHICLE_BUILDERS[kind](self.rng)
            half = _half_length(parts)
            if x - half - prev_front < gap or (keep_clear and abs(x) < half + EGO_CLEARANCE):
                continue
            self.add(kind, parts, x, lane_y + self.rng.normal(0, 0.1), heading, (speed, 0.0))
            prev_front = x + half


def _half_length(parts) -> float:
    """Half the x extent of a vehicle in its local frame."""
    ends = []
    for p in parts:
        s = p.shape
        if isinstance(s, Box):
            ends += [abs(s.center[0]) + s.half[0]]
        elif isinstance(s, Ellipsoid):
            ends += [abs(s.center[0]) + s.semi[0]]
        else:
            ends += [abs(s.x) + s.radius]
    return max(ends)
