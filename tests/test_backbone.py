"""Sparse backbone: torch backend vs MinkowskiEngine, slicing, checkpoints, autocast, batching.

ME-comparison tests skip only when MinkowskiEngine cannot be imported through me_compat
(and fail instead when M2SKD_REQUIRE_MINKOWSKI=1, as in CI).
"""
from __future__ import annotations

import pytest
import torch
from sparse_helpers import (ME_WARNINGS, SMALL, check_layer_matches_minkowski, check_minkunet18_matches_minkowski,
                            rel_err, require_minkowski, scene)

from m2skd.models import FEATURE_NAMES, build_model, count_parameters, resolve_backend
from m2skd.models import sparse_torch
from m2skd.models.layers import SparseConv, SparseConvTranspose, voxelize

pytestmark = ME_WARNINGS


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one thread avoids OpenMP spin-wait thrash on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# torch backend on its own
# ------------------------------------------------------------------------------------------


def test_kernel_offsets_follow_me_order():
    off3 = sparse_torch.kernel_offsets(3)
    assert off3[0].tolist() == [-1, -1, -1] and off3[1].tolist() == [0, -1, -1]
    assert off3[3].tolist() == [-1, 0, -1] and off3[13].tolist() == [0, 0, 0]
    assert off3[24].tolist() == [-1, 1, 1]
    off2 = sparse_torch.kernel_offsets(2)
    assert off2.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("kernel_size,stride,transposed", [(3, 1, False), (2, 2, False), (3, 2, False), (2, 2, True), (3, 2, True)])
def test_torch_conv_gradcheck(kernel_size, stride, transposed):
    coords, _ = scene(60, seed=1, voxel=1.5)
    x, _ = voxelize(coords, torch.randn(len(coords), 2, dtype=torch.float64), "torch")
    if transposed:
        coarse = SparseConv(2, 2, 2, stride).double()(x)
        layer = SparseConvTranspose(2, 3, kernel_size, stride).double()
        feats = torch.randn(len(coarse.features), 2, dtype=torch.float64, requires_grad=True)
        fn = lambda f, w: sparse_torch.conv_transpose_forward(x.space, f, coarse.stride, w, kernel_size, stride, 1)[0]  # noqa: E731
    else:
        layer = SparseConv(2, 3, kernel_size, stride).double()
        feats = torch.randn(len(x.features), 2, dtype=torch.float64, requires_grad=True)
        fn = lambda f, w: sparse_torch.conv_forward(x.space, f, 1, w, kernel_size, stride, 1)[0]  # noqa: E731
    weight = layer.kernel.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (feats, weight), fast_mode=True)


