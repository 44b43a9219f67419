"""Dataset descriptions (label maps, splits, hard classes) loaded from data_manifests/."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from .errors import M2SKDError
from .resources import resource_dir

MANIFEST_DIR = resource_dir("data_manifests")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    labels: dict[int, str]
    learning_map: dict[int, int]
    learning_map_inv: dict[int, int]
    class_names: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    hard_classes: tuple[int, ...]
    color_map: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    content: dict[int, float] = field(default_factory=dict)  # share of points per raw id (reference data)

    @property
    def num_classes(self) -> int:
        """Training ids including 0 (ignore)."""
        return len(self.class_names)

    @cached_property
    def learning_lut(self) -> np.ndarray:
        """Raw semantic id -> training id; unknown raw ids map to 255 so they can be detected."""
        lut = np.full(max(self.learning_map) + 1, 255, dtype=np.uint8)
        for raw, train in self.learning_map.items():
            lut[raw] = train
        return lut

    @cached_property
    def inverse_lut(self) -> np.ndarray:
        lut = np.zeros(self.num_classes, dtype=np.uint32)
        for train, raw in self.learning_map_inv.items():
            lut[train] = raw
        return lut

    @cached_property
    def moving_lut(self) -> np.ndarray:
        """Raw semantic id -> is it a moving-* class (its instances move between scans)."""
        lut = np.zeros(self.learning_lut.size, dtype=bool)
        lut[[raw for raw, name in self.labels.items() if name.startswith("moving-")]] = True
        return lut

    @cached_property
    def hard_mask(self) -> np.ndarray:
        """Boolean per training id: is it a hard class?"""
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[list(self.hard_classes)] = True
        return mask

    def hard_instance_points(self, raw_label: np.ndarray) -> np.ndarray:
        """Per point: part of a hard-class instance (the points feature/affinity terms use)."""
        return self.hard_mask[self.learning_lut[raw_label & 0xFFFF]] & ((raw_label >> 16) > 0)

    def training_shares(self, raw_counts: np.ndarray) -> np.ndarray:
        """Share of points per training id from counts (or ratios) per raw id; unknown ids are left out."""
        raw_counts = np.asarray(raw_counts, dtype=np.float64)
        lut = self.learning_lut
        n = min(len(raw_counts), len(lut))
        known = lut[:n] != 255
        per_class = np.bincount(lut[:n][known], weights=raw_counts[:n][known], minlength=self.num_classes)
        return per_class / max(per_class.sum(), 1e-300)

    @cached_property
    def reference_shares(self) -> np.ndarray | None:
        """Share of points per training id in the reference data (`content`), None if not described."""
        if not self.content:
            return None
        counts = np.zeros(max(self.content) + 1)
        counts[list(self.content)] = list(self.content.values())
        return self.training_shares(counts)

    def split_of(self, sequence: str) -> str:
        for split, seqs in self.splits.items():
            if sequence in seqs:
                return split
        return "unknown"

    def check_splits(self, names, option: str = "--splits") -> None:
        """Refuse split names this description does not have (a typo would select nothing)."""
        bad = [n for n in names or () if n not in self.splits]
        if bad:
            raise M2SKDError(f"{option}: unknown split {', '.join(bad)}; {self.name} has {', '.join(self.splits)}")

    def with_hard_classes(self, hard_classes) -> "DatasetSpec":
        from dataclasses import replace

        return replace(self, hard_classes=tuple(sorted(int(c) for c in hard_classes)))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hard_classes": list(self.hard_classes),
            "class_names": list(self.class_names),
        }


def load_spec(name_or_path: str | Path = "semantickitti") -> DatasetSpec:
    path = Path(name_or_path)
    if not path.suffix:
        path = MANIFEST_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset description not found")
    raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml's: 3x faster, same result
    class_names = tuple(raw["class_names"])
    hard = tuple(int(c) for c in raw["hard_classes"])
    bad = [c for c in hard if not 0 < c < len(class_names)]
    if bad:
        raise ValueError(f"{path}: hard_classes {bad} are not training ids 1..{len(class_names) - 1}")
    return DatasetSpec(
        name=raw.get("name", path.stem),
        labels={int(k): v for k, v in raw["labels"].items()},
        learning_map={int(k): int(v) for k, v in raw["learning_map"].items()},
        learning_map_inv={int(k): int(v) for k, v in raw["learning_map_inv"].items()},
        class_names=class_names,
        splits={k: tuple(str(s) for s in v) for k, v in raw["split"].items()},
        hard_classes=hard,
        color_map={int(k): tuple(v) for k, v in raw.get("color_map", {}).items()},
        content={int(k): float(v) for k, v in (raw.get("content") or {}).items()},
    )
