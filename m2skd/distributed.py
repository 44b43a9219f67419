"""Devices and torchrun's process group: one rank per GPU, a no-op in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import M2SKDError


def resolve_device(device: str | None, local_rank: int | None = None) -> torch.device:
    """cuda when available unless told otherwise; 'cuda' means this rank's GPU under torchrun,
    else the current one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise M2SKDError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:  # torch.cuda.set_device and DDP's device_ids need an index
            dev = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    return dev


def world_size() -> int:
    """Processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank under torchrun (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


class DistributedContext:
    """Rank/world from torchrun's environment; a no-op in a single process.

    Under torchrun each rank uses its own GPU (LOCAL_RANK), also when `--device cuda` is given."""

    def __init__(self, device: str | None):
        self.world = world_size()
        self.rank = rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device, self.local_rank if self.world > 1 else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module):
        if self.world == 1:
            return module
        if self.device.type == "cuda":
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def broadcast_buffers(self, module) -> None:
        """Rank 0's norm statistics everywhere (each rank updates its own on its own batch), so
        every rank validates the model rank 0 saves."""
        if self.world > 1:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