@pytest.mark.parametrize("variant", ["gpu_grouping", "chunked"])
def test_alternative_code_paths_match_fused_path(monkeypatch, variant):
    """The GPU's offset grouping (few padded buckets) and the memory-bounded chunked path agree
    with the CPU grouping in one chunk, forward and backward."""
    coords, feats = scene(1500, seed=2, dtype=torch.float64)
    model = build_model(4, 5, depth=18, backend="torch", **SMALL).double()

    def run():
        model.zero_grad()
        point_feats = feats.clone().requires_grad_(True)
        out = model(coords, point_feats, features=("dec3",))
        (out.logits.square().sum() + out.features["dec3"].sum()).backward()
        return out.logits.detach(), point_feats.grad, [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(sparse_torch, "GROUPING", "cpu")
    ref = run()
    if variant == "gpu_grouping":
        monkeypatch.setattr(sparse_torch, "GROUPING", "gpu")
    else:
        monkeypatch.setattr(sparse_torch, "_MAX_CHUNK_ELEMENTS", 4000)
    alt = run()
    assert rel_err(alt[0], ref[0]) < 1e-10
    assert rel_err(alt[1], ref[1]) < 1e-10
    assert max(rel_err(a, b) for a, b in zip(alt[2], ref[2])) < 1e-10


def test_public_api_and_parameter_counts():
    model = build_model(in_channels=4, num_classes=20, depth=34, backend="torch")
    assert model.backend == "torch"
    widths = {"dec1": 256, "dec2": 128, "dec3": 96, "dec4": 96}
    assert model.feature_channels == {**widths, **{f"{k}_preact": v for k, v in widths.items()}}
    n34 = count_parameters(model)
    n18 = count_parameters(build_model(4, 20, depth=18, backend="torch"))
    assert 30e6 < n34 < 45e6 and 15e6 < n18 < n34
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") in ("torch", "minkowski")
    with pytest.raises(ValueError):
        resolve_backend("spconv")
    coords, feats = scene(800, seed=3)
    model = build_model(4, 7, depth=18, backend="torch", **SMALL)
    assert model(coords, feats).features == {}  # none unless asked for
    with pytest.raises(KeyError, match="features=\\('dec4',\\)"):
        model(coords, feats).features["dec4"]
    with pytest.raises(ValueError):
        model(coords, feats, features=("dec5",))
    assert set(model(coords, feats, features=("dec2",)).features) == {"dec2"}
    out = model(coords, feats, features=FEATURE_NAMES)
    assert out.logits.shape == (800, 7)
    widths = {"dec1": 16, "dec2": 12, "dec3": 8, "dec4": 8}
    assert {k: v.shape[1] for k, v in out.features.items()} == {**widths, **{f"{k}_preact": v for k, v in widths.items()}}
    assert all(v.shape[0] == 800 for v in out.features.values())
    # a stage's output is the ReLU of its pre-activation features, which have sign
    for name in widths:
        torch.testing.assert_close(out.features[name], torch.relu(out.features[f"{name}_preact"]))
        assert (out.features[f"{name}_preact"] < 0).any()
    # asking for the pre-activation features changes nothing else
    plain = model(coords, feats, features=("dec4",))
    assert torch.equal(plain.logits, out.logits) and torch.equal(plain.features["dec4"], out.features["dec4"])


def _slice_checks(backend):
    torch.manual_seed(0)
    model = build_model(4, 6, depth=18, backend=backend, **SMALL).eval()
    coords, feats = scene(1200, seed=4)
    coords = torch.cat([coords, coords[:50]])  # exact duplicates: same voxel, same features
    feats = torch.cat([feats, feats[:50]])
    with torch.no_grad():
        out = model(coords, feats, features=FEATURE_NAMES)
        perm = torch.randperm(len(coords))
        out_perm = model(coords[perm], feats[perm], features=FEATURE_NAMES)
    assert out.logits.shape[0] == len(coords)
    torch.testing.assert_close(out_perm.logits, out.logits[perm], rtol=1e-4, atol=1e-5)
    for name in out.features:
        torch.testing.assert_close(out_perm.features[name], out.features[name][perm], rtol=1e-4, atol=1e-5)
    # every point of one voxel gets that voxel's row
    keys = coords[:, 0] * 10**9 + coords[:, 1] * 10**6 + coords[:, 2] * 10**3 + coords[:, 3]
    _, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(keys)), "amin", include_self=False)
    assert torch.equal(out.logits, out.logits[first[inverse]])
    assert torch.equal(out.features["dec2"], out.features["dec2"][first[inverse]])


def test_slice_order_torch():
    _slice_checks("torch")


def test_slice_order_minkowski():
    require_minkowski()
    _slice_checks("minkowski")


def _batch_checks(backend):
    torch.manual_seed(0)
    model = build_model(4, 6, depth=18, backend=backend, **SMALL).eval()
    c0, f0 = scene(900, seed=5)
    c1, f1 = scene(700, seed=6)
    c1[:, 0] = 1
    with torch.no_grad():
        both = model(torch.cat([c0, c1]), torch.cat([f0, f1])).logits
        alone0 = model(c0, f0).logits
        c1_alone = c1.clone()
        c1_alone[:, 0] = 0
        alone1 = model(c1_alone, f1).logits
    torch.testing.assert_close(both[: len(c0)], alone0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[len(c0):], alone1, rtol=1e-4, atol=1e-5)


def test_batch_index_respected_torch():
    _batch_checks("torch")


def test_batch_index_respected_minkowski():
    require_minkowski()
    _batch_checks("minkowski")


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    model = build_model(4, 6, depth=18, backend="torch", **SMALL).eval()
    coords, feats = scene(800, seed=7)
    with torch.no_grad():
        ref = model(coords, feats).logits
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = model(coords, feats).logits
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert float((low.float() - ref).norm() / ref.norm()) < 0.05
    # and it trains: gradients flow under autocast
    model.train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = model(coords, feats).logits.float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_checkpoint_roundtrip_torch(tmp_path):
    _checkpoint_checks(tmp_path, "torch", "torch")


