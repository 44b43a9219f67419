"""Shared by the sparse-backbone tests (test_backbone.py, test_sparse_conv.py): scenes, ways to
compare the two backends' outputs, and the comparisons both modules run (test_sparse_conv under
the GPU's offset grouping). Not a test module: nothing here is collected."""
from __future__ import annotations

import os

import pytest
import torch

from m2skd.models import build_model
from m2skd.models.layers import SparseConv, SparseConvTranspose, voxelize
from m2skd.models.me_compat import import_minkowski

# MinkowskiEngine's import-time and deprecation warnings, silenced in the modules that use it
ME_WARNINGS = [
    pytest.mark.filterwarnings("ignore:The MinkowskiEngine was compiled with CPU_ONLY:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.sparse.SparseTensor:UserWarning"),
]

SMALL = dict(widths=(8, 12, 16, 16, 16, 12, 8, 8), stem_width=8)


def require_minkowski():
    try:
        return import_minkowski()
    except Exception as exc:  # ImportError, or a broken build raising something else
        if os.environ.get("M2SKD_REQUIRE_MINKOWSKI") == "1":
            pytest.fail(f"MinkowskiEngine required (M2SKD_REQUIRE_MINKOWSKI=1) but not importable: {exc}")
        pytest.skip(f"MinkowskiEngine not importable: {exc}")


def scene(n=3000, batches=1, seed=0, voxel=0.25, dtype=torch.float32):
    """LiDAR-like points (ground, two walls, a box) -> per-point voxel coords and 4 features."""
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for b in range(batches):
        kind = torch.randint(0, 4, (n,), generator=g)
        u = torch.rand(n, generator=g) * 16 - 8
        v = torch.rand(n, generator=g) * 16 - 8
        h = torch.rand(n, generator=g) * 3
        xyz = torch.stack([u, v, torch.zeros(n)], 1)  # ground
        xyz[kind == 1] = torch.stack([u, torch.full((n,), 6.0), h], 1)[kind == 1]  # wall
        xyz[kind == 2] = torch.stack([torch.full((n,), -5.0), v, h], 1)[kind == 2]  # wall
        box = torch.stack([u * 0.2 + 2, v * 0.1, h * 0.5], 1)
        xyz[kind == 3] = box[kind == 3]
        xyz += 0.02 * torch.randn(n, 3, generator=g)
        coords.append(torch.cat([torch.full((n, 1), b), torch.floor(xyz / voxel).long()], 1))
        feats.append(torch.cat([xyz, torch.rand(n, 1, generator=g)], 1).to(dtype))
    return torch.cat(coords), torch.cat(feats)


def site_coords(x):
    """(M, 4) coordinates of the rows of a SparseFeatures, whichever backend made it."""
    if x.backend == "torch":
        return x.space.sites[x.stride].coords
    return x.space.get_coordinates(x.key).long()


def by_coords(x, features=None):
    """Rows sorted by coordinate, so outputs of the two backends can be compared."""
    c = site_coords(x)
    key = ((c[:, 0] * 4096 + c[:, 1] + 2048) * 4096 + c[:, 2] + 2048) * 4096 + c[:, 3] + 2048
    order = torch.argsort(key)
    return c[order], (x.features if features is None else features)[order]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_layer_matches_minkowski(transposed, kernel_size, stride, dilation, dtype, tol):
    """Outputs, kernel gradients and input gradients of one conv agree with ME's."""
    require_minkowski()
    torch.manual_seed(kernel_size * 10 + stride)
    coords, _ = scene(2000, seed=10 + kernel_size, voxel=0.3)
    feats = torch.randn(len(coords), 3, dtype=dtype)
    down = SparseConv(3, 3, 2, 2).to(dtype)  # makes the coarse input of a stride-2 transposed conv
    layer_cls = SparseConvTranspose if transposed else SparseConv
    layer = layer_cls(3, 4, kernel_size, stride, dilation).to(dtype)
    results = {}
    for backend in ("torch", "minkowski"):
        layer.zero_grad()
        x, _ = voxelize(coords, feats, backend)
        if transposed and stride == 2:
            x_in = down(x)
            x_in = x_in.with_features(x_in.features.detach().requires_grad_(True))
            y = layer(x_in, x)
        else:
            x_in = x.with_features(x.features.detach().requires_grad_(True))
            y = layer(x_in)
        y_coords, y_feats = by_coords(y)
        weights = torch.randn(y_feats.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        (y_feats * weights).sum().backward()
        g_coords, g_feats = by_coords(x_in, x_in.features.grad)
        results[backend] = (y_coords, y_feats.detach(), layer.kernel.grad.clone(), g_coords, g_feats)
    t, m = results["torch"], results["minkowski"]
    assert torch.equal(t[0], m[0]), "output sites differ"
    assert torch.equal(t[3], m[3])
    assert rel_err(t[1], m[1]) < tol
    assert rel_err(t[2], m[2]) < tol
    assert rel_err(t[4], m[4]) < tol


def check_minkunet18_matches_minkowski(dtype, tol):
    """Logits and every parameter gradient of a small MinkUNet18 agree with ME's."""
    require_minkowski()
    torch.manual_seed(2)
    model = build_model(4, 6, depth=18, backend="torch", **SMALL).to(dtype).train()
    coords, feats = scene(3000, batches=2, seed=11, dtype=dtype)
    results = {}
    for backend in ("torch", "minkowski"):
        model.set_backend(backend)
        model.zero_grad()
        out = model(coords, feats, features=("dec2",))
        weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        ((out.logits * weights).sum() + out.features["dec2"].square().mean()).backward()
        results[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lt, gt), (lm, gm) = results["torch"], results["minkowski"]
    assert rel_err(lt, lm) < tol
    worst = max((rel_err(gt[n], gm[n]), n) for n in gm)
    assert worst[0] < tol, worst
