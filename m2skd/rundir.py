"""Where each stage keeps its outputs inside a run directory (see README: run-directory layout).

Every file and folder name of a run directory is spelled here and nowhere else, so a stage
finds another stage's output by asking for it, not by rebuilding its path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import storage
from .atomic import read_json
from .dataset_spec import load_spec
from .errors import StaleInputError

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class RunDir:
    """root: a local path or an fsspec URL (m2skd.storage); every location below is built from it."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", storage.path(self.root))

    @classmethod
    def of_model(cls, path) -> "RunDir":
        """The run directory a RUN/<name>/model.pt belongs to."""
        return cls(storage.path(path).resolve().parent.parent)

    @property
    def prepare(self) -> Path:
        return self.root / "prepare"

    @property
    def prepare_record(self) -> Path:
        """What prepare was run with; written last, so its presence means prepare finished."""
        return self.prepare / "config.json"

    @property
    def manifest(self) -> Path:
        return self.prepare / "manifest.parquet"

    @property
    def shards(self) -> Path:
        return self.prepare / "shards"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher_cache"

    @property
    def cache_record(self) -> Path:
        return self.teacher_cache / "cache.json"

    def model_dir(self, name: str) -> Path:
        """teacher, student, baseline, ...: checkpoints, config, TensorBoard logs."""
        return self.root / name

    def model(self, name: str) -> Path:
        """The finished model of run `name`."""
        return self.model_dir(name) / MODEL_FILE

    def models(self) -> list[Path]:
        """Every finished model in the run directory, by name."""
        return sorted(self.root.glob(f"*/{MODEL_FILE}"))

    def train_record(self, name: str) -> Path:
        return self.model_dir(name) / "train.json"

    def last_checkpoint(self, name: str) -> Path:
        """The state an interrupted training run resumes from."""
        return self.model_dir(name) / "checkpoints" / "last.pt"

    def tensorboard(self, name: str) -> Path:
        return self.model_dir(name) / "tensorboard"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def distillation_effect(self) -> Path:
        return self.eval / "distillation_effect.json"

    @property
    def show(self) -> Path:
        return self.root / "show"

    @property
    def study(self) -> Path:
        return self.root / "study"

    def study_eval(self, label: str) -> Path:
        return self.study / "eval" / label

    def study_transfer(self, teacher: str, label: str) -> Path:
        return self.study / "transfer" / teacher / f"{label}.json"


def model_label(path) -> str:
    """RUN/student/model.pt -> 'student'; any other checkpoint file -> its stem."""
    path = storage.path(path)
    return path.parent.name if path.name == MODEL_FILE else path.stem


def spec_for_run(run: RunDir):
    """The dataset description (with its hard classes) the run was prepared with."""
    if not run.prepare_record.is_file():
        raise StaleInputError(f"{run.prepare_record}: no prepared data in {run.root}; run `m2skd prepare DATA {run.root}` first")
    record = read_json(run.prepare_record)
    return load_spec(record["config"]["dataset"]).with_hard_classes(record["config"]["hard_classes"])
