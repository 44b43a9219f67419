"""Training augmentation on point coordinates.

Only coordinates change: no point is dropped or reordered, so every per-point target
(labels, cached teacher logits and features) stays on its point by construction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    rotate: bool = True  # uniform yaw in [0, 2 pi)
    flip: bool = True  # x and/or y mirrored with probability 0.5 each
    scale: tuple[float, float] = (0.95, 1.05)
    jitter_std: float = 0.01  # metres, clipped at 3 sigma

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = AugmentConfig(rotate=False, flip=False, scale=(1.0, 1.0), jitter_std=0.0)


def random_transform(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """3x3 linear map: yaw rotation, mirror, isotropic scale."""
    m = np.eye(3)
    if cfg.rotate:
        a = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(a), np.sin(a)
        m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ m
    if cfg.flip:
        m = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0]) @ m
    lo, hi = cfg.scale
    return m * (rng.uniform(lo, hi) if hi > lo else lo)


def augment_xyz(xyz: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    out = xyz @ random_transform(rng, cfg).T.astype(xyz.dtype)
    if cfg.jitter_std > 0:
        noise = rng.normal(0, cfg.jitter_std, size=xyz.shape).clip(-3 * cfg.jitter_std, 3 * cfg.jitter_std)
        out += noise.astype(xyz.dtype)
    return out


def voxel_coords(xyz: np.ndarray, voxel_size: float) -> np.ndarray:
    return np.floor(xyz / voxel_size).astype(np.int32)
