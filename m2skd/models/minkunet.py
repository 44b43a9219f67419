"""MinkUNet-style sparse 3D U-Net with per-point outputs, on either sparse backend.

Layout (as MinkUNet18/34 and torchsparse's MinkUNet): a stem of two 3^3 convs at stride 1;
four down stages (stride-2 conv with kernel 2, then residual BasicBlocks); four up stages
(transposed stride-2 conv with kernel 2 onto the stored finer sites, concatenation of the skip
at that stride, BasicBlocks); a linear classifier. Points sharing a voxel are averaged into it
and every point receives its voxel's outputs back, in input order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import M2SKDError

from .layers import (
    BACKENDS,
    SparseBatchNorm,
    SparseConv,
    SparseConvTranspose,
    SparseFeatures,
    SparseReLU,
    sparse_add,
    sparse_cat,
    voxelize,
)

DEPTHS = {18: (2, 2, 2, 2, 2, 2, 2, 2), 34: (2, 3, 4, 6, 2, 2, 2, 2)}
DEFAULT_WIDTHS = (32, 64, 128, 256, 256, 128, 96, 96)
DECODER_STAGES = ("dec1", "dec2", "dec3", "dec4")
# Each stage's output is post-ReLU (never negative, so cosine similarities among an instance's
# points all sit near 1); "<stage>_preact" is the same stage before its last ReLU, where the
# features have sign and similarity structure (the affinity term's input).
PREACT_SUFFIX = "_preact"
FEATURE_NAMES = DECODER_STAGES + tuple(f"{name}{PREACT_SUFFIX}" for name in DECODER_STAGES)


AUTO_BACKEND_REASON = ("auto -> torch: the pure-PyTorch backend runs on every device, gives the same bits "
                       "run after run, and trains faster than MinkowskiEngine on CPU (bench); "
                       "--backend minkowski to use MinkowskiEngine")


def resolve_backend(name: str = "auto", device=None) -> str:
    """The backend a run uses on `device` (cpu when None).

    'auto' is the torch backend: measured on this project's machines, MinkowskiEngine's CPU
    kernels give other bits at 2 threads run after run and are slower, and its CUDA kernels use
    atomics. 'minkowski' is refused (one line) where its build cannot run on the device."""
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r}; choose from {BACKENDS + ('auto',)}")
    if name == "minkowski":
        from .me_compat import import_minkowski, minkowski_runs_on

        import_minkowski()  # raises ImportError with the reason
        device_type = torch.device(device).type if device is not None else "cpu"
        if not minkowski_runs_on(device_type):
            raise BackendError(f"--backend minkowski: this MinkowskiEngine build has no {device_type} kernels "
                               f"(a CPU-only build); use --backend torch or --device cpu")
    return name


class BackendError(M2SKDError):
    """A backend that cannot run where it was asked to."""


class RequestedFeatures(dict):
    """name -> (N, C) per-point features; a name the forward was not asked for says so."""

    def __missing__(self, name: str):
        hint = f"pass features=({name!r},) to the model's forward" if name in FEATURE_NAMES else f"available: {FEATURE_NAMES}"
        raise KeyError(f"decoder feature {name!r} was not requested; {hint}")


@dataclass
class SegmentationOutput:
    logits: Tensor  # (N, num_classes), one row per input point, input order
    features: dict[str, Tensor]  # only the requested decoder stages: name -> (N, C) per point


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv = SparseConv(in_channels, out_channels, kernel_size, stride)
        self.norm = SparseBatchNorm(out_channels, momentum=bn_momentum)
        self.act = SparseReLU()

    def forward(self, x: SparseFeatures) -> SparseFeatures:
        return self.act(self.norm(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block on sparse sites; a 1x1 conv + BN projects the shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = SparseConv(in_channels, out_channels, 3)
        self.norm1 = SparseBatchNorm(out_channels, momentum=bn_momentum)
        self.conv2 = SparseConv(out_channels, out_channels, 3)
        self.norm2 = SparseBatchNorm(out_channels, momentum=bn_momentum)
        self.act = SparseReLU()
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                SparseConv(in_channels, out_channels, 1), SparseBatchNorm(out_channels, momentum=bn_momentum)
            )

    def forward(self, x: SparseFeatures, preact: bool = False):
        """The block's output; with `preact`, (output, its features before the final ReLU)."""
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        summed = sparse_add(out, shortcut)
        if not preact:
            return self.act(summed)
        return summed.with_features(torch.relu(summed.features)), summed  # not in place: `summed` is kept


def _blocks(in_channels: int, out_channels: int, count: int, bn_momentum: float) -> list[nn.Module]:
    return [BasicBlock(in_channels if i == 0 else out_channels, out_channels, bn_momentum) for i in range(count)]


