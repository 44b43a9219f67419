"""Backend-agnostic sparse layers.

Each layer owns its parameters in one layout (ME's: conv kernels are ``(kernel_volume, in,
out)``, or ``(in, out)`` for 1x1 convs) and dispatches at forward time to MinkowskiEngine or to
the pure-PyTorch core, so a state_dict saved under one backend loads into the other with the
same keys and shapes and gives the same outputs. Everything that is not a convolution (batch
norm, activations, residual sums, skip concatenation) acts on the ``(M, C)`` feature matrix of
the active sites, which is the same arithmetic in both backends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any

import torch
from torch import Tensor, nn

from . import sparse_torch
from .me_compat import import_minkowski

BACKENDS = ("minkowski", "torch")


@dataclass(frozen=True)
class SparseFeatures:
    """Features of the active sites at one tensor stride, plus the backend's coordinate handle.

    ``space`` is the torch backend's :class:`~sparse_torch.SparseContext` or ME's
    CoordinateManager; ``key`` is ME's CoordinateMapKey (None for torch, where the stride alone
    names the site set).
    """

    features: Tensor
    stride: int
    backend: str
    space: Any
    key: Any = None

    def with_features(self, features: Tensor) -> "SparseFeatures":
        return replace(self, features=features)

    def same_sites(self, other: "SparseFeatures") -> bool:
        if self.backend != other.backend or self.space is not other.space or self.stride != other.stride:
            return False
        return self.backend == "torch" or self.key == other.key


@dataclass
class PointIndex:
    """What is needed to send voxel features back to the input points (the 'slice')."""

    backend: str
    inverse: Tensor | None = None  # torch: point -> stride-1 row
    space: Any = None  # torch: SparseContext
    field: Any = None  # minkowski: TensorField
    fine_key: Any = None  # minkowski: key of the stride-1 sparse tensor made from ``field``
    _rows: dict = dataclass_field(default_factory=dict)  # cached point -> row maps (per stride / key)

    def slice(self, x: SparseFeatures) -> Tensor:
        """(N, C): every point gets the features of the site containing it, in input order."""
        if self.backend == "torch":
            gather = self._rows.get(x.stride)
            if gather is None:  # backward by a CSR sum, not index_add_: deterministic on CUDA
                rows = self.space.rows_at(self.inverse, x.stride)
                gather = self._rows[x.stride] = sparse_torch.RowGather(rows, x.features.shape[0])
            return gather(x.features)
        return x.features.index_select(0, self._me_rows(x))

    def _me_rows(self, x: SparseFeatures) -> Tensor:
        # TensorField.inverse_mapping for a coarser key assumes ME's stride map lists the fine
        # rows in order, which it does not; compose the stride map explicitly instead.
        cache_key = tuple(x.key.get_key()[0]) + (x.key.get_key()[1],)
        rows = self._rows.get(cache_key)
        if rows is None:
            point_rows = self.field.inverse_mapping(self.fine_key).long()
            if x.stride == 1:
                rows = point_rows
            else:
                fine_rows, coarse_rows = x.space.stride_map(self.fine_key, x.key)
                parent = torch.empty(x.space.size(self.fine_key), dtype=torch.long, device=point_rows.device)
                parent[fine_rows.long()] = coarse_rows.long().to(parent.device)
                rows = parent[point_rows]
            self._rows[cache_key] = rows
        return rows


def voxelize(coords: Tensor, feats: Tensor, backend: str) -> tuple[SparseFeatures, PointIndex]:
    """Average the features of points sharing a voxel; return stride-1 sites and the point index.

    ``coords`` is (N, 4) integer ``[batch, x, y, z]`` voxel indices per point.
    """
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be (N, 4) [batch, x, y, z], got {tuple(coords.shape)}")
    if feats.shape[0] != coords.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates but {feats.shape[0]} feature rows")
    if backend == "torch":
        ctx, inverse = sparse_torch.SparseContext.from_coordinates(coords)
        voxel_feats = sparse_torch.voxel_average(feats, inverse, len(ctx.sites[1]))
        return SparseFeatures(voxel_feats, 1, "torch", ctx), PointIndex("torch", inverse=inverse, space=ctx)
    ME = import_minkowski()
    with torch.autocast(feats.device.type, enabled=False):
        field = ME.TensorField(
            feats.float() if feats.dtype not in (torch.float32, torch.float64) else feats,
            coords.int(),
            quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
        )
        sparse = field.sparse()
    x = SparseFeatures(sparse.F, 1, "minkowski", sparse.coordinate_manager, sparse.coordinate_map_key)
    return x, PointIndex("minkowski", field=field, fine_key=sparse.coordinate_map_key)


def _me_backend():
    """ME's compiled module (ConvolutionMode, CoordinateMapKey live there, not on the package)."""
    import_minkowski()
    import MinkowskiEngineBackend._C as backend

    return backend


