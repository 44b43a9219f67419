"""Synthetic SemanticKITTI-layout data from a simulated spinning LiDAR in a procedural street.

`generate_dataset` writes sequences that the real-data readers accept; hard-class objects
(bicycles, people, riders, ...) are small, so far away they get only a handful of points,
which is the under-sampling that multi-to-single distillation addresses.
"""
from .generate import generate_dataset, scene_for
from .lidar import Scan, simulate_scan
from .scene import Scene, SynthConfig, SynthConfigError, build_scene

__all__ = ["generate_dataset", "SynthConfig", "SynthConfigError", "Scene", "Scan", "build_scene", "scene_for",
           "simulate_scan"]
