"""Sparse 3D backbones: MinkUNet on MinkowskiEngine or on a pure-PyTorch sparse core."""
from .minkunet import (
    DECODER_STAGES,
    DEPTHS,
    FEATURE_NAMES,
    MinkUNet,
    SegmentationOutput,
    build_model,
    count_parameters,
    resolve_backend,
)

__all__ = [
    "DECODER_STAGES",
    "DEPTHS",
    "FEATURE_NAMES",
    "MinkUNet",
    "SegmentationOutput",
    "build_model",
    "count_parameters",
    "resolve_backend",
]
