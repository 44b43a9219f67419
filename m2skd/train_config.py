"""Typed training configuration: YAML file + `key=value` overrides, recorded with every run."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from .errors import M2SKDError
from .losses import AFFINITY_FORMS, KD_FORMS, kd_weight_for
from .models import FEATURE_NAMES, resolve_backend
from .resources import resource_dir

CONFIG_DIR = resource_dir("configs")


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
    epochs: float | None = None  # when set, steps = ceil(epochs * train scans / (batch_size * world size))
    batch_size: int = 2  # scans per process and step
    lr: float = 2e-3
    weight_decay: float = 1e-2
    no_decay_norm_bias: bool = True  # weight decay on conv/linear weights only, not on norms and biases
    # none | inverse_sqrt_frequency (from the train scans' class histogram in the manifest) | a list of C floats
    class_weights: str | tuple[float, ...] | None = None
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
    # distillation (the terms and their forms: losses.py)
    kd_form: str = "kl"  # kl | release (losses.KD_FORMS)
    kd_weight: float | None = None  # None: the form's own default (losses.KD_FORM_WEIGHTS)
    temperature: float = 1.0 / 0.3
    # the release's feature term is present but weighted 0; its affinity term has weight 1
    feat_weight: float = 0.0
    affinity_weight: float = 1.0
    affinity_max_points: int = 64  # points per instance the affinity term keeps: its cost stays linear in scan size
    kd_hard_weight: float = 1.0  # weight of hard-class points in the logit term's mean; 1: the plain mean
    # instance: per hard instance on feature_layer's features; class: the release's, per class on the logits
    affinity_form: str = "instance"
    # the decoder features the feature and affinity terms compare; *_preact: before the stage's last
    # ReLU, where the features have sign (post-ReLU similarities within an instance are all near 1)
    feature_layer: str = "dec4_preact"

    def distill_enabled(self) -> bool:
        return any(w > 0 for w in (kd_weight_for(self.kd_form, self.kd_weight), self.feat_weight, self.affinity_weight))

    def uses_teacher_features(self) -> bool:
        """Whether a term compares decoder features (the class-form affinity compares logits)."""
        return self.feat_weight > 0 or (self.affinity_weight > 0 and self.affinity_form == "instance")

    def no_distill(self) -> "TrainConfig":
        """The baseline: every distillation weight 0 and the settings only distillation reads at
        their defaults, so one baseline (one fingerprint) pairs with students of any distillation
        settings. The temperature is kept: the transfer diagnostic of a pair uses each one's."""
        defaults = TrainConfig.__dataclass_fields__
        return dataclasses.replace(self, kd_weight=0.0, feat_weight=0.0, affinity_weight=0.0,
                                   **{k: defaults[k].default for k in DISTILL_ONLY_KEYS})

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Reject values no training can use, before anything is written."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
                    "voxel_size": self.voxel_size, "lr": self.lr, "log_every": self.log_every,
                    "temperature": self.temperature, "stem_width": self.stem_width}
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        for key, value in positive.items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{key} must be > 0, got {value!r}")
        for key in ("workers", "val_every", "weight_decay", "grad_clip", "lovasz_weight", "feat_weight", "affinity_weight",
                    "kd_hard_weight"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"{key} must be >= 0, got {value!r}")
        if self.kd_weight is not None and not self.kd_weight >= 0:
            raise ConfigError(f"kd_weight must be >= 0, got {self.kd_weight!r}")
        if any(int(w) < 1 for w in self.widths) or len(self.widths) != 8:
            raise ConfigError(f"widths must be 8 positive channel counts, got {self.widths!r}")
        if self.val_max_scans is not None and self.val_max_scans < 1:
            raise ConfigError(f"val_max_scans must be >= 1 or none, got {self.val_max_scans!r}")
        choices = {"amp": ("none", "bf16", "fp16"), "backend": ("auto", "torch", "minkowski"), "depth": (18, 34),
                   "feature_layer": FEATURE_NAMES, "kd_form": KD_FORMS, "affinity_form": AFFINITY_FORMS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if isinstance(self.class_weights, str) and self.class_weights != "inverse_sqrt_frequency":
            raise ConfigError(f"class_weights must be none, inverse_sqrt_frequency or a list of floats, got {self.class_weights!r}")

    def math_dict(self) -> dict:
        """The settings that change what training computes; a resume must match them exactly.
        How long to train (steps, epochs), loader workers and when to log, validate or
        checkpoint may change between a run and its resume. The backend is the one `auto`
        resolves to, so a run asked for `auto` and one asked for what it resolves to are the same
        run (a study or demo reuses a student `m2skd train-student` made with the default)."""
        maths = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_KEYS}
        return {**maths, "backend": resolve_backend(self.backend) if self.backend == "auto" else self.backend}


DISTILL_ONLY_KEYS = ("kd_form", "kd_hard_weight", "affinity_form", "affinity_max_points", "feature_layer")
RESUMABLE_KEYS = ("steps", "epochs", "workers", "log_every", "val_every", "val_max_scans", "checkpoint_every", "val_splits")


class ConfigError(M2SKDError, ValueError):
    """A training configuration value that cannot work."""


def _coerce(name: str, value, current):
    optional = "None" in str(_FIELD_TYPES[name])
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if name == "class_weights":
        return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    if isinstance(current, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(current, tuple):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        kind = type(current[0]) if current else str
        return tuple(kind(v) for v in items)
    if current is None:  # an optional field currently unset
        if str(_FIELD_TYPES[name]).startswith("float"):
            return float(value)
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
            raise ConfigError(f"{p}: training config not found")
        try:
            values.update(yaml.safe_load(p.read_text()) or {})
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
    for key, value in values.items():
        try:
            setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: cannot use {value!r} (expected {_FIELD_TYPES[key]})") from None
    cfg.validate()
    return cfg


def parse_overrides(pairs) -> dict:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} is not key=value")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
