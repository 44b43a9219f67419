"""Typed training configuration: YAML file + `key=value` overrides, recorded with every run."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from .losses import DEFAULT_DISTILL_CONFIG

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # model
    depth: int = 34
    widths: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    stem_width: int = 32
    backend: str = "auto"  # minkowski | torch | auto
    voxel_size: float = 0.05
    # optimisation
    steps: int = 20000
    batch_size: int = 2  # scans per process and step
    lr: float = 2e-3
    weight_decay: float = 1e-2
    pct_start: float = 0.05  # one-cycle warm-up fraction
    grad_clip: float = 10.0
    amp: str = "none"  # none | bf16 | fp16 (torch backend only)
    seed: int = 0
    workers: int = 2
    # bookkeeping
    checkpoint_every: int = 1000
    val_every: int = 2000  # 0: no validation during training
    val_max_scans: int | None = 200
    log_every: int = 10
    train_splits: tuple[str, ...] = ("train",)
    val_splits: tuple[str, ...] = ("val",)
    # augmentation
    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.95, 1.05)
    jitter_std: float = 0.01
    # losses
    lovasz_weight: float = 1.0
    # teacher: the loss also covers the fused points (the paper); false keeps them as unlabelled
    # context, so the loss sees the single-scan points the cache reads, in the student's class mix
    fused_point_labels: bool = True
    # distillation: the release-equivalent weights, derived in losses.DEFAULT_DISTILL_CONFIG
    kd_weight: float = DEFAULT_DISTILL_CONFIG["kd_weight"]
    temperature: float = DEFAULT_DISTILL_CONFIG["temperature"]
    feat_weight: float = DEFAULT_DISTILL_CONFIG["feat_weight"]
    affinity_weight: float = DEFAULT_DISTILL_CONFIG["affinity_weight"]
    affinity_max_points: int = DEFAULT_DISTILL_CONFIG["max_points_per_instance"]
    affinity_mode: str = DEFAULT_DISTILL_CONFIG["affinity_mode"]  # instance | class
    feature_layer: str = "dec4"

    def distill_enabled(self) -> bool:
        return any(w > 0 for w in (self.kd_weight, self.feat_weight, self.affinity_weight))

    def no_distill(self) -> "TrainConfig":
        return dataclasses.replace(self, kd_weight=0.0, feat_weight=0.0, affinity_weight=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(name: str, value, current):
    optional = "None" in str(_FIELD_TYPES[name])
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if isinstance(current, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(current, tuple):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        kind = type(current[0]) if current else str
        return tuple(kind(v) for v in items)
    if current is None:  # an optional field currently unset
        try:
            return int(value)
        except (TypeError, ValueError):
            return value
    return type(current)(value)


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file (a name in configs/ or a path) <- overrides."""
    cfg = TrainConfig()
    values = {}
    if path:
        p = Path(path)
        if not p.suffix:
            p = CONFIG_DIR / f"{path}.yaml"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: training config not found")
        values.update(yaml.safe_load(p.read_text()) or {})
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
    for key, value in values.items():
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
    return cfg


def parse_overrides(pairs) -> dict:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"override {pair!r} is not key=value")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
