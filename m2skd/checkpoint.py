"""Checkpoint files: the one place their dict is written and read.

A finished model (RUN/<name>/model.pt) holds the weights, the training config they were trained
with, the class count and the training record; the resumable state (checkpoints/last.pt) adds
the optimiser, scheduler and gradient scaler. A model is rebuilt from the recorded config, so a
checkpoint loads under any backend without its training command.
"""
from __future__ import annotations

import dataclasses
import io

import torch

from . import storage
from .errors import DataError
from .models import build_model, resolve_backend
from .train_config import TrainConfig


def model_from_config(cfg: TrainConfig, num_classes: int, backend: str | None = None):
    return build_model(in_channels=4, num_classes=num_classes, depth=cfg.depth, widths=tuple(cfg.widths),
                       stem_width=cfg.stem_width, backend=backend or cfg.backend)


def write_checkpoint(path, model, config: dict, num_classes: int, record: dict, history: list, step: int, adapter=None,
                     optimizer=None, scheduler=None, scaler=None) -> None:
    """Write `path` atomically; with `optimizer` (and its scheduler and scaler) the state a
    training run resumes from, else a finished model. The key order is part of the file's
    bytes, and those are fingerprinted downstream (the teacher cache records its teacher's)."""
    adapter_state = adapter.state_dict() if adapter else None
    if optimizer is None:
        ckpt = {"model": model.state_dict(), "adapter": adapter_state, "config": config, "num_classes": num_classes,
                "record": record, "history": history, "step": step}
    else:
        ckpt = {"model": model.state_dict(), "adapter": adapter_state, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step, "history": history,
                "record": record, "config": config, "num_classes": num_classes}
    # locally a temporary renamed into place; on an object store a unique object, then a pointer
    with storage.output(path, versioned=True) as tmp:
        torch.save(ckpt, tmp)


def read_checkpoint(path) -> dict:
    """A checkpoint dict, or one line naming the file when it is not an m2skd checkpoint."""
    path = storage.path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        source = path if not isinstance(path, storage.ObjectPath) else io.BytesIO(storage.read_bytes(path))
        ckpt = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors of every kind
        raise DataError(path, f"not a readable checkpoint ({type(exc).__name__}); re-run the stage that wrote it") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "num_classes"} <= set(ckpt):
        raise DataError(path, "not an m2skd checkpoint (no model/config/num_classes)")
    return ckpt


def restore_training(ckpt: dict, model, adapter, optimizer, scheduler, scaler) -> tuple[int, list]:
    """Load a resumable checkpoint's state into the training objects; returns (step, history)."""
    model.load_state_dict(ckpt["model"])
    if adapter is not None:
        adapter.load_state_dict(ckpt["adapter"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"], ckpt["history"]


def check_num_classes(path, ckpt: dict, spec) -> None:
    if ckpt["num_classes"] != spec.num_classes:
        raise DataError(path, f"the model predicts {ckpt['num_classes']} classes but dataset {spec.name!r} has "
                              f"{spec.num_classes}; use a checkpoint trained on this dataset")


def load_checkpoint(path, backend: str = "auto", device="cpu", spec=None):
    """(model, checkpoint dict): the model is rebuilt from the recorded config under `backend`.
    With `spec`, a checkpoint for another class count is refused."""
    ckpt = read_checkpoint(path)
    if spec is not None:
        check_num_classes(path, ckpt, spec)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items() if k in known})
    model = model_from_config(cfg, ckpt["num_classes"], resolve_backend(backend, device))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise DataError(path, f"weights do not fit the recorded model ({str(exc).splitlines()[0]})") from None
    return model.to(device), ckpt
