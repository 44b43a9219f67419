"""Object shapes at real dimensions, built from the parts a 64-beam scan resolves.

Local frame of an object: x forward, y left, z up, origin on the ground under its centre.
Primitives turn about z (yaw) and boxes and ellipsoids also about their own y (pitch), which
is enough for inclined frame tubes, forks, limbs and leaning riders. Wheels are rings (tyre
and rim around an empty hub area), vehicle cabins are pillars and a roof around window
openings that return nothing, as glass mostly does for a 905 nm LiDAR.

Dimensions follow common vehicle and body sizes: a road bicycle (wheel radius 0.34 m,
wheelbase ~1.05 m, tubes ~3.5 cm), a motorcycle (wheel radius ~0.31 m, wheelbase ~1.4 m),
adults 1.50-1.95 m tall, cars 3.9-4.8 m, rigid trucks 7-10 m at 2.5 m width, city buses
10-12.5 m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# --- raw SemanticKITTI ids ------------------------------------------------------------------
UNLABELED, OUTLIER = 0, 1
CAR, BICYCLE, BUS, MOTORCYCLE, TRUCK, OTHER_VEHICLE = 10, 11, 13, 15, 18, 20
PERSON, BICYCLIST, MOTORCYCLIST = 30, 31, 32
ROAD, PARKING, SIDEWALK, OTHER_GROUND = 40, 44, 48, 49
BUILDING, FENCE, OTHER_STRUCTURE, LANE_MARKING = 50, 51, 52, 60
VEGETATION, TRUNK, TERRAIN, POLE, TRAFFIC_SIGN, OTHER_OBJECT = 70, 71, 72, 80, 81, 99


@dataclass(frozen=True)
class Box:
    center: tuple
    half: tuple
    yaw: float = 0.0
    pitch: float = 0.0  # about the box's own y, applied before yaw


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
    pitch: float = 0.0


@dataclass(frozen=True)
class Ring:
    """A wheel: the solid between radii `inner` and `radius` about a horizontal axis (local y
    turned by yaw), `half_width` either side of its centre plane."""

    center: tuple
    radius: float
    inner: float
    half_width: float
    yaw: float = 0.0


@dataclass(frozen=True)
class Part:
    shape: Box | Cylinder | Ellipsoid | Ring
    raw: int | None = None  # overrides the object's class (tree trunk vs crown, rider's vehicle)


def tube(p0, p1, radius: float, y: float = 0.0) -> Box:
    """A straight member from p0 to p1 (x, z in the object's x-z plane) of square section."""
    (x0, z0), (x1, z1) = p0, p1
    length = math.hypot(x1 - x0, z1 - z0)
    return Box(((x0 + x1) / 2, y, (z0 + z1) / 2), (length / 2, radius, radius), pitch=math.atan2(-(z1 - z0), x1 - x0))


def limb(p0, p1, radius: float, y: float = 0.0, depth: float | None = None) -> Ellipsoid:
    """A limb from p0 to p1 (x, z) as an ellipsoid whose long axis joins them."""
    (x0, z0), (x1, z1) = p0, p1
    length = math.hypot(x1 - x0, z1 - z0)
    return Ellipsoid(((x0 + x1) / 2, y, (z0 + z1) / 2), (depth or radius, radius, length / 2 + radius / 2),
                     pitch=math.atan2(x1 - x0, z1 - z0))


def across(x: float, z: float, half_y: float, radius: float) -> Box:
    """A member across the object (handlebar, axle) at (x, z)."""
    return Box((x, 0.0, z), (radius, half_y, radius))


# --- two-wheelers -----------------------------------------------------------------------------

def bicycle_parts(rng) -> list:
    """Road/city bicycle, ~1.7 x 0.6 x 1.05 m: two tyres, a diamond frame of thin tubes, fork,
    handlebar and saddle. Seen side-on most rays pass through the wheels and the frame."""
    r = rng.uniform(0.31, 0.35)
    base = rng.uniform(0.98, 1.1)
    fx, rx = base / 2, -base / 2
    bb = (0.0, 0.28)
    seat_top, head_top = (-0.14, r + 0.5), (fx - 0.14, r + 0.5)
    head_bottom = (fx - 0.11, r + 0.33)
    t = 0.018
    parts = [Ring((fx, 0.0, r), r, r - 0.045, 0.016), Ring((rx, 0.0, r), r, r - 0.045, 0.016),
             Box((fx, 0.0, r), (0.03, 0.05, 0.03)), Box((rx, 0.0, r), (0.03, 0.07, 0.03)),  # hubs
             tube(bb, head_bottom, t), tube(bb, seat_top, t), tube(seat_top, head_top, t),
             tube(bb, (rx, r), 0.012, y=0.05), tube(bb, (rx, r), 0.012, y=-0.05),
             tube(seat_top, (rx, r), 0.01, y=0.05), tube(seat_top, (rx, r), 0.01, y=-0.05),
             tube(head_bottom, (fx, r), 0.015), tube(head_bottom, head_top, 0.02),
             Box((bb[0], 0.0, bb[1]), (0.1, 0.09, 0.02)),  # cranks and chainring
             across(head_top[0] - 0.02, head_top[1] + 0.12, rng.uniform(0.2, 0.3), 0.013),
             tube(head_top, (head_top[0] - 0.02, head_top[1] + 0.12), 0.015),
             Box((seat_top[0] - 0.03, 0.0, seat_top[1] + 0.06), (0.13, 0.07, 0.03))]
    return [Part(p) for p in parts]


def motorcycle_parts(rng) -> list:
    """~2.1 x 0.8 x 1.15 m: wide tyres on cast wheels (hub and three spokes), engine block,
    tank, seat, fork legs, handlebar, exhaust."""
    r = rng.uniform(0.29, 0.33)
    base = rng.uniform(1.35, 1.5)
    fx, rx = base / 2, -base / 2
    parts = []
    for x in (fx, rx):
        parts.append(Ring((x, 0.0, r), r, r - 0.1, 0.065))
        parts.append(Box((x, 0.0, r), (0.06, 0.07, 0.06)))
        for k in range(3):
            a = k * math.pi / 3 + rng.uniform(0, math.pi / 3)
            parts.append(Box((x, 0.0, r), (r - 0.1, 0.015, 0.02), pitch=a))
    engine_h = rng.uniform(0.3, 0.4)
    parts += [Box((0.0, 0.0, 0.28 + engine_h / 2), (0.3, 0.17, engine_h / 2)),
              Box((0.12, 0.0, 0.85), (0.25, 0.16, 0.1)),                       # tank
              Box((-0.35, 0.0, 0.82), (0.3, 0.14, 0.05)),                      # seat
              tube((fx, r), (fx - 0.22, 0.95), 0.025, y=0.09), tube((fx, r), (fx - 0.22, 0.95), 0.025, y=-0.09),
              across(fx - 0.25, 1.02, 0.36, 0.015),
              Box((-0.2, 0.2, 0.4), (0.35, 0.045, 0.045), pitch=-0.2),        # exhaust
              tube((0.0, 0.4), (rx, r), 0.035, y=0.11)]                         # swingarm
    return [Part(p) for p in parts]


# --- people -----------------------------------------------------------------------------------

def _body(rng) -> tuple[float, float]:
    """(height scale, width scale) of an adult."""
    height = float(np.clip(rng.normal(1.72, 0.09), 1.5, 1.95))
    return height / 1.75, rng.uniform(0.85, 1.15)


def person_parts(rng, walking: bool = False) -> list:
    """Legs, torso, arms and head; a walker mid-stride, a stander with legs apart or together."""
    s, w = _body(rng)
    hip, shoulder = 0.9 * s, 1.42 * s
    stride = rng.uniform(0.25, 0.45) if walking else rng.uniform(0.0, 0.08)
    leg = 0.88 * s
    parts = []
    for side, sign in ((0.1 * w, 1.0), (-0.1 * w, -1.0)):
        foot = (sign * leg * math.sin(stride), hip - leg * math.cos(stride))
        parts.append(limb((0.0, hip), foot, 0.075 * w, y=side, depth=0.08))
        arm = 0.62 * s
        swing = -sign * (0.6 * stride + rng.uniform(0.0, 0.15))
        hand = (arm * math.sin(swing), shoulder - arm * math.cos(swing))
        parts.append(limb((0.0, shoulder), hand, 0.045 * w, y=side * 2.3))
    parts.append(Ellipsoid((0.0, 0.0, 1.18 * s), (0.12 * w, 0.19 * w, 0.3 * s)))
    parts.append(Ellipsoid((0.02, 0.0, 1.63 * s), (0.1, 0.085, 0.12 * s)))
    return [Part(p) for p in parts]


def _rider(rng, hip, shoulder, hand, foot, helmet: bool) -> list:
    """A seated rider: thighs and shins to the pedals/pegs, torso leaning to the hands."""
    s, w = _body(rng)
    hip = (hip[0], hip[1])
    knee = ((hip[0] + foot[0]) / 2 + 0.22 * s, (hip[1] + foot[1]) / 2 + 0.12 * s)
    torso_top = (shoulder[0] * s, hip[1] + (shoulder[1] - hip[1]) * s)
    parts = []
    for side in (0.13 * w, -0.13 * w):
        parts += [limb(hip, knee, 0.075 * w, y=side), limb(knee, foot, 0.06 * w, y=side),
                  limb(torso_top, hand, 0.045 * w, y=side * 1.4)]
    parts.append(limb(hip, torso_top, 0.19 * w, depth=0.13 * w))
    head = 0.14 if helmet else 0.11
    lean = math.atan2(torso_top[0] - hip[0], torso_top[1] - hip[1])
    neck = 0.22 * s
    parts.append(Ellipsoid((torso_top[0] + neck * math.sin(lean), 0.0, torso_top[1] + neck * math.cos(lean)),
                           (head, head * 0.9, head)))
    return [Part(p) for p in parts]


def bicyclist_parts(rng) -> list:
    """A bicycle with its rider (all labelled bicyclist, as SemanticKITTI does)."""
    bike = bicycle_parts(rng)
    return bike + _rider(rng, hip=(-0.16, 0.98), shoulder=(0.22, 1.45), hand=(0.42, 1.02), foot=(0.02, 0.3),
                         helmet=rng.random() < 0.5)


def motorcyclist_parts(rng) -> list:
    return motorcycle_parts(rng) + _rider(rng, hip=(-0.3, 0.92), shoulder=(-0.12, 1.5), hand=(0.45, 1.05),
                                          foot=(0.0, 0.35), helmet=True)


# --- vehicles ---------------------------------------------------------------------------------

def cabin(x0: float, x1: float, z0: float, z1: float, half_w: float, pillars: int = 3) -> list:
    """Roof and pillars of a glazed cabin from x0 to x1; the windows between are open."""
    xs = np.linspace(x0 + 0.06, x1 - 0.06, pillars)
    parts = [Box(((x0 + x1) / 2, 0.0, z1 - 0.04), ((x1 - x0) / 2, half_w, 0.04))]
    for x in xs:
        for y in (half_w - 0.04, -half_w + 0.04):
            parts.append(Box((float(x), y, (z0 + z1) / 2), (0.06, 0.04, (z1 - z0) / 2)))
    return parts


def car_parts(rng) -> list:
    length, width, height = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.42, 1.56)
    belt = 0.95
    body = Box((0.0, 0.0, (0.18 + belt) / 2), (length / 2, width / 2, (belt - 0.18) / 2))
    parts = [body] + cabin(-0.36 * length, 0.2 * length, belt, height, 0.44 * width)
    return [Part(p) for p in parts]


