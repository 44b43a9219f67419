"""The torch backend's convolution as a GPU runs it, checked on CPU.

``sparse_torch.GROUPING = "gpu"`` makes a CPU run use the GPU's offset grouping (few padded
buckets, no scratch reuse) and ``SEGMENTED_SUMS = True`` its summation (a segmented sum, not
a CSR product), so these tests exercise the code a CUDA device executes: agreement
with MinkowskiEngine, the reduced-precision arithmetic (fp16/bf16 operands, fp32 sums, one
rounding), bitwise repeatability, dispatch counts and the absence of host synchronisation.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_helpers as sh
from m2skd.models import build_model, sparse_torch

pytestmark = sh.ME_WARNINGS


@pytest.fixture(autouse=True)
def gpu_grouping(monkeypatch):
    monkeypatch.setattr(sparse_torch, "GROUPING", "gpu")
    monkeypatch.setattr(sparse_torch, "SEGMENTED_SUMS", True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; see test_backbone._single_thread
    yield
    torch.set_num_threads(before)


def stride1_map(n=3000, seed=0, voxel=0.3):
    coords, _ = sh.scene(n, seed=seed, voxel=voxel)
    ctx, _ = sparse_torch.SparseContext.from_coordinates(coords)
    return ctx.kernel_map(1, 1, 3)


def test_gpu_grouping_is_the_one_that_runs():
    """Guard for the tests below: the forced grouping really is the padded few-bucket one."""
    kmap = stride1_map()
    assert set(kmap._layouts) == {"gpu"}
    lay = kmap._layouts["gpu"]
    assert 1 < len(lay.buckets) <= sparse_torch.GPU_BUCKETS
    assert lay.rows > sum(kmap.counts)  # padded rows exist
    cpu = kmap.layout("cpu")
    assert len(cpu.buckets) > sparse_torch.GPU_BUCKETS and cpu.rows == sum(kmap.counts)


def test_bucket_plan_is_the_least_padding():
    """The DP's cut of offsets (sorted by pair count) into <= B buckets pads the fewest rows."""
    import itertools

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        counts = torch.randint(0, 50, (9,), generator=g).tolist()
        for top in (1, 2, 3):
            plan = sparse_torch._bucket_plan(counts, top)
            assert sorted(k for run in plan for k in run) == [k for k, c in enumerate(counts) if c]
            assert len(plan) <= top
            padded = sum(len(run) * max(counts[k] for k in run) for run in plan)
            c = sorted((x for x in counts if x), reverse=True)
            best = min(sum((j - i) * c[i] for i, j in zip((0,) + cuts, cuts + (len(c),)))
                       for m in range(min(top, len(c))) for cuts in itertools.combinations(range(1, len(c)), m))
            assert padded == best
    exact = sparse_torch._bucket_plan([4, 0, 4, 2, 9], None)
    assert exact == [[4], [0, 2], [3]]  # one bucket per distinct count: no padding


# ------------------------------------------------------------------------------------------
# fp32 agreement with MinkowskiEngine on the GPU grouping
# ------------------------------------------------------------------------------------------

GPU_LAYER_CASES = [(False, 3, 1, 1), (False, 2, 2, 1), (False, 3, 2, 1), (False, 5, 1, 1), (False, 3, 1, 2),
                   (True, 2, 2, 1), (True, 3, 2, 1), (True, 5, 1, 1), (True, 3, 2, 2)]


@pytest.mark.parametrize("transposed,kernel_size,stride,dilation", GPU_LAYER_CASES)
def test_gpu_grouping_layer_matches_minkowski(transposed, kernel_size, stride, dilation):
    sh.check_layer_matches_minkowski(transposed, kernel_size, stride, dilation, torch.float32, 1e-4)


def test_gpu_grouping_minkunet18_matches_minkowski():
    sh.check_minkunet18_matches_minkowski(torch.float32, 1e-4)