def _me_precision(features: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """ME has fp32/fp64 kernels only: run it in the weight's float precision, autocast or not."""
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    return features.to(dtype).contiguous(), weight.to(dtype)


class _SparseConvBase(nn.Module):
    """Holds an ME-layout kernel; subclasses pick regular or transposed arithmetic."""

    transposed = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, bias: bool = False):
        super().__init__()
        if kernel_size == 1 and stride != 1:
            raise ValueError("a 1x1 conv with stride > 1 is not supported")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        volume = kernel_size**3
        shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._me_generator = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal, fan-out, as ME's MinkUNet examples initialise their kernels."""
        fan_out = self.out_channels * self.kernel_size**3
        with torch.no_grad():
            self.kernel.normal_(0.0, math.sqrt(2.0 / fan_out))
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, bias={self.bias is not None}")

    def _finish(self, x: SparseFeatures, features: Tensor, stride: int, key=None) -> SparseFeatures:
        if self.bias is not None:
            features = features + self.bias.to(features.dtype)
        return SparseFeatures(features, stride, x.backend, x.space, key)

    def __getstate__(self):
        # ME's kernel generator is a cache of pybind objects: rebuild it after copy / pickle.
        state = self.__dict__.copy()
        state["_me_generator"] = None
        return state

    def _generator(self):
        if self._me_generator is None:
            ME = import_minkowski()
            self._me_generator = ME.KernelGenerator(
                kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                is_transpose=self.transposed, dimension=3,
            )
        return self._me_generator


class SparseConv(_SparseConvBase):
    """Sparse conv; stride > 1 creates the coarser sites floor(c / s) * s (ME's convention)."""

    def forward(self, x: SparseFeatures) -> SparseFeatures:
        if self.kernel_size == 1:
            return self._finish(x, x.features @ self.kernel, x.stride, x.key)
        if x.backend == "torch":
            features, stride = sparse_torch.conv_forward(
                x.space, x.features, x.stride, self.kernel, self.kernel_size, self.stride, self.dilation
            )
            return self._finish(x, features, stride)
        ME = import_minkowski()
        with torch.autocast(x.features.device.type, enabled=False):
            features, weight = _me_precision(x.features, self.kernel)
            out_key = _me_backend().CoordinateMapKey(4)
            features = ME.MinkowskiConvolutionFunction.apply(
                features, weight, self._generator(), _me_backend().ConvolutionMode.DEFAULT, x.key, out_key, x.space
            )
        return self._finish(x, features, x.stride * self.stride, out_key)


class SparseConvTranspose(_SparseConvBase):
    """Transposed sparse conv back onto existing finer sites (those of ``target`` if given)."""

    transposed = True

    def forward(self, x: SparseFeatures, target: SparseFeatures | None = None) -> SparseFeatures:
        out_stride = x.stride // self.stride
        if target is not None and target.stride != out_stride:
            raise ValueError(f"target stride {target.stride} != {x.stride} / {self.stride}")
        if x.backend == "torch":
            features, stride = sparse_torch.conv_transpose_forward(
                x.space, x.features, x.stride, self.kernel, self.kernel_size, self.stride, self.dilation
            )
            return self._finish(x, features, stride)
        ME = import_minkowski()
        out_key = target.key if target is not None else _me_backend().CoordinateMapKey(4)
        with torch.autocast(x.features.device.type, enabled=False):
            features, weight = _me_precision(x.features, self.kernel)
            features = ME.MinkowskiConvolutionTransposeFunction.apply(
                features, weight, self._generator(), _me_backend().ConvolutionMode.DEFAULT, x.key, out_key, x.space
            )
        return self._finish(x, features, out_stride, out_key)


class SparseBatchNorm(nn.Module):
    """Batch norm over active sites: plain BatchNorm1d on the (M, C) feature matrix, without
    cuDNN, whose batch norm on CUDA gives different bits run to run (PyTorch's own does not)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)

    def forward(self, x: SparseFeatures) -> SparseFeatures:
        with torch.backends.cudnn.flags(enabled=False):
            return x.with_features(self.bn(x.features))


class SparseReLU(nn.Module):
    """In place: every input is a fresh batch-norm output or residual sum that nothing else
    reads (autograd's version check would refuse it otherwise); saves a full-size allocation."""

    def forward(self, x: SparseFeatures) -> SparseFeatures:
        return x.with_features(torch.relu_(x.features))


def sparse_add(a: SparseFeatures, b: SparseFeatures) -> SparseFeatures:
    """Residual sum; both operands must live on the same sites (same rows)."""
    if not a.same_sites(b):
        raise ValueError("sparse_add needs features on the same sites")
    return a.with_features(a.features + b.features)


def sparse_cat(a: SparseFeatures, b: SparseFeatures) -> SparseFeatures:
    """Channel concatenation (U-Net skip); both operands must live on the same sites."""
    if not a.same_sites(b):
        raise ValueError("sparse_cat needs features on the same sites")
    return a.with_features(torch.cat([a.features, b.features], dim=1))