def truck_parts(rng) -> list:
    """Rigid truck: cab with windscreen and side windows, chassis rails, rear wheels, and a
    closed box or an open flatbed with low side boards."""
    length, half_w = rng.uniform(7.0, 10.0), 1.25
    cab_len, cab_top = 2.2, rng.uniform(2.8, 3.2)
    front = length / 2
    parts = [Box((front - cab_len / 2, 0.0, 1.2), (cab_len / 2, half_w, 0.75))]
    parts += cabin(front - cab_len + 0.1, front - 0.05, 1.95, cab_top, half_w - 0.02, pillars=2)
    rear_len = length - cab_len - 0.2
    rear_mid = -length / 2 + rear_len / 2
    parts += [Box((0.0, 0.45, 0.85), (length / 2 - 0.2, 0.08, 0.13)), Box((0.0, -0.45, 0.85), (length / 2 - 0.2, 0.08, 0.13))]
    for x in (front - 1.2, -length / 2 + 1.6):
        for y in (half_w - 0.15, -half_w + 0.15):
            parts.append(Ring((x, y, 0.5), 0.5, 0.3, 0.15))
    if rng.random() < 0.55:  # box body
        top = rng.uniform(3.4, 3.9)
        parts.append(Box((rear_mid, 0.0, (1.1 + top) / 2), (rear_len / 2, half_w, (top - 1.1) / 2)))
    else:  # flatbed with side boards
        parts.append(Box((rear_mid, 0.0, 1.15), (rear_len / 2, half_w, 0.06)))
        for y in (half_w - 0.03, -half_w + 0.03):
            parts.append(Box((rear_mid, y, 1.45), (rear_len / 2, 0.03, 0.25)))
        parts.append(Box((-length / 2 + 0.03, 0.0, 1.45), (0.03, half_w, 0.25)))
    return [Part(p) for p in parts]


