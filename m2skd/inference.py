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


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, amp: str = "none", on_batch=None) -> ConfusionAccumulator:
    """Confusion over every point of every scan the loader yields (model left in eval mode)."""
    model.eval()
    conf = ConfusionAccumulator(num_classes)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits = model(batch["coords"], batch["feats"]).logits
        pred = logits.float().argmax(1)
        conf.add(pred, batch["label"])
        if on_batch:
            on_batch(batch, pred)
    return conf
