"""How many points one object of each hard class gets in a single scan at a given range.

Objects are placed alone (nothing occludes them) on an empty road around a standing sensor,
at a fixed horizontal range and random headings, several per scan at azimuths far enough
apart not to shadow each other; their points are counted by instance id.
"""
from __future__ import annotations

import math

import numpy as np

from .lidar import simulate_scan
from .scene import EGO_LANE_Y, EgoPath, GroundLayout, Scene, SceneObject, Segments, SynthConfig
from .shapes import (BICYCLE, BICYCLIST, MOTORCYCLE, MOTORCYCLIST, OTHER_VEHICLE, PERSON, ROAD, TERRAIN, TRUCK,
                     bicycle_parts, bicyclist_parts, motorcycle_parts, motorcyclist_parts, other_vehicle_parts,
                     person_parts, truck_parts)

#: Hard classes and a builder each (a walker for person).
HARD_BUILDERS = {
    BICYCLE: bicycle_parts, MOTORCYCLE: motorcycle_parts, TRUCK: truck_parts, OTHER_VEHICLE: other_vehicle_parts,
    PERSON: lambda rng: person_parts(rng, walking=bool(rng.random() < 0.5)),
    BICYCLIST: bicyclist_parts, MOTORCYCLIST: motorcyclist_parts,
}
PER_SCAN = 6  # objects per scan, 60 degrees apart


def open_road(config: SynthConfig, objects: list[SceneObject]) -> Scene:
    """A flat street without objects but `objects`, the sensor standing still at x = 0 in its lane."""
    wide = Segments(np.array([-1e4, 1e4]), np.array([ROAD]))
    ground = GroundLayout(parking=(wide, wide), green=(Segments(np.array([-1e4, 1e4]), np.array([TERRAIN])),) * 2,
                          dash_phase=0.0)
    ego = EgoPath(speed=0.0, height=config.sensor_height, sway_amplitude=0.0, sway_wavelength=1.0, sway_phase=0.0,
                  wobble_rad=0.0, wobble_period=1.0, tilt_rad=0.0, tilt_periods=(1.0, 1.0))
    return Scene(config, ground, ego, objects, np.zeros(1))


def points_at_range(raw: int, range_m: float, samples: int, config: SynthConfig | None = None,
                    seed: int = 0) -> np.ndarray:
    """Point counts of `samples` objects of class `raw` at horizontal range `range_m`."""
    config = config or SynthConfig(dropout=0.0, outliers=0.0)
    rng = np.random.default_rng([seed, raw, int(range_m * 100)])
    counts = []
    while len(counts) < samples:
        objects = []
        offset = rng.uniform(0, 2 * math.pi)
        for k in range(min(PER_SCAN, samples - len(counts))):
            az = offset + k * 2 * math.pi / PER_SCAN
            x, y = range_m * math.cos(az), EGO_LANE_Y + range_m * math.sin(az)
            position = np.array([x, y, float(GroundLayout.height(np.abs(y)))])
            objects.append(SceneObject(raw, k + 1, position, rng.uniform(-math.pi, math.pi), np.zeros(3),
                                       HARD_BUILDERS[raw](rng)))
        scene = open_road(config, objects)
        scan = simulate_scan(scene, 0, np.random.default_rng([seed, len(counts)]))
        counts += np.bincount(scan.instance, minlength=len(objects) + 1)[1:len(objects) + 1].tolist()
    return np.asarray(counts)


def median_points_table(ranges=(10.0, 25.0), samples: int = 24, config: SynthConfig | None = None) -> dict:
    """{class raw id: {range: median points}} for every hard class."""
    return {raw: {r: float(np.median(points_at_range(raw, r, samples, config))) for r in ranges}
            for raw in HARD_BUILDERS}