def test_checkpoint_across_backends(tmp_path):
    require_minkowski()
    _checkpoint_checks(tmp_path, "torch", "minkowski")
    _checkpoint_checks(tmp_path, "minkowski", "torch")


def _checkpoint_checks(tmp_path, saved_under, loaded_under):
    torch.manual_seed(1)
    model = build_model(4, 6, depth=18, backend=saved_under, **SMALL)
    coords, feats = scene(1500, seed=8)
    model.train()
    with torch.no_grad():
        model(coords, feats)  # populate BN running statistics
    model.eval()
    with torch.no_grad():
        ref = model(coords, feats, features=FEATURE_NAMES)
    path = tmp_path / f"{saved_under}.pt"
    torch.save(model.state_dict(), path)
    other = build_model(4, 6, depth=18, backend=loaded_under, **SMALL)
    assert set(other.state_dict()) == set(model.state_dict())
    other.load_state_dict(torch.load(path, weights_only=True))
    other.eval()
    with torch.no_grad():
        out = other(coords, feats, features=FEATURE_NAMES)
    assert rel_err(out.logits, ref.logits) < 1e-4
    for name in ref.features:
        assert rel_err(out.features[name], ref.features[name]) < 1e-4


def test_set_backend_switches_in_place():
    require_minkowski()
    model = build_model(4, 6, depth=18, backend="torch", **SMALL).eval()
    params_before = [p.data_ptr() for p in model.parameters()]
    coords, feats = scene(1000, seed=9)
    with torch.no_grad():
        a = model(coords, feats).logits
        model.set_backend("minkowski")
        assert model.backend == "minkowski"
        b = model(coords, feats).logits
    assert [p.data_ptr() for p in model.parameters()] == params_before
    assert rel_err(a, b) < 1e-4


# ------------------------------------------------------------------------------------------
# torch backend vs MinkowskiEngine
# ------------------------------------------------------------------------------------------

LAYER_CASES = [(t, k, s, 1) for t in (False, True) for k in (2, 3, 5) for s in (1, 2)]
LAYER_CASES += [(False, 3, 1, 2), (True, 3, 2, 2)]  # dilation


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("transposed,kernel_size,stride,dilation", LAYER_CASES)
def test_layer_matches_minkowski(transposed, kernel_size, stride, dilation, dtype, tol):
    """Outputs, kernel gradients and input gradients of one conv agree with ME's."""
    check_layer_matches_minkowski(transposed, kernel_size, stride, dilation, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_minkunet18_matches_minkowski(dtype, tol):
    check_minkunet18_matches_minkowski(dtype, tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_backend_on_cuda_matches_cpu():
    torch.manual_seed(3)
    model = build_model(4, 6, depth=18, backend="torch", **SMALL).eval()
    coords, feats = scene(2000, seed=12)
    with torch.no_grad():
        ref = model(coords, feats).logits
        model.cuda()
        out = model(coords.cuda(), feats.cuda()).logits.cpu()
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            half = model(coords.cuda(), feats.cuda()).logits.float().cpu()
    assert rel_err(out, ref) < 1e-4
    assert torch.isfinite(half).all() and float((half - ref).norm() / ref.norm()) < 0.05


def test_deepcopy_and_pickle_after_minkowski_forward(tmp_path):
    """Teachers/EMA copies are made with deepcopy; whole-model pickles must work too."""
    import copy

    require_minkowski()
    model = build_model(4, 6, depth=18, backend="minkowski", **SMALL).eval()
    coords, feats = scene(600, seed=13)
    with torch.no_grad():
        ref = model(coords, feats).logits
        clone = copy.deepcopy(model)
        torch.save(model, tmp_path / "whole.pt")
        loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
        # ME's summation order varies between runs (hash maps, threads): not bitwise equal
        torch.testing.assert_close(clone(coords, feats).logits, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(coords, feats).logits, ref, rtol=1e-4, atol=1e-5)
