"""Pure-PyTorch sparse convolution core (in the spirit of torchsparse).

Why it exists: MinkowskiEngine has no fp16/bf16 kernels and its CUDA build needs patches, so
this backend gives mixed precision and a dependency-free fallback. It reproduces ME's
conventions exactly so weights are interchangeable:

* coordinates are ``[batch, x, y, z]`` integers; at tensor stride ``s`` they are multiples of
  ``s`` and a stride-``f`` conv maps ``c`` to ``floor(c / (s*f)) * (s*f)``;
* kernel offsets follow ME's enumeration (x fastest, then y, then z); odd kernels are centred
  (``-(k//2) .. k//2``), even kernels run ``0 .. k-1``; offsets are scaled by the *input*
  tensor stride times the dilation, and input site = output site + offset;
* a transposed conv uses the regular map from the finer (output) to the coarser (input) sites,
  with the roles of in and out swapped.

Sites at every stride are kept sorted by a packed int64 key, so a row index *is* the rank of
the key and neighbour lookup is one ``torch.searchsorted`` over all kernel offsets at once.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# Margin (voxels) added around the data's extent in every spatial axis, so that neighbour
# queries (coordinate + offset) and floored coarse coordinates never leave the packed range;
# that keeps packing linear (shifting a coordinate shifts its key), which lets a kernel offset
# be applied to keys directly.
KEY_PAD = 1 << 10
# Rows x channels above which the fused CPU path is split into offset groups (memory bound).
_FUSED_MAX_ELEMENTS = 1 << 27


def kernel_offsets(kernel_size: int, device=None) -> Tensor:
    """(K, 3) int64 offsets in units of (tensor stride x dilation), in ME's order (x fastest)."""
    if kernel_size % 2:
        axis = torch.arange(kernel_size, device=device) - kernel_size // 2
    else:
        axis = torch.arange(kernel_size, device=device)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=1)


class KeyPacker:
    """Mixed-radix packing of (batch, x, y, z) into one int64 key (batch most significant).

    The radices come from the data's extent plus ``KEY_PAD`` so every key that a forward pass
    can query fits; sorting keys sorts by batch first, which keeps samples contiguous.
    """

    def __init__(self, coords: Tensor, pad: int = KEY_PAD):
        lo = coords.amin(0)
        hi = coords.amax(0)
        pad_vec = torch.tensor([0, pad, pad, pad], dtype=torch.int64, device=coords.device)
        lo = lo - pad_vec
        hi = hi + pad_vec
        sizes = (hi - lo + 1).tolist()
        mult = [sizes[1] * sizes[2] * sizes[3], sizes[2] * sizes[3], sizes[3], 1]
        if mult[0] * sizes[0] >= 2**62:
            raise ValueError(f"coordinate extent {sizes} too large to pack into int64 keys")
        self.pad = pad
        self.lo = lo
        self.mult = torch.tensor(mult, dtype=torch.int64, device=coords.device)
        self._mult = mult

    def pack(self, coords: Tensor) -> Tensor:
        return ((coords - self.lo) * self.mult).sum(1)

    def unpack(self, keys: Tensor) -> Tensor:
        cols = []
        rest = keys
        for m in self._mult[:-1]:
            cols.append(torch.div(rest, m, rounding_mode="floor"))
            rest = rest - cols[-1] * m
        cols.append(rest)
        return torch.stack(cols, dim=1) + self.lo

    def offset_keys(self, offsets: Tensor) -> Tensor:
        """Key shift of each (K, 3) spatial offset (packing is linear inside the padded box)."""
        return (offsets * self.mult[1:]).sum(1)


@dataclass
class SiteSet:
    """Active sites at one tensor stride: coordinates and their keys, sorted by key."""

    coords: Tensor  # (M, 4) int64
    keys: Tensor  # (M,) int64, strictly increasing
    stride: int

    def __len__(self) -> int:
        return self.keys.numel()

    def lookup(self, query_keys: Tensor) -> tuple[Tensor, Tensor]:
        """Row of each query key and whether it exists (vectorised binary search)."""
        pos = torch.searchsorted(self.keys, query_keys)
        pos.clamp_(max=max(len(self) - 1, 0))
        hit = self.keys[pos] == query_keys if len(self) else torch.zeros_like(query_keys, dtype=torch.bool)
        return pos, hit