def bus_parts(rng) -> list:
    """City bus: body below the window band, pillars every ~1.4 m, roof."""
    length, half_w = rng.uniform(10.0, 12.5), 1.27
    parts = [Box((0.0, 0.0, 0.75), (length / 2, half_w, 0.5))]
    parts += cabin(-length / 2, length / 2, 1.25, 3.0, half_w, pillars=int(length / 1.4) + 1)
    return [Part(p) for p in parts]


def other_vehicle_parts(rng) -> list:
    """A van (tall body, glazed cab), or a trailer: drawbar, chassis, wheels and an open frame
    or a low box."""
    if rng.random() < 0.55:
        length, width, top = rng.uniform(4.8, 6.0), rng.uniform(1.9, 2.1), rng.uniform(2.2, 2.7)
        parts = [Box((-0.25 * length + 0.1, 0.0, (0.3 + top) / 2), (0.25 * length + 0.15, width / 2, (top - 0.3) / 2)),
                 Box((0.3 * length, 0.0, 0.65), (0.2 * length, width / 2, 0.4))]
        parts += cabin(0.1 * length, 0.45 * length, 1.05, top - 0.05, width / 2 - 0.02, pillars=2)
        return [Part(p) for p in parts]
    length, half_w = rng.uniform(3.0, 6.0), rng.uniform(0.9, 1.2)
    parts = [tube((length / 2, 0.45), (length / 2 + 1.0, 0.45), 0.04),
             Box((0.0, 0.0, 0.55), (length / 2, half_w, 0.05))]
    for y in (half_w + 0.1, -half_w - 0.1):
        parts.append(Ring((0.0, y, 0.33), 0.33, 0.2, 0.09))
    if rng.random() < 0.5:  # open frame: corner posts and top rails
        h = rng.uniform(0.8, 1.5)
        for x in (length / 2 - 0.04, -length / 2 + 0.04):
            for y in (half_w - 0.04, -half_w + 0.04):
                parts.append(Box((x, y, 0.6 + h / 2), (0.04, 0.04, h / 2)))
        for y in (half_w - 0.04, -half_w + 0.04):
            parts.append(Box((0.0, y, 0.6 + h), (length / 2, 0.04, 0.04)))
    else:
        parts.append(Box((0.0, 0.0, 0.9), (length / 2, half_w, 0.3)))
    return [Part(p) for p in parts]


