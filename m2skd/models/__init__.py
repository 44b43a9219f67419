"""Sparse 3D backbones: MinkUNet on MinkowskiEngine or on a pure-PyTorch sparse core."""
from .minkunet import (
    DEPTHS,
    FEATURE_NAMES,
    MinkUNet,
    SegmentationOutput,
    build_model,
    count_parameters,
    resolve_backend,
)

__all__ = [
    "DEPTHS",
    "FEATURE_NAMES",
    "MinkUNet",
    "SegmentationOutput",
    "build_model",
    "count_parameters",
    "resolve_backend",
]