# ------------------------------------------------------------------------------------------
# reduced precision: fp16/bf16 operands, fp32 accumulation, one rounding
# ------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def old_style_forward(x, w, kmap, dtype):
    """The former GPU arithmetic: per offset a GEMM rounded to ``dtype``, summed by index_add_ in
    ``dtype`` (each partial and each running sum rounded)."""
    out = torch.mm(x, w[kmap.identity_offset]) if kmap.identity_offset is not None else None
    out = torch.zeros(kmap.n_out, w.shape[2], dtype=dtype) if out is None else out
    start = 0
    for k, count in enumerate(kmap.counts):
        if count:
            rows = slice(start, start + count)
            out.index_add_(0, kmap.out_idx[rows], torch.mm(x[kmap.in_idx[rows]], w[k]))
        start += count
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_accumulates_in_fp32(dtype):
    kmap = stride1_map(2000, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(kmap.n_in, 32, generator=g).to(dtype)
    w = (torch.randn(27, 32, 16, generator=g) / 30).to(dtype)
    grad_out = torch.randn(kmap.n_out, 16, generator=g).to(dtype)
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    y = sparse_torch.sparse_conv(xr, wr, kmap)
    gx, gw = torch.autograd.grad(y, (xr, wr), grad_out)
    assert y.dtype == gx.dtype == gw.dtype == dtype

    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    ref = sparse_torch.sparse_conv(x64, w64, kmap)  # exact products of the rounded operands
    gx64, gw64 = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    u = UNIT_ROUNDOFF[dtype]

    def err(a, b):
        return sh.rel_err(a.detach().double(), b.detach())

    # One rounding of an fp32 sum: every element within u of the exact value (+ fp32 noise).
    scale = ref.abs().max()
    y, ref = y.detach(), ref.detach()
    assert ((y.double() - ref).abs() <= u * ref.abs() + 1e-5 * scale).all()
    assert ((gx.double() - gx64).abs() <= u * gx64.abs() + 1e-5 * gx64.abs().max()).all()
    old = old_style_forward(x, w, kmap, dtype)
    assert err(y, ref) < 0.75 * err(old, ref), (err(y, ref), err(old, ref))
    assert err(y, ref) <= u
    # The weight gradient of an fp32 master weight is a sum over all pairs: kept unrounded in
    # fp32 until autograd casts it to the parameter's dtype.
    w32 = w.float().requires_grad_(True)
    gw32 = torch.autograd.grad(sparse_torch.sparse_conv(x, w32, kmap), w32, grad_out)[0]
    assert gw32.dtype == torch.float32 and err(gw32, gw64) < 1e-5


def test_cuda_gemm_calls_are_valid():
    """The CUDA branch (``out_dtype`` GEMMs on fp16/bf16 operands) never runs on CPU; its
    signatures are checked on meta tensors."""
    a = torch.empty(3, 5, 4, dtype=torch.bfloat16, device="meta")
    b = torch.empty(3, 4, 6, dtype=torch.bfloat16, device="meta")
    out = torch.empty(20, 6, device="meta")[2:17].view(3, 5, 6)
    assert sparse_torch._bmm(a, b, out=out).dtype == torch.float32
    assert sparse_torch._bmm(a.half(), b.half()).dtype == torch.float32
    assert sparse_torch._mm(a[0], b[0]).dtype == torch.float32
    cpu = sparse_torch._operand(torch.randn(4, 3), torch.bfloat16)
    assert cpu.dtype == torch.float32 and torch.equal(cpu, cpu.bfloat16().float())


# ------------------------------------------------------------------------------------------
# bitwise repeatability, dispatches, host synchronisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["gpu", "cpu"])
def test_two_runs_identical_bits_at_two_threads(monkeypatch, grouping):
    monkeypatch.setattr(sparse_torch, "GROUPING", grouping)
    torch.set_num_threads(2)
    torch.manual_seed(5)
    model = build_model(4, 6, depth=18, backend="torch", **sh.SMALL).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    coords, feats = sh.scene(4000, batches=2, seed=21)

    def run():
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        point_feats = feats.clone().requires_grad_(True)
        out = model(coords, point_feats, features=("dec4",))
        (out.logits.square().mean() + out.features["dec4"].mean()).backward()
        return [out.logits, point_feats.grad] + [p.grad for p in model.parameters()]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_conv_dispatches(kmap, c_in=16, c_out=16):
    x = torch.randn(kmap.n_in, c_in, requires_grad=True)
    w = torch.randn(kmap.kernel_volume, c_in, c_out, requires_grad=True)
    with CountOps() as fwd:
        y = sparse_torch.sparse_conv(x, w, kmap)
    grad = torch.randn_like(y)
    with CountOps() as bwd:
        torch.autograd.grad(y, (x, w), grad)
    return fwd.ops, bwd.ops


def test_dispatches_per_conv_and_no_host_sync():
    """One 3x3x3 stride-1 conv (kernel map prebuilt): few dispatches, no atomics, no sync."""
    kmap = stride1_map()
    fwd, bwd = count_conv_dispatches(kmap)
    assert sum(fwd.values()) <= 12, fwd
    assert sum(bwd.values()) <= 17, bwd  # CUDA sums: gather, segment_reduce, add_
    for ops in (fwd, bwd):
        assert not {"index_add", "index_put", "scatter_add", "index_add_", "index_put_", "scatter_add_"} & set(ops), ops
        assert "_local_scalar_dense" not in ops and "item" not in ops, ops  # .item()/.tolist()/int()
    # a strided conv and a transposed one, too
    coords, _ = sh.scene(3000, seed=0, voxel=0.3)
    ctx, _ = sparse_torch.SparseContext.from_coordinates(coords)
    ctx.downsample(1, 2)
    for kmap in (ctx.kernel_map(1, 2, 3), ctx.kernel_map(1, 2, 2).transposed()):
        fwd, bwd = count_conv_dispatches(kmap)
        assert sum(fwd.values()) <= 12 and sum(bwd.values()) <= 17, (fwd, bwd)
        assert "_local_scalar_dense" not in fwd and "_local_scalar_dense" not in bwd


class FindAtomics(TorchDispatchMode):
    """Records scatter-adds that CUDA runs with atomics (summation order varies run to run)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        accumulate = name.startswith("index_put") and (kwargs or {}).get("accumulate", len(args) > 3 and args[3])
        if name.startswith(("index_add", "scatter_add", "scatter_reduce", "_index_put_impl")) or accumulate:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_atomic_scatter():
    """Voxel averaging, convolutions and the per-point slice (forward and backward) all sum in
    a fixed order, so a CUDA step repeats bit for bit."""
    torch.manual_seed(6)
    model = build_model(4, 6, depth=18, backend="torch", **sh.SMALL).train()
    coords, feats = sh.scene(1500, batches=2, seed=22)
    point_feats = feats.clone().requires_grad_(True)
    with FindAtomics() as mode:
        out = model(coords, point_feats, features=("dec4",))
        (out.logits.square().mean() + out.features["dec4"].mean()).backward()
    assert mode.found == [], mode.found


@pytest.mark.parametrize("weighted", [False, True])
def test_row_sum_adds_each_row_in_source_order(weighted):
    """RowSum against a hand loop that adds each output row's terms one by one in ascending
    source order; the CPU's CSR product and the segmented sum CUDA runs give those bits."""
    g = torch.Generator().manual_seed(4)
    n_rows, n_terms = 7, 600  # ~86 terms a row, one row empty
    index = torch.randint(0, n_rows - 1, (n_terms,), generator=g)
    index[index == 3] = 6
    sources = torch.randperm(n_terms, generator=g)
    values = torch.randn(n_terms, 5, generator=g) * 10 ** torch.randint(-3, 4, (n_terms, 1), generator=g)
    weights = torch.rand(n_terms, generator=g) if weighted else None
    expected = torch.zeros(n_rows, 5)
    for j in range(n_terms):  # ascending j: the order RowSum promises
        term = values[sources[j]] * weights[j] if weighted else values[sources[j]]
        expected[index[j]] += term
    seed = torch.randn(n_rows, 5, generator=g)
    for segmented in (False, True):
        row_sum = sparse_torch.RowSum(index, n_rows, sources=sources, weights=weights, segmented=segmented)
        got = row_sum(values)
        assert torch.equal(got[3], torch.zeros(5))
        if weighted:  # the CSR product may fuse multiply and add: one rounding per term apart
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, expected), f"segmented={segmented}"
        assert torch.allclose(row_sum(values, seed.clone()), seed + got, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# the same properties on a CUDA device (scripts/gpu_check.sh runs these; skipped without one)
# ------------------------------------------------------------------------------------------

def on_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


def cuda_map(n=3000, seed=0):
    coords, _ = sh.scene(n, seed=seed, voxel=0.3)
    ctx, _ = sparse_torch.SparseContext.from_coordinates(coords.cuda())
    return ctx.kernel_map(1, 1, 3)


@on_cuda
@pytest.mark.parametrize("grouping", ["auto", "gpu"])
def test_cuda_fp32_conv_matches_cpu(monkeypatch, grouping):
    """fp32 forward and both gradients on CUDA equal the CPU's GPU grouping (no TF32)."""
    coords, _ = sh.scene(3000, seed=1, voxel=0.3)
    results = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(sparse_torch, "GROUPING", "gpu" if device == "cpu" else grouping)
        ctx, _ = sparse_torch.SparseContext.from_coordinates(coords.to(device))
        kmap = ctx.kernel_map(1, 1, 3)
        assert set(kmap._layouts) == {"gpu"}  # auto picks the GPU grouping on CUDA
        g = torch.Generator().manual_seed(2)
        x = torch.randn(kmap.n_in, 24, generator=g).to(device).requires_grad_(True)
        w = (torch.randn(27, 24, 16, generator=g) / 25).to(device).requires_grad_(True)
        grad = torch.randn(kmap.n_out, 16, generator=g).to(device)
        y = sparse_torch.sparse_conv(x, w, kmap)
        results[device] = [t.detach().cpu() for t in (y, *torch.autograd.grad(y, (x, w), grad))]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert sh.rel_err(cuda, cpu) < 1e-5


@on_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_reduced_precision_accumulates_in_fp32(dtype):
    """cuBLAS ``out_dtype`` GEMMs and the fp32 CSR scatter: one rounding of an fp32 sum."""
    kmap = cuda_map(2000, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(kmap.n_in, 32, generator=g).to(dtype).cuda()
    w = (torch.randn(27, 32, 16, generator=g) / 30).to(dtype).cuda()
    grad_out = torch.randn(kmap.n_out, 16, generator=g).to(dtype).cuda()
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = sparse_torch.sparse_conv(xr, wr, kmap)
    gx, gw = torch.autograd.grad(y, (xr, wr), grad_out)
    assert y.dtype == gx.dtype == gw.dtype == dtype
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = sparse_torch.sparse_conv(x64, w64, kmap)
    gx64, _ = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    u = UNIT_ROUNDOFF[dtype]
    y, ref = y.detach().double(), ref.detach()
    assert ((y - ref).abs() <= u * ref.abs() + 2e-5 * ref.abs().max()).all()
    assert ((gx.double() - gx64).abs() <= u * gx64.abs() + 2e-5 * gx64.abs().max()).all()


@on_cuda
def test_cuda_row_sums_repeat_bit_for_bit():
    """Long rows (200 terms each): cuSPARSE's CSR product splits them across threads and
    differs run to run on an H200; RowSum must not."""
    g = torch.Generator(device="cuda").manual_seed(0)
    index = torch.randint(0, 1000, (200_000,), device="cuda", generator=g)
    values = torch.randn(200_000, 32, device="cuda", generator=g)
    row_sum = sparse_torch.RowSum(index, 1000)
    first = row_sum(values)
    assert all(torch.equal(first, row_sum(values)) for _ in range(5))
    cpu = sparse_torch.RowSum(index.cpu(), 1000)(values.cpu())
    assert torch.equal(first.cpu(), cpu)  # the same order, so the same bits as the CPU


@on_cuda
def test_cuda_training_step_repeats_bit_for_bit():
    """Two forward+backward passes of a MinkUNet18 on CUDA: identical logits and gradients."""
    torch.manual_seed(5)
    model = build_model(4, 6, depth=18, backend="torch", **sh.SMALL).cuda().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    coords, feats = sh.scene(4000, batches=2, seed=21)
    coords, feats = coords.cuda(), feats.cuda()

    def run(amp):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        point_feats = feats.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(coords, point_feats, features=("dec4",))
        (out.logits.float().square().mean() + out.features["dec4"].float().mean()).backward()
        return [out.logits, point_feats.grad] + [p.grad for p in model.parameters()]

    for amp in (False, True):
        first, second = run(amp), run(amp)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), f"bf16 autocast: {amp}"


@on_cuda
def test_cuda_conv_never_synchronises():
    """Once the kernel map exists, a conv forward and backward never wait for the device."""
    kmap = cuda_map()
    x = torch.randn(kmap.n_in, 16, device="cuda", requires_grad=True)
    w = torch.randn(27, 16, 16, device="cuda", requires_grad=True)
    grad = torch.randn(kmap.n_out, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for amp in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                y = sparse_torch.sparse_conv(x, w, kmap)
            torch.autograd.grad(y, (x, w), grad.to(y.dtype))
    finally:
        torch.cuda.set_sync_debug_mode(0)