class UpStage(nn.Module):
    """Transposed conv onto the skip's sites, concatenate the skip, residual blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, count: int,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.deconv = SparseConvTranspose(in_channels, out_channels, kernel_size=2, stride=2)
        self.norm = SparseBatchNorm(out_channels, momentum=bn_momentum)
        self.act = SparseReLU()
        self.blocks = nn.Sequential(*_blocks(out_channels + skip_channels, out_channels, count, bn_momentum))

    def forward(self, x: SparseFeatures, skip: SparseFeatures, preact: bool = False):
        """The stage's output; with `preact`, (output, the last block's features before its ReLU)."""
        up = self.act(self.norm(self.deconv(x, skip)))
        x = sparse_cat(up, skip)
        if not preact:
            return self.blocks(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, preact=True)


class MinkUNet(nn.Module):
    """Sparse U-Net; ``forward(coords, feats)`` returns per-point logits and decoder features."""

    def __init__(self, in_channels: int, num_classes: int, blocks: Sequence[int] = DEPTHS[34],
                 widths: Sequence[int] = DEFAULT_WIDTHS, stem_width: int = 32, backend: str = "auto",
                 bn_momentum: float = 0.1):
        super().__init__()
        if len(blocks) != 8 or len(widths) != 8:
            raise ValueError("blocks and widths need 8 entries (4 down stages, 4 up stages)")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.blocks_per_stage = tuple(blocks)
        self.widths = tuple(widths)
        self.stem_width = stem_width
        self._backend = resolve_backend(backend)

        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, stem_width, 3, bn_momentum=bn_momentum),
            ConvBNReLU(stem_width, stem_width, 3, bn_momentum=bn_momentum),
        )
        encoder_widths = [stem_width] + list(widths[:4])
        self.down = nn.ModuleList(
            nn.Sequential(
                ConvBNReLU(encoder_widths[i], encoder_widths[i], kernel_size=2, stride=2, bn_momentum=bn_momentum),
                *_blocks(encoder_widths[i], widths[i], blocks[i], bn_momentum),
            )
            for i in range(4)
        )
        self.up = nn.ModuleList()
        previous = widths[3]
        for j in range(4):
            skip = encoder_widths[3 - j]
            self.up.append(UpStage(previous, skip, widths[4 + j], blocks[4 + j], bn_momentum))
            previous = widths[4 + j]
        self.classifier = nn.Linear(widths[7], num_classes)
        self.feature_channels = {name: widths[4 + j] for j, stage in enumerate(DECODER_STAGES)
                                 for name in (stage, stage + PREACT_SUFFIX)}

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, name: str) -> "MinkUNet":
        """Switch the sparse engine in place; parameters and buffers are untouched."""
        self._backend = resolve_backend(name)
        return self

    def forward(self, coords: Tensor, feats: Tensor, *, features: Sequence[str] = ()) -> SegmentationOutput:
        """coords: (N, 4) int [batch, vx, vy, vz] voxel indices per point; feats: (N, in_channels).

        ``features`` names the decoder stages (of ``FEATURE_NAMES``) to slice back to the points;
        by default none, since every sliced stage holds N x width more activations (all four:
        N x 576 floats, ~0.55 GB for two 120k-point scans in fp32).
        """
        wanted = (features,) if isinstance(features, str) else tuple(features)
        unknown = set(wanted) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown feature names {sorted(unknown)}; available: {FEATURE_NAMES}")
        x, points = voxelize(coords, feats, self._backend)
        x = self.stem(x)
        skips = [x]
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        skips.pop()
        sliced = RequestedFeatures()
        for name, stage in zip(DECODER_STAGES, self.up):
            pre_name = name + PREACT_SUFFIX
            if pre_name in wanted:
                x, pre = stage(x, skips.pop(), preact=True)
                sliced[pre_name] = points.slice(pre)
            else:
                x = stage(x, skips.pop())
            if name in wanted:
                sliced[name] = points.slice(x)
        logits = points.slice(x.with_features(self.classifier(x.features)))
        return SegmentationOutput(logits, sliced)


def build_model(in_channels: int = 4, num_classes: int = 20, depth: int = 34,
                widths: Sequence[int] = DEFAULT_WIDTHS, stem_width: int = 32, backend: str = "auto",
                blocks: Sequence[int] | None = None, bn_momentum: float = 0.1) -> MinkUNet:
    """MinkUNet18 or MinkUNet34 (``depth``), or custom per-stage ``blocks``."""
    if blocks is None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        blocks = DEPTHS[depth]
    return MinkUNet(in_channels, num_classes, blocks, widths, stem_width, backend, bn_momentum)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
