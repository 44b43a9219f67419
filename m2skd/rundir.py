"""Where each stage keeps its outputs inside a run directory (see README: run-directory layout)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def prepare(self) -> Path:
        return self.root / "prepare"

    @property
    def manifest(self) -> Path:
        return self.prepare / "manifest.parquet"

    @property
    def shards(self) -> Path:
        return self.prepare / "shards"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher_cache"

    def model_dir(self, name: str) -> Path:
        """teacher, student, baseline, ...: checkpoints, config, TensorBoard logs."""
        return self.root / name