class KernelMap:
    """Input/output row pairs of a sparse conv, grouped by kernel offset (ME order).

    ``identity_offset`` names an offset whose pairs are (i, i) for every row (the centre of a
    stride-1 odd kernel); its pairs are not stored and it is computed as one dense matmul.
    A map and its transpose are twins sharing one cache of scatter matrices.
    """

    def __init__(self, in_idx: Tensor, out_idx: Tensor, counts: list[int], n_in: int, n_out: int,
                 identity_offset: int | None = None):
        self.in_idx = in_idx
        self.out_idx = out_idx
        self.counts = counts  # stored pairs per offset (0 for the identity offset)
        self.n_in = n_in
        self.n_out = n_out
        self.identity_offset = identity_offset
        self._scatter_cache: dict = {}
        self._flipped = False
        self._twin: KernelMap | None = None
        self._segments = None

    @property
    def kernel_volume(self) -> int:
        return len(self.counts)

    def segments(self) -> list[tuple[int, int, int]]:
        """(offset, start, end) of each non-empty group of stored pairs."""
        if self._segments is None:
            out, start = [], 0
            for k, count in enumerate(self.counts):
                if count:
                    out.append((k, start, start + count))
                start += count
            self._segments = out
        return self._segments

    def transposed(self) -> "KernelMap":
        """The same pairs with in and out swapped (built once, shares the scatter caches)."""
        if self._twin is None:
            twin = KernelMap(self.out_idx, self.in_idx, self.counts, self.n_out, self.n_in,
                             self.identity_offset)
            twin._scatter_cache = self._scatter_cache
            twin._flipped = not self._flipped
            twin._twin, self._twin = self, twin
        return self._twin

    def scatter_matrix(self, side: str, start: int, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """CSR (rows of ``side``) x (pairs start:end) 0/1 matrix: scatter-add as one SpMM.

        On CPU, MKL's CSR SpMM is several times faster than ``index_add_`` for narrow rows.
        """
        physical = side if not self._flipped else ("in" if side == "out" else "out")
        cache_key = (physical, start, end, dtype, device)
        csr = self._scatter_cache.get(cache_key)
        if csr is None:
            idx = (self.out_idx if side == "out" else self.in_idx)[start:end]
            n_rows = self.n_out if side == "out" else self.n_in
            index_dtype = torch.int32 if idx.numel() < 2**31 - 1 else torch.int64
            order = torch.sort(idx, stable=True).indices
            crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
            crow[1:] = torch.cumsum(torch.bincount(idx, minlength=n_rows), 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                csr = torch.sparse_csr_tensor(
                    crow.to(index_dtype),
                    order.to(index_dtype),
                    torch.ones(idx.numel(), dtype=dtype, device=device),
                    size=(n_rows, idx.numel()),
                    check_invariants=False,
                )
            self._scatter_cache[cache_key] = csr
        return csr


class SparseContext:
    """Per-forward coordinate bookkeeping: site sets by stride, parent maps, kernel-map cache.

    One context lives for one forward pass; every conv at the same (strides, kernel, dilation)
    reuses the cached kernel map, which is what keeps the backend fast.
    """

    def __init__(self, packer: KeyPacker):
        self.packer = packer
        self.sites: dict[int, SiteSet] = {}
        self.parent_index: dict[tuple[int, int], Tensor] = {}
        self.kernel_maps: dict[tuple, KernelMap] = {}

    @classmethod
    def from_coordinates(cls, coords: Tensor) -> tuple["SparseContext", Tensor]:
        """Voxelise (N, 4) integer coordinates: the context (stride-1 sites) and point -> row."""
        coords = coords.to(torch.int64)
        packer = KeyPacker(coords)
        keys = packer.pack(coords)
        unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        ctx = cls(packer)
        ctx.sites[1] = SiteSet(packer.unpack(unique_keys), unique_keys, 1)
        return ctx, inverse

    def downsample(self, stride: int, factor: int) -> int:
        """Create (once) the sites at ``stride * factor``: unique floored coordinates."""
        out_stride = stride * factor
        if out_stride not in self.sites:
            fine = self.sites[stride]
            coarse = fine.coords.clone()
            coarse[:, 1:] = torch.div(coarse[:, 1:], out_stride, rounding_mode="floor") * out_stride
            keys, parent = torch.unique(self.packer.pack(coarse), sorted=True, return_inverse=True)
            self.sites[out_stride] = SiteSet(self.packer.unpack(keys), keys, out_stride)
            self.parent_index[(stride, out_stride)] = parent
        return out_stride

    def rows_at(self, rows: Tensor, stride: int) -> Tensor:
        """Map stride-1 rows to the rows of their containing sites at ``stride``."""
        current = 1
        while current != stride:
            nxt = next((b for (a, b) in self.parent_index if a == current), None)
            if nxt is None or stride % nxt:
                coords = self.sites[1].coords[rows].clone()
                coords[:, 1:] = torch.div(coords[:, 1:], stride, rounding_mode="floor") * stride
                pos, _ = self.sites[stride].lookup(self.packer.pack(coords))
                return pos
            rows = self.parent_index[(current, nxt)][rows]
            current = nxt
        return rows

    def kernel_map(self, in_stride: int, out_stride: int, kernel_size: int, dilation: int = 1) -> KernelMap:
        """Regular-conv map from sites at ``in_stride`` to sites at ``out_stride`` (cached)."""
        cache_key = (in_stride, out_stride, kernel_size, dilation)
        kmap = self.kernel_maps.get(cache_key)
        if kmap is None:
            kmap = self._build_kernel_map(in_stride, out_stride, kernel_size, dilation)
            self.kernel_maps[cache_key] = kmap
        return kmap

    def _build_kernel_map(self, in_stride, out_stride, kernel_size, dilation) -> KernelMap:
        src, dst = self.sites[in_stride], self.sites[out_stride]
        offsets = kernel_offsets(kernel_size, device=src.keys.device) * (in_stride * dilation)
        reach = int(offsets.abs().max()) + out_stride
        if reach > self.packer.pad:
            raise ValueError(f"kernel reach {reach} exceeds the key padding {self.packer.pad}")
        volume = offsets.shape[0]
        factor = out_stride // in_stride
        if (
            out_stride != in_stride
            and kernel_size == factor
            and kernel_size % 2 == 0
            and dilation == 1
            and (in_stride, out_stride) in self.parent_index
        ):
            return self._block_map(src, dst, factor)
        if src is dst and kernel_size % 2:
            # Symmetric: offset K-1-k is -offset k, so its pairs are the swapped pairs of k,
            # and the centre is the identity; search only the first half.
            half = volume // 2
            pos, hit = src.lookup(dst.keys[None, :] + self.packer.offset_keys(offsets[:half])[:, None])
            k_idx, out_rows = hit.nonzero(as_tuple=True)
            in_rows = pos[k_idx, out_rows]
            counts_half = torch.bincount(k_idx, minlength=half).tolist()
            in_parts = list(torch.split(in_rows, counts_half))
            out_parts = list(torch.split(out_rows, counts_half))
            in_idx = torch.cat(in_parts + out_parts[::-1])
            out_idx = torch.cat(out_parts + in_parts[::-1])
            counts = counts_half + [0] + counts_half[::-1]
            return KernelMap(in_idx, out_idx, counts, len(src), len(dst), identity_offset=half)
        pos, hit = src.lookup(dst.keys[None, :] + self.packer.offset_keys(offsets)[:, None])
        k_idx, out_rows = hit.nonzero(as_tuple=True)
        counts = torch.bincount(k_idx, minlength=volume).tolist()
        return KernelMap(pos[k_idx, out_rows], out_rows, counts, len(src), len(dst))

    def _block_map(self, src: SiteSet, dst: SiteSet, factor: int) -> KernelMap:
        """Kernel == stride (even): each fine site feeds exactly its parent, at one offset."""
        parent = self.parent_index[(src.stride, dst.stride)]
        rel = torch.div(src.coords[:, 1:] - dst.coords[parent, 1:], src.stride, rounding_mode="floor")
        k_idx = rel[:, 0] + factor * (rel[:, 1] + factor * rel[:, 2])
        k_sorted, order = torch.sort(k_idx, stable=True)
        counts = torch.bincount(k_sorted, minlength=factor**3).tolist()
        return KernelMap(order, parent[order], counts, len(src), len(dst))


# --------------------------------------------------------------------------------------------
# Convolution arithmetic
# --------------------------------------------------------------------------------------------


def _use_spmm(x: Tensor) -> bool:
    """CPU: fused gathers into reused scratch and one CSR SpMM scatter per conv (or group).

    Elsewhere (CUDA) per-offset ``index_add_`` is used: atomics are fast there and the caching
    allocator already reuses memory.
    """
    return x.device.type == "cpu"


class _Scratch(threading.local):
    """Reusable CPU scratch matrices for gathered rows and partial products.

    Fresh allocations of hundreds of MB are handed back to the OS on free and page-faulted in
    again on the next conv; measured, that costs ~10x the gather itself. Per thread, so
    concurrent forwards in one process do not share buffers.
    """

    def __init__(self):
        self.buffers: dict[tuple[int, torch.dtype], Tensor] = {}


_SCRATCH = _Scratch()


def _scratch(slot: int, rows: int, cols: int, like: Tensor) -> Tensor:
    """A (rows, cols) CPU matrix backed by the thread's reusable buffer ``slot``."""
    need = rows * cols
    buf = _SCRATCH.buffers.get((slot, like.dtype))
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=like.dtype)
        _SCRATCH.buffers[(slot, like.dtype)] = buf
    return buf[:need].view(rows, cols)


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers (they are kept between convs for speed)."""
    _SCRATCH.buffers.clear()


def _offset_groups(kmap: KernelMap, width: int) -> list[list[tuple[int, int, int]]]:
    """Split the offset segments so one group's gathered rows x width stays bounded."""
    groups, current, rows = [], [], 0
    for seg in kmap.segments():
        n = seg[2] - seg[1]
        if current and (rows + n) * width > _FUSED_MAX_ELEMENTS:
            groups.append(current)
            current, rows = [], 0
        current.append(seg)
        rows += n
    if current:
        groups.append(current)
    return groups


def _scatter_add(out: Tensor | None, rows: Tensor, kmap: KernelMap, side: str, start: int, end: int) -> Tensor:
    """out (+)= rows of pairs start:end summed into their ``side`` rows, as one CSR SpMM.

    MKL's CSR kernels take fp32/fp64 only; reduced precision is summed in fp32 and cast back
    (CPU ``index_add_`` on bf16 is an order of magnitude slower).
    """
    dtype = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
    contrib = torch.mm(kmap.scatter_matrix(side, start, end, dtype, rows.device), rows.to(dtype))
    contrib = contrib.to(rows.dtype)
    return contrib if out is None else out.add_(contrib)


def _kernel(weight: Tensor, k: int, transpose_weight: bool) -> Tensor:
    return weight[k].t() if transpose_weight else weight[k]


def _apply_pairs(x: Tensor, weight: Tensor, kmap: KernelMap, transpose_weight: bool) -> Tensor:
    """out[o] = sum over pairs (i, o) at offset k of x[i] @ W_k (W_k^T if ``transpose_weight``)."""
    width = weight.shape[1] if transpose_weight else weight.shape[2]
    out = None
    if kmap.identity_offset is not None:
        out = torch.mm(x, _kernel(weight, kmap.identity_offset, transpose_weight))
    if not kmap.in_idx.numel():
        return out if out is not None else x.new_zeros(kmap.n_out, width)
    if not _use_spmm(x):
        # GPU / reduced precision: per offset gather, GEMM, index_add_ (atomic on CUDA).
        if out is None:
            out = x.new_zeros(kmap.n_out, width)
        for k, s, e in kmap.segments():
            rows = torch.mm(x.index_select(0, kmap.in_idx[s:e]), _kernel(weight, k, transpose_weight))
            out.index_add_(0, kmap.out_idx[s:e], rows)
        return out
    for group in _offset_groups(kmap, max(width, x.shape[1])):
        start, end = group[0][1], group[-1][2]
        gathered = torch.index_select(x, 0, kmap.in_idx[start:end], out=_scratch(0, end - start, x.shape[1], x))
        partial = _scratch(1, end - start, width, x)
        for k, s, e in group:
            torch.mm(gathered[s - start : e - start], _kernel(weight, k, transpose_weight),
                     out=partial[s - start : e - start])
        out = _scatter_add(out, partial, kmap, "out", start, end)
    return out


def _backward(x: Tensor, weight: Tensor, grad_out: Tensor, kmap: KernelMap, need_x: bool, need_w: bool):
    """Gradients of ``_apply_pairs(x, weight, kmap, False)``; gathers of grad_out are shared."""
    grad_x = grad_w = None
    if need_w:
        grad_w = grad_out.new_zeros(weight.shape)
    c = kmap.identity_offset
    if c is not None:
        if need_w:
            torch.mm(x.t(), grad_out, out=grad_w[c])
        if need_x:
            grad_x = torch.mm(grad_out, weight[c].t())
    if not kmap.in_idx.numel():
        if need_x and grad_x is None:
            grad_x = x.new_zeros(x.shape)
        return grad_x, grad_w
    if not _use_spmm(x):
        if need_x and grad_x is None:
            grad_x = x.new_zeros(x.shape)
        for k, s, e in kmap.segments():
            g_rows = grad_out.index_select(0, kmap.out_idx[s:e])
            if need_w:
                torch.mm(x.index_select(0, kmap.in_idx[s:e]).t(), g_rows, out=grad_w[k])
            if need_x:
                grad_x.index_add_(0, kmap.in_idx[s:e], torch.mm(g_rows, weight[k].t()))
        return grad_x, grad_w
    for group in _offset_groups(kmap, max(x.shape[1], grad_out.shape[1])):
        start, end = group[0][1], group[-1][2]
        g_rows = torch.index_select(grad_out, 0, kmap.out_idx[start:end],
                                    out=_scratch(1, end - start, grad_out.shape[1], grad_out))
        x_rows = _scratch(0, end - start, x.shape[1], x)  # x rows, then reused for grad rows
        if need_w:
            torch.index_select(x, 0, kmap.in_idx[start:end], out=x_rows)
        for k, s, e in group:
            rows = slice(s - start, e - start)
            if need_w:
                torch.mm(x_rows[rows].t(), g_rows[rows], out=grad_w[k])
            if need_x:
                torch.mm(g_rows[rows], weight[k].t(), out=x_rows[rows])
        if need_x:
            grad_x = _scatter_add(grad_x, x_rows, kmap, "in", start, end)
    return grad_x, grad_w


class SparseConvFunction(torch.autograd.Function):
    """Gather-GEMM-scatter sparse conv; backward recomputes gathers instead of storing them."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
        features = features.contiguous()
        ctx.kmap = kmap
        ctx.save_for_backward(features, weight)
        return _apply_pairs(features, weight, kmap, transpose_weight=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight = ctx.saved_tensors
        grad_features, grad_weight = _backward(
            features, weight, grad_out.contiguous(), ctx.kmap, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return grad_features, grad_weight, None


def _compute_dtype(features: Tensor, weight: Tensor) -> torch.dtype:
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(features.dtype, weight.dtype)


def sparse_conv(features: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    """Sparse conv with a matmul's autocast semantics: the result has the autocast dtype.

    On CUDA the arithmetic runs in that dtype. On CPU it runs in fp32 and is cast: CPU
    bf16/fp16 GEMMs are emulated on most CPUs and re-planned for every per-offset shape,
    which measured ~30x slower than fp32.
    """
    dtype = _compute_dtype(features, weight)
    compute = dtype
    if features.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        compute = torch.float32
    with torch.autocast(features.device.type, enabled=False):
        out = SparseConvFunction.apply(features.to(compute), weight.to(compute), kmap)
    return out.to(dtype)


def conv_forward(ctx: SparseContext, features: Tensor, stride: int, weight: Tensor,
                 kernel_size: int, conv_stride: int, dilation: int) -> tuple[Tensor, int]:
    """Regular (possibly strided) conv from sites at ``stride``; returns features, out stride."""
    out_stride = ctx.downsample(stride, conv_stride) if conv_stride > 1 else stride
    kmap = ctx.kernel_map(stride, out_stride, kernel_size, dilation)
    return sparse_conv(features, weight, kmap), out_stride


def conv_transpose_forward(ctx: SparseContext, features: Tensor, stride: int, weight: Tensor,
                           kernel_size: int, conv_stride: int, dilation: int) -> tuple[Tensor, int]:
    """Transposed conv back onto the stored sites at ``stride // conv_stride``."""
    out_stride = stride // conv_stride
    if out_stride * conv_stride != stride or out_stride not in ctx.sites:
        raise ValueError(f"no stored sites at stride {out_stride} for a transposed conv from {stride}")
    kmap = ctx.kernel_map(out_stride, stride, kernel_size, dilation).transposed()
    return sparse_conv(features, weight, kmap), out_stride


def voxel_average(features: Tensor, inverse: Tensor, n_voxels: int) -> Tensor:
    """Mean of the point features in each voxel (ME's UNWEIGHTED_AVERAGE quantisation)."""
    counts = torch.bincount(inverse, minlength=n_voxels).clamp_(min=1)
    summed = features.new_zeros(n_voxels, features.shape[1]).index_add_(0, inverse, features)
    return summed / counts.to(summed.dtype)[:, None]
