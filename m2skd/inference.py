"""Running a segmentation model over batches: predictions and confusion accumulation."""
from __future__ import annotations

import contextlib

import torch

from .dataset import to_device
from .metrics import ConfusionAccumulator


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def predict(logits):
    """Class per point from (N, C) logits (torch or numpy): the best real class 1..C-1. Id 0
    (unlabelled) is never trained, so it is never predicted: metrics count no such misses and a
    submission never holds raw id 0."""
    return logits[:, 1:].argmax(1) + 1


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, amp: str = "none", on_batch=None) -> ConfusionAccumulator:
    """Confusion over every point of every scan the loader yields (model left in eval mode)."""
    model.eval()
    conf = ConfusionAccumulator(num_classes)
    for batch in loader:
        batch = to_device(batch, device)
        if batch["coords"].shape[0] == 0:  # empty scans: no points, no predictions (backends fail on no sites)
            pred = batch["label"].new_zeros(0)
        else:
            with autocast(device, amp):
                logits = model(batch["coords"], batch["feats"]).logits
            pred = predict(logits.float())
        conf.add(pred, batch["label"])
        if on_batch:
            on_batch(batch, pred)
    return conf