# --- stuff ------------------------------------------------------------------------------------

def building_parts(rng, length: float, depth: float) -> list:
    height = rng.uniform(5.0, 14.0)
    parts = [Part(Box((0.0, 0.0, height / 2), (length / 2, depth / 2, height / 2)))]
    if rng.random() < 0.3:  # a set-back upper storey
        top = rng.uniform(2.5, 4.0)
        parts.append(Part(Box((0.0, 0.15 * depth, height + top / 2), (0.4 * length, 0.3 * depth, top / 2))))
    return parts


def tree_parts(rng) -> list:
    trunk_top, crown_h = rng.uniform(1.2, 2.6), rng.uniform(2.0, 4.0)
    crown_r = rng.uniform(1.6, 3.4)
    return [Part(Cylinder(0.0, 0.0, 0.0, trunk_top + 0.5, rng.uniform(0.12, 0.3)), raw=TRUNK),
            Part(Ellipsoid((0.0, 0.0, trunk_top + 0.8 * crown_h), (crown_r, crown_r * rng.uniform(0.8, 1.0), crown_h)),
                 raw=VEGETATION)]


def bush_parts(rng) -> list:
    semi = (rng.uniform(0.7, 2.0), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.3))
    return [Part(Ellipsoid((0.0, 0.0, 0.6 * semi[2]), semi))]


def hedge_parts(rng, length: float | None = None) -> list:
    length = length if length is not None else rng.uniform(4.0, 15.0)
    height, depth = rng.uniform(1.0, 2.2), rng.uniform(0.5, 1.0)
    return [Part(Box((0.0, 0.0, height / 2), (length / 2, depth / 2, height / 2)))]


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
    height = rng.uniform(1.2, 2.0)
    return [Part(Box((0.0, 0.0, height / 2), (length / 2, 0.03, height / 2)))]


def wall_parts(rng, length: float) -> list:
    """A garden wall, carport or shed (other-structure)."""
    height = rng.uniform(0.8, 2.6)
    return [Part(Box((0.0, 0.0, height / 2), (length / 2, rng.uniform(0.1, 1.5), height / 2)))]


def clutter_parts(rng) -> list:
    """Bins, boxes, benches, bollards, mailboxes (other-object)."""
    kind = rng.integers(3)
    if kind == 0:
        return [Part(Box((0.0, 0.0, 0.5), (0.3, 0.3, 0.5)))]
    if kind == 1:
        return [Part(Box((0.0, 0.0, 0.45), (0.9, 0.25, 0.05))), Part(Box((0.0, -0.22, 0.7), (0.9, 0.03, 0.2)))]
    return [Part(Cylinder(0.0, 0.0, 0.0, rng.uniform(0.8, 1.3), rng.uniform(0.08, 0.3)))]
