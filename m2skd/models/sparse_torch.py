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

One convolution algorithm runs on every device, so the code the CPU tests compare with
MinkowskiEngine is the code a GPU runs:

* the kernel offsets that have pairs are sorted by pair count and cut into a few *buckets*;
  a bucket is one ``(offsets, rows, C)`` block (each offset's pairs padded to the bucket's
  largest count), gathered with one ``index_select`` and multiplied by its kernels with one
  ``torch.bmm``;
* the products are summed into the output rows in a fixed order, each output row's terms in
  ascending layout order, no atomics (``RowSum``: a CSR 0/1 matrix product on the CPU, a
  segmented sum on CUDA, where cuSPARSE's product differs run to run); the centre of a
  stride-1 odd kernel is one dense matmul whose result seeds that sum;
* partial sums are kept in fp32 whatever the autocast dtype and cast once at the end;
* every index, padding and summation structure is built with the kernel map (which synchronises with
  the host once, to learn the pair counts) and cached on it: a convolution never synchronises.

``GROUPING`` (env ``M2SKD_SPARSE_GROUPING``: ``auto``, ``gpu`` or ``cpu``) only chooses how many
buckets there are: the GPU grouping uses at most ``GPU_BUCKETS`` (few launches; some padded
rows), the CPU grouping one bucket per distinct pair count (no padding; launches are cheap on a
CPU). ``auto`` picks by device; tests force ``gpu`` on CPU to check the GPU's grouping.
"""
from __future__ import annotations

import contextlib
import os
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
# Gathered rows x channels above which one conv is split into chunks of offsets (bounds the
# gathered and product matrices to ~512 MB in fp32).
_MAX_CHUNK_ELEMENTS = 1 << 27

#: Offset grouping in force: "auto" (by device), "gpu" or "cpu". Read from the environment
#: once; tests may assign it (it applies to kernel maps built afterwards).
GROUPING = os.environ.get("M2SKD_SPARSE_GROUPING", "auto")
#: Batched GEMMs per convolution in the GPU grouping (3 keeps a 3x3x3 conv's backward within
#: 17 dispatches on CUDA; padding then costs ~20% more GEMM rows on LiDAR scans).
GPU_BUCKETS = 3
#: How ``RowSum`` sums: None picks by device (segmented on CUDA, a CSR product on the CPU);
#: tests set True so that a CPU run sums as CUDA does.
SEGMENTED_SUMS: bool | None = None
_REDUCED = (torch.float16, torch.bfloat16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in fp64 for fp64 data, else in fp32 (also under bf16/fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouping_for(device: torch.device) -> str:
    """The grouping a convolution on ``device`` uses under the current ``GROUPING`` setting."""
    name = GROUPING
    if name == "auto":
        return "cpu" if torch.device(device).type == "cpu" else "gpu"
    if name not in ("gpu", "cpu"):
        raise ValueError(f"M2SKD_SPARSE_GROUPING must be auto, gpu or cpu, got {name!r}")
    return name
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


def _bucket_plan(counts: list[int], max_buckets: int | None) -> list[list[int]]:
    """Offsets with pairs, by decreasing count, cut into runs that become batched GEMMs.

    ``max_buckets=None``: one run per distinct count (no padding). Otherwise the cut into at
    most ``max_buckets`` runs that minimises the padded rows sum(len(run) * max(run)), found
    exactly by dynamic programming (at most 125 offsets).
    """
    ks = sorted((k for k, c in enumerate(counts) if c), key=lambda k: (-counts[k], k))
    c = [counts[k] for k in ks]
    n = len(c)
    if not n:
        return []
    if max_buckets is None:
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or c[i] != c[start]:
                runs.append(ks[start:i])
                start = i
        return runs
    top = min(max_buckets, n)
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(top + 1)]
    cut = [[0] * (n + 1) for _ in range(top + 1)]
    cost[0][0] = 0
    for b in range(1, top + 1):
        for j in range(1, n + 1):
            for i in range(b - 1, j):
                v = cost[b - 1][i] + (j - i) * c[i]
                if v < cost[b][j]:
                    cost[b][j], cut[b][j] = v, i
    b = min(range(1, top + 1), key=lambda b: (cost[b][n], b))
    runs, j = [], n
    while b:
        i = cut[b][j]
        runs.append(ks[i:j])
        j, b = i, b - 1
    return runs[::-1]


@dataclass(frozen=True)
class _Chunk:
    """A run of slots processed together: layout rows [row0, row1), stored pairs [pair0, pair1);
    ``pieces`` are (first row relative to row0, first slot, slots, rows per slot), one bmm each."""

    slot0: int
    slot1: int
    row0: int
    row1: int
    pair0: int
    pair1: int
    pieces: tuple[tuple[int, int, int, int], ...]


class _Layout:
    """The pairs of one kernel map arranged for batched GEMMs (see the module docstring).

    Slot ``s`` holds the pairs of kernel offset ``slot_offsets[s]`` in ``rows_per_slot`` padded
    layout rows. Sides are physical: "a" is the map's input side, "b" its output side (a
    transposed conv reads them the other way round). For each side it keeps the padded gather
    index twice: padding -> row 0 (any real row; its products are never scattered) and padding
    -> row n (a zero row appended by the caller, where padded rows must contribute nothing).
    """

    def __init__(self, in_idx: Tensor, out_idx: Tensor, counts: list[int], n_in: int, n_out: int,
                 identity_offset: int | None, max_buckets: int | None):
        device = in_idx.device
        plan = _bucket_plan(counts, max_buckets)
        self.slot_offsets_list = [k for run in plan for k in run]
        self.buckets = []  # (first row, first slot, slots, rows per slot)
        base = [0] * len(counts)
        row = slot = 0
        for run in plan:
            per = counts[run[0]]
            self.buckets.append((row, slot, len(run), per))
            for j, k in enumerate(run):
                base[k] = row + j * per
            row += len(run) * per
            slot += len(run)
        self.rows = row
        self.padded = row > sum(counts)  # some layout rows hold no pair
        self.n = {"a": n_in, "b": n_out}
        self.slot_pairs = [counts[k] for k in self.slot_offsets_list]
        self.slot_offsets = torch.tensor(self.slot_offsets_list, dtype=torch.long, device=device)
        # grad_w = cat(per-slot grads, [centre], [zeros]).index_select(0, inverse): ME order.
        n_slots = len(self.slot_offsets_list)
        extra = n_slots + (identity_offset is not None)
        self.has_empty = any(c == 0 and k != identity_offset for k, c in enumerate(counts))
        inverse = [extra] * len(counts)
        for s, k in enumerate(self.slot_offsets_list):
            inverse[k] = s
        if identity_offset is not None:
            inverse[identity_offset] = n_slots
        self.inverse = torch.tensor(inverse, dtype=torch.long, device=device)

        # Layout row of every stored pair (stored offset by offset, ME order), then the pairs
        # re-ordered by layout row so that each slot's (and chunk's) pairs are contiguous.
        total = sum(counts)
        counts_t = torch.tensor(counts, dtype=torch.long, device=device)
        starts_t = torch.cumsum(counts_t, 0) - counts_t
        k_of_pair = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t, output_size=total)
        pos = torch.tensor(base, dtype=torch.long, device=device)[k_of_pair]
        pos += torch.arange(total, device=device) - starts_t[k_of_pair]
        pos, order = torch.sort(pos)
        self.pos = pos
        self.idx = {"a": in_idx[order], "b": out_idx[order]}
        self.gather = {}
        for side, idx in self.idx.items():
            for pad in (0, self.n[side]):
                full = torch.full((self.rows,), pad, dtype=torch.long, device=device)
                full[pos] = idx
                self.gather[(side, pad != 0)] = full
        self._chunks: dict[int, list[_Chunk]] = {}
        self._sums: dict[tuple, RowSum] = {}
        for chunk in self.chunks(1):  # the common single-chunk plan, ready for fp32
            for side in ("a", "b"):
                self.scatter(side, chunk).prepare(torch.float32)

    def chunks(self, width: int) -> list[_Chunk]:
        """Slots grouped so that one chunk's gathered rows x ``width`` stay bounded (host only)."""
        max_rows = max(1, _MAX_CHUNK_ELEMENTS // max(width, 1))
        if self.rows <= max_rows:
            max_rows = self.rows  # one chunk: share its plan (and CSR) across widths
        plan = self._chunks.get(max_rows)
        if plan is not None:
            return plan
        plan, cur = [], None
        pair = 0
        for row0, slot0, n_slots, per in self.buckets:
            for j in range(n_slots):
                r, s = row0 + j * per, slot0 + j
                if cur is not None and r + per - cur["row0"] > max_rows:
                    plan.append(self._close(cur, pair))
                    cur = None
                if cur is None:
                    cur = {"slot0": s, "row0": r, "pair0": pair, "pieces": []}
                pieces = cur["pieces"]
                if pieces and pieces[-1][3] == per and pieces[-1][1] + pieces[-1][2] == s:
                    pieces[-1][2] += 1
                else:
                    pieces.append([r - cur["row0"], s, 1, per])
                cur["slot1"], cur["row1"] = s + 1, r + per
                pair += self.slot_pairs[s]
        if cur is not None:
            plan.append(self._close(cur, pair))
        self._chunks[max_rows] = plan
        return plan

    @staticmethod
    def _close(cur: dict, pair1: int) -> _Chunk:
        return _Chunk(cur["slot0"], cur["slot1"], cur["row0"], cur["row1"], cur["pair0"], pair1,
                      tuple(tuple(p) for p in cur["pieces"]))

    def scatter(self, side: str, chunk: _Chunk) -> "RowSum":
        """Sums the layout rows of ``chunk`` into the rows of ``side``; built without host
        synchronisation, cached."""
        key = (side, chunk.row0, chunk.row1)
        row_sum = self._sums.get(key)
        if row_sum is None:
            row_sum = RowSum(self.idx[side][chunk.pair0:chunk.pair1], self.n[side],
                             sources=self.pos[chunk.pair0:chunk.pair1] - chunk.row0, n_sources=chunk.row1 - chunk.row0)
            self._sums[key] = row_sum
        return row_sum


class KernelMap:
    """Input/output row pairs of a sparse conv, grouped by kernel offset (ME order).

    ``identity_offset`` names an offset whose pairs are (i, i) for every row (the centre of a
    stride-1 odd kernel); its pairs are not stored and it is computed as one dense matmul.
    A map and its transpose are twins sharing one set of layouts (one per grouping).
    """

    def __init__(self, in_idx: Tensor, out_idx: Tensor, counts: list[int], n_in: int, n_out: int,
                 identity_offset: int | None = None):
        self.in_idx = in_idx
        self.out_idx = out_idx
        self.counts = counts  # stored pairs per offset (0 for the identity offset), on the host
        self.n_in = n_in
        self.n_out = n_out
        self.identity_offset = identity_offset
        self._layouts: dict[str, _Layout] = {}
        self._flipped = False
        self._twin: KernelMap | None = None

    @property
    def kernel_volume(self) -> int:
        return len(self.counts)

    @property
    def num_pairs(self) -> int:
        """Multiply-accumulate row pairs of one application (centre included): FLOPs / (2 Cin Cout)."""
        return sum(self.counts) + (self.n_in if self.identity_offset is not None else 0)

    @property
    def sides(self) -> tuple[str, str]:
        """(input side, output side) in the shared layout's physical naming."""
        return ("b", "a") if self._flipped else ("a", "b")

    def transposed(self) -> "KernelMap":
        """The same pairs with in and out swapped (built once, shares the layouts)."""
        if self._twin is None:
            twin = KernelMap(self.out_idx, self.in_idx, self.counts, self.n_out, self.n_in,
                             self.identity_offset)
            twin._layouts = self._layouts
            twin._flipped = not self._flipped
            twin._twin, self._twin = self, twin
        return self._twin

    def layout(self, grouping: str) -> _Layout:
        """The pairs arranged for ``grouping`` (built on first use; no host synchronisation)."""
        lay = self._layouts.get(grouping)
        if lay is None:
            phys = self._twin if self._flipped else self
            lay = _Layout(phys.in_idx, phys.out_idx, phys.counts, phys.n_in, phys.n_out, phys.identity_offset,
                          GPU_BUCKETS if grouping == "gpu" else None)
            self._layouts[grouping] = lay
        return lay


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
        """Regular-conv map from sites at ``in_stride`` to sites at ``out_stride`` (cached), with
        its layout for the device's grouping built, so convolutions that use it never sync."""
        cache_key = (in_stride, out_stride, kernel_size, dilation)
        kmap = self.kernel_maps.get(cache_key)
        if kmap is None:
            kmap = self._build_kernel_map(in_stride, out_stride, kernel_size, dilation)
            kmap.layout(grouping_for(self.sites[in_stride].keys.device))
            self.kernel_maps[cache_key] = kmap
        return kmap

    def _build_kernel_map(self, in_stride, out_stride, kernel_size, dilation) -> KernelMap:
        src, dst = self.sites[in_stride], self.sites[out_stride]
        offsets = kernel_offsets(kernel_size, device=src.keys.device) * (in_stride * dilation)
        reach = (kernel_size // 2 if kernel_size % 2 else kernel_size - 1) * in_stride * dilation + out_stride
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
            counts_half = hit.sum(1).tolist()  # the map's one host synchronisation
            k_idx, out_rows = torch.nonzero_static(hit, size=sum(counts_half)).unbind(1)
            in_rows = pos[k_idx, out_rows]
            in_parts = list(torch.split(in_rows, counts_half))
            out_parts = list(torch.split(out_rows, counts_half))
            in_idx = torch.cat(in_parts + out_parts[::-1])
            out_idx = torch.cat(out_parts + in_parts[::-1])
            counts = counts_half + [0] + counts_half[::-1]
            return KernelMap(in_idx, out_idx, counts, len(src), len(dst), identity_offset=half)
        pos, hit = src.lookup(dst.keys[None, :] + self.packer.offset_keys(offsets)[:, None])
        counts = hit.sum(1).tolist()  # the map's one host synchronisation
        k_idx, out_rows = torch.nonzero_static(hit, size=sum(counts)).unbind(1)
        return KernelMap(pos[k_idx, out_rows], out_rows, counts, len(src), len(dst))

    def _block_map(self, src: SiteSet, dst: SiteSet, factor: int) -> KernelMap:
        """Kernel == stride (even): each fine site feeds exactly its parent, at one offset."""
        parent = self.parent_index[(src.stride, dst.stride)]
        rel = torch.div(src.coords[:, 1:] - dst.coords[parent, 1:], src.stride, rounding_mode="floor")
        k_idx = rel[:, 0] + factor * (rel[:, 1] + factor * (rel[:, 2]))
        k_sorted, order = torch.sort(k_idx, stable=True)
        bounds = torch.searchsorted(k_sorted, torch.arange(factor**3 + 1, device=k_sorted.device))
        counts = bounds.diff().tolist()  # the map's one host synchronisation
        return KernelMap(order, parent[order], counts, len(src), len(dst))


# --------------------------------------------------------------------------------------------
# Convolution arithmetic
# --------------------------------------------------------------------------------------------


class _Scratch(threading.local):
    """Reusable CPU scratch matrices for gathered rows and partial products (CPU grouping).

    Fresh allocations of hundreds of MB are handed back to the OS on free and page-faulted in
    again on the next conv; measured, that costs ~10x the gather itself. Per thread, so
    concurrent forwards in one process do not share buffers. CUDA's caching allocator already
    reuses memory, so the GPU grouping allocates normally.
    """

    def __init__(self):
        self.buffers: dict[tuple[int, torch.dtype], Tensor] = {}


_SCRATCH = _Scratch()


def _buffer(slot: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device, reuse: bool) -> Tensor:
    """An uninitialised (rows, cols) matrix: the thread's scratch ``slot`` if ``reuse``."""
    if not reuse:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    need = rows * cols
    buf = _SCRATCH.buffers.get((slot, dtype))
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=dtype)
        _SCRATCH.buffers[(slot, dtype)] = buf
    return buf[:need].view(rows, cols)


def _gather(src: Tensor, index: Tensor, slot: int, reuse: bool) -> Tensor:
    if not reuse:
        return src.index_select(0, index)
    return torch.index_select(src, 0, index, out=_buffer(slot, index.numel(), src.shape[1], src.dtype, src.device, True))


def _bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Batched GEMM with fp32 results: fp16/bf16 operands (CUDA) use ``out_dtype``."""
    kwargs = {"out_dtype": torch.float32} if a.dtype in _REDUCED else {}
    if out is not None:
        kwargs["out"] = out
    return torch.bmm(a, b, **kwargs)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(a, b, out_dtype=torch.float32) if a.dtype in _REDUCED else torch.mm(a, b)


def _operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as the GEMMs consume it: rounded to the compute dtype.

    Off CUDA, fp16/bf16 values are then widened to fp32: a product of two such values is exact
    in fp32, so an fp32 GEMM on them is the arithmetic of a reduced-precision GEMM with fp32
    accumulation (CPUs have no fast fp16/bf16 GEMM with fp32 output; torch has none at all).
    """
    t = t.to(dtype)
    if dtype in _REDUCED and t.device.type != "cuda":
        t = t.float()
    return t


def _conv(x: Tensor, w_perm: Tensor, w_centre: Tensor | None, kmap: KernelMap, lay: _Layout, reuse: bool) -> Tensor:
    """out[o] = sum over pairs (i, o) at offset k of x[i] @ W_k, in fp32 (fp64 for fp64)."""
    side_in, side_out = kmap.sides
    c_in, c_out = w_perm.shape[1], w_perm.shape[2]
    acc = _accumulation_dtype(x.dtype)
    out = _mm(x, w_centre) if w_centre is not None else None
    for ch in lay.chunks(max(c_in, c_out)):
        rows = _gather(x, lay.gather[(side_in, False)][ch.row0:ch.row1], 0, reuse)
        partial = _buffer(1, ch.row1 - ch.row0, c_out, acc, x.device, reuse)
        for r, s, n, per in ch.pieces:
            _bmm(rows[r:r + n * per].view(n, per, c_in), w_perm[s:s + n], out=partial[r:r + n * per].view(n, per, c_out))
        out = lay.scatter(side_out, ch)(partial, out)
    return out if out is not None else x.new_zeros(kmap.n_out, c_out, dtype=acc)


def _conv_backward(x: Tensor, g: Tensor, w_perm: Tensor, w_centre: Tensor | None, kmap: KernelMap,
                   lay: _Layout, need_x: bool, need_w: bool, reuse: bool):
    """fp32 (fp64) gradients of ``_conv``; gathers of ``g`` are shared by both gradients."""
    side_in, side_out = kmap.sides
    c_in, c_out = x.shape[1], g.shape[1]
    acc = _accumulation_dtype(x.dtype)
    grad_x = _mm(g, w_centre.t()) if need_x and w_centre is not None else None
    slot_grads = []
    # Padded rows must add nothing to grad_w: gather x from a copy with a zero row appended
    # (only where the layout pads: the CPU grouping never does, and skips that copy of x).
    x_ext = torch.nn.functional.pad(x, (0, 0, 0, 1)) if need_w and lay.padded else x
    for ch in lay.chunks(max(c_in, c_out)):
        g_rows = _gather(g, lay.gather[(side_out, False)][ch.row0:ch.row1], 1, reuse)
        if need_w:
            x_rows = _gather(x_ext, lay.gather[(side_in, lay.padded)][ch.row0:ch.row1], 0, reuse)
            for r, s, n, per in ch.pieces:
                rows = slice(r, r + n * per)
                slot_grads.append(_bmm(x_rows[rows].view(n, per, c_in).transpose(1, 2), g_rows[rows].view(n, per, c_out)))
        if need_x:
            partial = _buffer(0, ch.row1 - ch.row0, c_in, acc, x.device, reuse)
            for r, s, n, per in ch.pieces:
                rows = slice(r, r + n * per)
                _bmm(g_rows[rows].view(n, per, c_out), w_perm[s:s + n].transpose(1, 2), out=partial[rows].view(n, per, c_in))
            grad_x = lay.scatter(side_in, ch)(partial, grad_x)
    if need_x and grad_x is None:
        grad_x = x.new_zeros(kmap.n_in, c_in, dtype=acc)
    grad_w = None
    if need_w:
        if w_centre is not None:
            slot_grads.append(_mm(x.t(), g)[None])
        if lay.has_empty:
            slot_grads.append(x.new_zeros(1, c_in, c_out, dtype=acc))
        grad_w = torch.cat(slot_grads).index_select(0, lay.inverse)
    return grad_x, grad_w


class SparseConvFunction(torch.autograd.Function):
    """Bucketed gather-bmm-scatter sparse conv; backward recomputes gathers instead of storing them.

    Inputs stay in their own dtype (an fp32 master weight gets an fp32 gradient); the GEMMs see
    them rounded to ``dtype`` and the result is cast to ``dtype`` once.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, kmap: KernelMap, dtype: torch.dtype) -> Tensor:
        grouping = grouping_for(features.device)
        lay = kmap.layout(grouping)
        reuse = features.device.type == "cpu" and grouping == "cpu"
        x = _operand(features.contiguous(), dtype)
        w = _operand(weight, dtype)
        w_perm = w.index_select(0, lay.slot_offsets)
        w_centre = w[kmap.identity_offset] if kmap.identity_offset is not None else None
        ctx.save_for_backward(features, weight)
        ctx.conv = (kmap, lay, dtype, reuse, w_perm, w_centre)
        return _conv(x, w_perm, w_centre, kmap, lay, reuse).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight = ctx.saved_tensors
        kmap, lay, dtype, reuse, w_perm, w_centre = ctx.conv
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_w = _conv_backward(
            _operand(features.contiguous(), dtype), _operand(grad_out.contiguous(), dtype),
            w_perm, w_centre, kmap, lay, need_x, need_w, reuse,
        )
        return (grad_x.to(features.dtype) if need_x else None,
                grad_w.to(weight.dtype) if need_w else None, None, None)


def _compute_dtype(features: Tensor, weight: Tensor) -> torch.dtype:
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if features.dtype == weight.dtype:  # (promote_types is a dispatched op)
        return features.dtype
    return torch.promote_types(features.dtype, weight.dtype)


class _Recorder(threading.local):
    convs: list | None = None


_RECORDER = _Recorder()


@contextlib.contextmanager
def record_convs():
    """Collect ``(kernel-map pairs, c_in, c_out)`` of every sparse conv run inside (this thread),
    e.g. to count FLOPs as pairs x c_in x c_out x 2."""
    previous, _RECORDER.convs = _RECORDER.convs, []
    try:
        yield _RECORDER.convs
    finally:
        _RECORDER.convs = previous


def sparse_conv(features: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    """Sparse conv with a matmul's autocast semantics: the result has the autocast dtype.

    Under fp16/bf16 the GEMM operands are rounded to that dtype, every product and sum is fp32,
    and the result is rounded once, on every device (see :func:`_operand`).
    """
    if _RECORDER.convs is not None:
        _RECORDER.convs.append((kmap.num_pairs, weight.shape[1], weight.shape[2]))
    dtype = _compute_dtype(features, weight)
    with torch.autocast(features.device.type, enabled=False):
        return SparseConvFunction.apply(features, weight, kmap, dtype)


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


class RowSum:
    """Sums source rows into ``n_rows`` output rows: source ``sources[j]`` (``j`` if None),
    times ``weights[j]`` if given, into row ``index[j]``; each output row's terms in ascending
    ``j``, so every run gives the same bits. The CPU multiplies by a CSR matrix; on CUDA
    cuSPARSE's CSR product splits long rows across threads and its bits differ run to run, so
    there the sources are gathered in output order and summed by ``torch.segment_reduce``, one
    thread a sum (on the CPU the two give the same bits). No host synchronisation."""

    def __init__(self, index: Tensor, n_rows: int, sources: Tensor | None = None, n_sources: int | None = None,
                 weights: Tensor | None = None, segmented: bool | None = None):
        sorted_idx, order = torch.sort(index, stable=True)
        self.offsets = torch.searchsorted(sorted_idx, torch.arange(n_rows + 1, device=index.device))
        self.sources = order if sources is None else sources[order]
        self.weights = None if weights is None else weights[order]
        self.shape = (n_rows, index.numel() if n_sources is None else n_sources)
        if segmented is None:
            segmented = index.device.type == "cuda" if SEGMENTED_SUMS is None else SEGMENTED_SUMS
        self.segmented = segmented
        self._csr: dict[torch.dtype, Tensor] = {}

    def prepare(self, dtype: torch.dtype) -> "RowSum":
        """Builds the CPU's CSR matrix for ``dtype`` now rather than at the first sum."""
        if not self.segmented and dtype not in self._csr:
            n = self.sources.numel()
            index_dtype = torch.int32 if max(n, self.shape[1]) < 2**31 - 1 else torch.int64
            values = torch.ones(n, dtype=dtype, device=self.sources.device) if self.weights is None else self.weights.to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sparse CSR support is flagged beta
                self._csr[dtype] = torch.sparse_csr_tensor(self.offsets.to(index_dtype), self.sources.to(index_dtype),
                                                           values, size=self.shape, check_invariants=False)
        return self

    def __call__(self, values: Tensor, out: Tensor | None = None) -> Tensor:
        """The sums of ``values``' rows (plus ``out`` if given, which may be overwritten)."""
        if not self.segmented:
            csr = self.prepare(values.dtype)._csr[values.dtype]
            return torch.mm(csr, values) if out is None else torch.addmm(out, csr, values)
        terms = values.index_select(0, self.sources)
        if self.weights is not None:
            terms *= self.weights.to(values.dtype)[:, None]
        summed = torch.segment_reduce(terms, "sum", offsets=self.offsets, axis=0, unsafe=True)
        return summed if out is None else out.add_(summed)


class RowGather:
    """``features[index]`` whose backward sums by ``RowSum`` instead of ``index_add_``
    (atomic, so run-to-run different, on CUDA): per-point slicing stays deterministic."""

    def __init__(self, index: Tensor, n_rows: int):
        self.index = index
        self.row_sum = RowSum(index, n_rows)

    def __call__(self, features: Tensor) -> Tensor:
        return _RowGatherFunction.apply(features, self)


class _RowGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, gather: RowGather) -> Tensor:
        ctx.gather, ctx.dtype = gather, features.dtype
        return features.index_select(0, gather.index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        acc = _accumulation_dtype(grad.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            summed = ctx.gather.row_sum(grad.to(acc).contiguous())
        return summed.to(ctx.dtype), None


def voxel_average(features: Tensor, inverse: Tensor, n_voxels: int) -> Tensor:
    """Mean of the point features in each voxel (ME's UNWEIGHTED_AVERAGE quantisation): each
    point weighted by 1/count and summed by ``RowSum``, a fixed order on every device."""
    counts = torch.bincount(inverse, minlength=n_voxels).clamp_(min=1)
    weights = (1.0 / counts.to(_accumulation_dtype(features.dtype)))[inverse]
    return _VoxelAverageFunction.apply(features, inverse, weights, n_voxels)


class _VoxelAverageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, inverse: Tensor, weights: Tensor, n_voxels: int) -> Tensor:
        """``weights`` (1/count per point) are in the accumulation dtype."""
        ctx.save_for_backward(inverse, weights)
        ctx.dtype = features.dtype
        with torch.autocast(features.device.type, enabled=False):
            row_sum = RowSum(inverse, n_voxels, weights=weights)
            return row_sum(features.to(weights.dtype).contiguous()).to(features.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        inverse, weights = ctx.saved_tensors
        point_grad = grad.to(weights.dtype).index_select(0, inverse) * weights[:, None]
        return point_grad.to(ctx.dtype), None, None, None
