"""Ragged per-scan arrays in one Zarr v3 group: flat arrays plus an `offsets` array.

zarr-python 3 has no native ragged type, so a group holds, per field, the concatenation of
all scans' rows, and `offsets[i]:offsets[i+1]` selects scan i. A group is written whole by
one writer into a temporary directory and renamed into place (m2skd.atomic), so a reader never
sees a half-written group and a killed writer leaves only a temporary that a later run sweeps.
The group records the size and CRC-32 of every chunk file it holds, and the writer sets every
chunk file's modification time to one fixed stamp (CHUNK_MTIME): opening a group checks the
sizes (a truncated chunk is reported by name, before a decompressor sees it), and
`group_is_current` decides in O(files), reading no chunk data, whether a re-run may keep it:
sizes as recorded and the fixed stamp; a chunk whose stamp differs (written to since, or copied
without its times) is hashed, and `verify` hashes all. A fixed stamp rather than a recorded
one keeps the metadata identical from run to run (same inputs, same bits).

On an object store (an fsspec URL, m2skd.storage) the group is written the same way into a local
temporary and uploaded object by object (the same bytes as on disk), after withdrawing any earlier
commit record; then its commit record `NAME.zarr.commit` is written last, beside the group.
Readers require it, so a killed writer leaves nothing a reader accepts. Objects cannot be
stamped, so the commit record holds each chunk object's stamp as listed after the upload (its
ETag or generation): a re-run compares sizes and stamps from one listing of the group and
hashes only the chunks whose stamp differs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import mmap
import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata.v3 import ArrayV3Metadata

from . import storage
from .atomic import atomic_path, is_temporary
from .errors import DataError

SCHEMA_VERSION = 3  # 2: chunk sizes and hashes in the attributes; 3: CRC-32, chunk files stamped CHUNK_MTIME
#: modification time of every chunk file as written (2000-01-01, whole seconds: kept by every
#: file system and by copies that keep times); anything that writes a chunk later changes it
CHUNK_MTIME = 946_684_800 * 10**9
ROWS_PER_CHUNK = 1 << 18  # ~262k rows: one scan spans one or two chunks
#: chunk files named ARRAY/c.0.0 beside the array's metadata, not ARRAY/c/0/0: a shard's chunks
#: then need one directory per array instead of one per chunk row (a mkdir cost prepare 0.3 ms a scan)
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def _compressor(dtype: np.dtype, clevel: int = 1, shuffle: str | None = None, cname: str = "zstd") -> BloscCodec:
    # default: zstd level 1 inside blosc with byte shuffle, as small as level 3 on shards and ~25%
    # faster; a writer may choose another blosc compressor per field (prepare: lz4, by measurement)
    shuffle = shuffle or ("bitshuffle" if dtype.itemsize == 1 else "shuffle")
    return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=dtype.itemsize)


def write_ragged(path, fields: dict[str, list], attrs: dict, extra_rows: dict[str, dict[str, list]] | None = None,
                 compression: dict[str, dict] | None = None) -> int:
    """Write one group atomically from lists with one entry per scan; returns bytes on disk.

    `fields` (name -> one entry per scan: its rows, an array or a tuple of arrays stored in
    order) share one row set (`offsets`); each entry of `extra_rows` is another row set with
    its own offsets (`<name>/offsets`), e.g. features kept only for hard-class points.
    `compression`: {field: {"cname": .., "clevel": .., "shuffle": ..}} where a field is better stored otherwise.
    """
    n_scans = {len(scans) for rows in (fields, *(extra_rows or {}).values()) for scans in rows.values()}
    if len(n_scans) != 1:
        raise ValueError(f"fields have different numbers of scans: {sorted(n_scans)}")
    with RaggedWriter(path, compression) as writer:
        for i in range(n_scans.pop()):
            writer.append({name: scans[i] for name, scans in fields.items()},
                          {rowset: {name: scans[i] for name, scans in rows.items()} for rowset, rows in (extra_rows or {}).items()})
        return writer.finish(attrs)


class RaggedWriter:
    """A group written scan by scan (`append`), then `finish`ed with its attributes and published.

    `append` checks a scan's fields (names, dtypes, row shapes, row counts) and hands its arrays
    to one background thread, which packs each field's rows into a chunk buffer and compresses
    and hashes each full chunk; another (_Files) writes the chunk files. The caller makes the
    next scans meanwhile (prepare reads and fuses them): the copy into chunks, made in the
    caller's thread, was a tenth of prepare's time at 1 job. At most PENDING_SCANS scans wait
    for the writer thread, so memory stays bounded, and each field has one chunk buffer, reused.
    An appended array is read by the writer thread later: it must not be changed until `finish`
    returns (or its future is done). The files are those zarr's create_array and
    `arr[...] = values` write for the whole field, byte for byte (tests/test_ragged.py, through
    the page cache and with O_DIRECT); zarr's own chunk pipeline cost about twice the
    compressor's time per chunk (a fill-value buffer, copies, a thread hop per codec) and a
    dozen awaited store operations per array.

        with RaggedWriter(path, compression) as writer:
            for scan in scans:
                writer.append({"points": ..., "label": ...}, {"hard": {"feat": ...}})
            nbytes = writer.finish(attrs)

    Leaving the block without `finish` (an error) publishes nothing and removes the temporary."""

    PENDING_SCANS = 2  # scans appended and not yet packed: how far the caller may run ahead

    def __init__(self, path, compression: dict[str, dict] | None = None):
        if sys.byteorder != "little":
            raise NotImplementedError("ragged groups are written on little-endian machines only")
        self.path = storage.path(path)
        self.compression = compression or {}
        self.nbytes: int | None = None
        self._rowsets: dict[str, _RowSet] = {}
        self._packed: list = []  # the writer thread's futures of each scan's packing
        self._written: dict[str, list] = {}  # chunk path -> [size, crc32], filled by the writer thread
        self._room = threading.BoundedSemaphore(self.PENDING_SCANS)
        self._failed = False  # set by the writer thread: later scans are not packed
        self._finishing = None  # the writer thread's future of _complete, once finish is called

    def __enter__(self) -> "RaggedWriter":
        self._stack = contextlib.ExitStack()
        remote = isinstance(self.path, storage.ObjectPath)
        tmp = self._stack.enter_context(storage.local_stage(self.path) if remote else atomic_path(self.path))
        self._files = _Files(Path(tmp))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ragged-writer")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._finishing is not None:  # _complete publishes the group or removes the temporary
            # an error raised after finish(wait=False) leaves the group to complete first
            self._pool.shutdown(wait=exc is not None)
            return False
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._files.close(cancel=True)  # after the writer thread, which may wait for it
        self._release_buffers()
        if exc is None:
            exc = RuntimeError(f"{self.path}: writer closed without finish(); nothing published")
            self._stack.__exit__(RuntimeError, exc, None)
            raise exc
        return self._stack.__exit__(exc_type, exc, tb)

    def append(self, rows: dict, extra_rows: dict[str, dict] | None = None) -> None:
        """One scan: {field: its rows} of the main row set and of each extra row set, a field's
        rows an array or a tuple of arrays (its pieces, stored in order: copied once, into chunks,
        by the writer thread)."""
        scan = []
        for prefix, fields in (("", rows), *(extra_rows or {}).items()):
            rowset = self._rowsets.get(prefix)
            if rowset is None:
                rowset = self._rowsets[prefix] = _RowSet(prefix, fields, self.compression)
            scan.append((rowset, rowset.check(fields)))
        self._room.acquire()  # waits while PENDING_SCANS scans are not yet packed
        try:
            self._packed.append(self._pool.submit(self._pack, scan))
        except BaseException:
            self._room.release()
            raise

    def _pack(self, scan: list) -> None:
        """In the writer thread: a scan's rows into the chunk buffers, full chunks written."""
        try:
            if not self._failed:  # after a failure the group is abandoned: nothing more to pack
                for rowset, pieces in scan:
                    for name, field_pieces in pieces.items():
                        rowset.fields[name].extend(field_pieces, self._write_chunk)
        except BaseException:
            self._failed = True
            raise
        finally:
            self._room.release()

    def _write_chunk(self, field: "_Field", index: int, buffer: np.ndarray, filled: int) -> None:
        """In the writer thread: chunk `index` of `field` (its first `filled` rows in `buffer`;
        zarr pads the last chunk with the fill value) compressed, hashed and queued for its file."""
        if filled < len(buffer):
            buffer[filled:] = field.fill_value
        path, record = _put_chunk(self._files, field.chunk_path(index), field.codec, buffer)
        self._written[path] = record

    def finish(self, attrs: dict, wait: bool = True):
        """Write the last chunks, the offsets and the metadata (the root's, listing every chunk
        file with its size and CRC-32, last), then publish the group; returns its bytes.

        With wait=False the writer thread does all that while the caller goes on (prepare fuses
        the next shard's scans meanwhile): returns a Future of the bytes, whose result() raises
        the writer's failure, if any (the group then not published). The writer's threads and
        buffers live until it is done, so a caller bounds how many it leaves pending."""
        if "" not in self._rowsets:
            raise ValueError(f"{self.path}: no scans appended")
        scans = {prefix or "main": len(r.counts) for prefix, r in self._rowsets.items()}
        if len(set(scans.values())) != 1:
            raise ValueError(f"{self.path}: row sets have different numbers of scans: {scans}")
        self._finishing = self._pool.submit(self._complete, attrs)  # after every scan's packing: one thread, in order
        return self._finishing.result() if wait else self._finishing

    def _release_buffers(self) -> None:
        for rowset in self._rowsets.values():
            for field in rowset.fields.values():
                field.release()

    def _complete(self, attrs: dict) -> int:
        """In the writer thread, once every scan is packed: finish's work, then the rename (or
        upload); on any failure the temporary is removed and the error raised."""
        files = self._files
        try:
            for packed in self._packed:
                packed.result()  # a packing error, if any, raised here
            for rowset in self._rowsets.values():
                for field in rowset.fields.values():
                    field.close(self._write_chunk)
            self._release_buffers()
            written = self._written
            for prefix, rowset in self._rowsets.items():
                if prefix:
                    files.put(f"{prefix}/zarr.json", _group_json({}))
                for field in rowset.fields.values():
                    files.put(f"{field.key}/zarr.json", _metadata_json(field.metadata()))
                offsets = np.zeros(len(rowset.counts) + 1, np.int64)
                np.cumsum(rowset.counts, out=offsets[1:])
                written.update(_store_whole(files, f"{prefix}/offsets" if prefix else "offsets", offsets))
            files.flush()  # every chunk file on disk (the IO thread's error, if any, raised here)
            root_attrs = {**attrs, "schema_version": SCHEMA_VERSION, "fields": list(self._rowsets[""].fields),
                          "extra_rows": {prefix: list(r.fields) for prefix, r in self._rowsets.items() if prefix},
                          "chunk_files": files.stamp_chunks(written), "complete": True}
            files.put("zarr.json", _group_json(root_attrs))
            files.flush()
            files.release()
            files.close(cancel=False)
            remote = isinstance(self.path, storage.ObjectPath)
            nbytes = _publish_group(files.root, root_attrs, self.path) if remote else files.nbytes
        except BaseException as exc:
            files.close(cancel=True)
            self._release_buffers()
            self._stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary
            raise
        self._stack.__exit__(None, None, None)  # the rename: the group appears whole
        self.nbytes = nbytes
        return nbytes


class _RowSet:
    """Fields that share one `offsets` array (the group's root, or the subgroup `prefix`)."""

    def __init__(self, prefix: str, fields: dict, compression: dict[str, dict]):
        self.prefix, self.counts = prefix, []
        at = f"{prefix}/" if prefix else ""
        self.fields = {name: _Field(at + name, _pieces(rows), compression.get(name, {})) for name, rows in fields.items()}

    def check(self, fields: dict) -> dict[str, tuple]:
        """A scan's {field: pieces}, each checked against the earlier scans; its row count recorded."""
        if list(fields) != list(self.fields):
            raise ValueError(f"row set {self.prefix or 'main'!r}: fields {list(fields)}, earlier scans {list(self.fields)}")
        pieces = {name: _pieces(rows) for name, rows in fields.items()}
        for name, field_pieces in pieces.items():
            self.fields[name].check(field_pieces)
        counts = {name: sum(len(a) for a in p) for name, p in pieces.items()}
        first = next(iter(counts))
        for name, n in counts.items():
            if n != counts[first]:
                raise ValueError(f"field {name!r} has row counts that differ from {first!r} ({n} vs {counts[first]})")
        for name, n in counts.items():
            self.fields[name].rows += n
        self.counts.append(counts[first])
        return pieces


def _pieces(rows) -> tuple:
    return rows if isinstance(rows, tuple) else (rows,)


class _Field:
    """One field's rows, packed by the writer thread into a chunk buffer of ROWS_PER_CHUNK rows,
    written out (and reused) each time it is full."""

    def __init__(self, key: str, first: tuple, compression: dict):
        self.key = key
        self.dtype = np.result_type(*first).newbyteorder("=")
        self.row_shape = first[0].shape[1:]
        codec = _compressor(self.dtype, **compression)
        self._meta = _array_metadata((0,) + self.row_shape, self.dtype.str, (ROWS_PER_CHUNK,) + self.row_shape, codec)
        self.codec = _blosc(self._meta)
        self.fill_value = self._meta.fill_value
        self.rows = 0  # appended (checked); the writer thread packs them later
        self._chunks = 0
        self._buffer, self._filled = None, 0

    def check(self, pieces: tuple) -> None:
        for piece in pieces:
            if piece.shape[1:] != self.row_shape or (len(piece) and piece.dtype.newbyteorder("=") != self.dtype):
                raise ValueError(f"field {self.key!r}: rows of shape {piece.shape[1:]} and dtype {piece.dtype}, "
                                 f"earlier {self.row_shape} and {self.dtype}")

    def extend(self, pieces: tuple, write) -> None:
        """In the writer thread: the rows copied into the buffer, write(self, index, buffer, rows)
        called on each full one."""
        for piece in pieces:
            at = 0
            while at < len(piece):
                if self._buffer is None:
                    self._buffer, self._filled = self._take_buffer(), 0
                n = min(len(piece) - at, ROWS_PER_CHUNK - self._filled)
                self._buffer[self._filled : self._filled + n] = piece[at : at + n]
                self._filled += n
                at += n
                if self._filled == ROWS_PER_CHUNK:
                    self._write(write)

    def close(self, write) -> None:
        if self._buffer is not None and self._filled:
            self._write(write)

    def _write(self, write) -> None:
        write(self, self._chunks, self._buffer, self._filled)
        self._chunks += 1
        self._filled = 0

    def _take_buffer(self) -> np.ndarray:
        with _SPARE_LOCK:
            spare = _SPARE_BUFFERS.get(self._kind())
            if spare:
                return spare.pop()
        return np.empty((ROWS_PER_CHUNK,) + self.row_shape, self.dtype)

    def _kind(self) -> tuple:
        return (self.dtype.str, self.row_shape)

    def release(self) -> None:
        """Once every chunk is written: the buffer kept for the process's next writer."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            with _SPARE_LOCK:  # the next writer may be taking buffers in another thread meanwhile
                spare = _SPARE_BUFFERS.setdefault(self._kind(), [])
                if len(spare) < 2:  # two writers' worth: prepare's next shard starts before this one ends
                    spare.append(buffer)

    def chunk_path(self, index: int) -> str:
        return f"{self.key}/{self._meta.encode_chunk_key((index,) + (0,) * len(self.row_shape))}"

    def metadata(self) -> ArrayV3Metadata:
        return dataclasses.replace(self._meta, shape=(self.rows,) + self.row_shape)


#: chunk buffers of finished writers, by (dtype, row shape), for the next writer of this process:
#: fresh memory costs a page fault per 4 kB each time it is first written
_SPARE_BUFFERS: dict[tuple, list] = {}
_SPARE_LOCK = threading.Lock()


def _put_chunk(files: "_Files", path: str, codec: Blosc, block: np.ndarray) -> tuple[str, list]:
    blob = _compress(codec, block)
    files.put(path, blob)
    return path, [len(blob), f"{zlib.crc32(blob):08x}"]


def _compress(codec: Blosc, block: np.ndarray) -> bytes:
    return codec.encode(block.reshape(-1).view(np.uint8))


def _store_whole(files: "_Files", key: str, values: np.ndarray) -> dict[str, list]:
    """A small array written at once (offsets), chunked as zarr chooses from its shape; a chunk of
    fill values is left out, as zarr does."""
    meta = _array_metadata(values.shape, values.dtype.str, None, _compressor(values.dtype))
    files.put(f"{key}/zarr.json", _metadata_json(meta))
    codec, rows = _blosc(meta), meta.chunk_grid.chunk_shape[0]
    out = {}
    for index, start in enumerate(range(0, len(values), rows)):
        block = np.full(rows, meta.fill_value, values.dtype)
        block[: min(rows, len(values) - start)] = values[start : start + rows]
        if (block != meta.fill_value).any():
            path, record = _put_chunk(files, f"{key}/{meta.encode_chunk_key((index,))}", codec, block)
            out[path] = record
    return out


#: each file's writeback started as soon as it is written (the chunks' from the writer thread, while
#: the caller computes), not left to pile up as dirty pages for the kernel to flush later: a shard
#: is then on disk about when it is published, and a prepare's flush at the end took 0.8 -> 0.03 ms
#: a scan on the bench (docs/results.md)
_START_WRITEBACK = sys.platform.startswith("linux") and hasattr(os, "posix_fadvise")
#: chunk files of at least this many bytes go to the disk with O_DIRECT (Linux), not through the page
#: cache: a shard is written once and not read back by the stage that writes it, so caching it only
#: evicts the inputs, and the kernel's copy into fresh page-cache pages was most of the writer
#: thread's time in the slow prepare runs of docs/results.md. File systems without O_DIRECT
#: (tmpfs, some FUSE mounts) get the buffered write.
DIRECT_MIN_BYTES = 1 << 20
_DIRECT = sys.platform.startswith("linux") and hasattr(os, "O_DIRECT")
_DIRECT_ALIGN = 4096  # O_DIRECT wants buffer, length and offset aligned to the device's logical block
#: page-aligned staging buffers (anonymous mmaps) of finished writers, for the next writer's direct writes
_ALIGNED_SPARE: list = []
_ALIGNED_LOCK = threading.Lock()


class _Files:
    """Plain files under a new directory, written in order by a thread of their own (`put` queues
    a file, `flush` waits for all): the disk's time overlaps compression and the caller's work,
    and at most PENDING blobs wait, so memory stays bounded. The directories made once. Knowing
    every file it wrote, it stamps the chunks and counts the bytes without listing the directory
    again. `put` is called by the writer thread only (the chunks, then finish's metadata)."""

    PENDING = 3

    def __init__(self, root: Path):
        self.root, self.dirs, self.nbytes = root, set(), 0
        self.direct = _DIRECT  # cleared for good once the file system refuses O_DIRECT
        self._aligned = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="ragged-io")
        self._slots = threading.BoundedSemaphore(self.PENDING)
        self._queued: list = []
        self._failed = False

    def put(self, key: str, blob: bytes) -> None:
        """Queue `blob` as the file `key` (waits while PENDING files are queued)."""
        self._slots.acquire()
        try:
            self._queued.append(self._io.submit(self._write, key, blob))
        except BaseException:
            self._slots.release()
            raise

    def flush(self) -> None:
        """Wait for every queued file; the first failure is raised here."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()

    def close(self, cancel: bool) -> None:
        self._io.shutdown(wait=True, cancel_futures=cancel)

    def _write(self, key: str, blob: bytes) -> None:
        try:
            if not self._failed:  # after a failure the group is abandoned: nothing more to write
                self._write_file(key, blob)
        except BaseException:
            self._failed = True
            raise
        finally:
            self._slots.release()

    def _write_file(self, key: str, blob: bytes) -> None:
        path = os.path.join(self.root, key)
        parent = os.path.dirname(path)
        if parent not in self.dirs:
            os.makedirs(parent, exist_ok=True)
            self.dirs.add(parent)
        if not (self.direct and len(blob) >= DIRECT_MIN_BYTES and self._put_direct(path, blob)):
            with open(path, "wb") as f:
                f.write(blob)
                if _START_WRITEBACK:  # Linux: starts writing the file's dirty pages now, keeps them cached
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self.nbytes += len(blob)

    def _put_direct(self, path: str, blob: bytes) -> bool:
        """`blob` written to `path` with O_DIRECT from an aligned copy, padded to whole blocks and
        truncated back to its length; False (nothing written) where the file system refuses it."""
        n = len(blob)
        padded = -(-n // _DIRECT_ALIGN) * _DIRECT_ALIGN
        if self._aligned is None or len(self._aligned) < padded:
            with _ALIGNED_LOCK:
                spare = next((m for m in _ALIGNED_SPARE if len(m) >= padded), None)
                if spare is not None:
                    _ALIGNED_SPARE.remove(spare)
            if spare is None:  # a chunk of 4 float32 columns and blosc's overhead fit the first one
                spare = mmap.mmap(-1, max(padded, ROWS_PER_CHUNK * 16 + _DIRECT_ALIGN))
            self._aligned = spare
        view = memoryview(self._aligned)[:padded]
        staged = np.frombuffer(view, np.uint8)
        staged[:n] = np.frombuffer(blob, np.uint8)  # numpy copies without the GIL, which the caller's thread wants
        staged[n:] = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        try:
            done = 0
            while done < padded:
                try:
                    done += os.write(fd, view[done:])
                except OSError as error:
                    if error.errno != errno.EINVAL or done:
                        raise
                    self.direct = False  # opened, but its blocks are not this alignment: buffered
                    return False
            os.ftruncate(fd, n)
        finally:
            os.close(fd)
        return True

    def release(self) -> None:
        """The staging buffer kept for the process's next writer (fresh memory costs a fault a page)."""
        with _ALIGNED_LOCK:
            if self._aligned is not None and len(_ALIGNED_SPARE) < 2:
                _ALIGNED_SPARE.append(self._aligned)
        self._aligned = None

    def stamp_chunks(self, written: dict[str, list]) -> dict[str, list]:
        """The chunk list of the root's attributes, each chunk file stamped CHUNK_MTIME."""
        for rel in written:
            os.utime(os.path.join(self.root, rel), ns=(CHUNK_MTIME, CHUNK_MTIME))
        return {rel: written[rel] for rel in sorted(written)}


def _group_json(attributes: dict) -> bytes:
    """A group's zarr.json as zarr reads it, written compactly: zarr's own serialiser deep-copies
    the attributes and indents them with the pure-Python JSON encoder, which took 2 ms a scan of
    prepare for its shards' manifest rows; without indentation the C encoder writes them."""
    return json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}, allow_nan=True,
                      separators=(",", ":")).encode()


def _metadata_json(meta: ArrayV3Metadata) -> bytes:
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _array_metadata(shape: tuple, dtype: str, chunks, compressor: BloscCodec) -> ArrayV3Metadata:
    """What zarr's create_array records for these settings: made by zarr once per kind of array
    (in memory) and given this shape; an array without chunks is chunked as zarr guesses from
    its shape, so its shape is part of the kind."""
    kind = (len(shape), dtype, chunks, json.dumps(compressor.to_dict(), sort_keys=True), None if chunks else shape)
    template = _TEMPLATES.get(kind)
    if template is None:
        made = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, dtype=dtype, chunks=chunks or "auto",
                                 compressors=compressor, zarr_format=3, chunk_key_encoding=CHUNK_KEY_ENCODING)
        template = _TEMPLATES[kind] = made.metadata
    return dataclasses.replace(template, shape=tuple(shape))


_TEMPLATES: dict[tuple, ArrayV3Metadata] = {}
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def _blosc(meta: ArrayV3Metadata) -> Blosc:
    """The compressor zarr runs for arrays of `meta` (bytes, then blosc: what _compressor makes)."""
    codecs = meta.codecs
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        raise ValueError(f"unexpected codec chain {codecs}")
    c = codecs[1]
    return Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=_SHUFFLE[c.shuffle.value], blocksize=c.blocksize, typesize=c.typesize)


COMMIT_SUFFIX = storage.COMMIT_SUFFIX  # NAME.zarr.commit beside the group on an object store
commit_record = storage.commit_record


def _publish_group(tmp: Path, root_attrs: dict, dest: "storage.ObjectPath") -> int:
    """Upload a finished local group: withdraw the old commit record and the old objects,
    upload the new ones, then write the commit record with their stamps; returns its bytes."""
    commit = commit_record(dest)
    storage.remove_tree(dest)
    listed = storage.upload_tree(tmp, dest)
    stamps = {rel: listed[rel][1] for rel in root_attrs["chunk_files"]}
    commit.write_bytes(json.dumps({"chunk_stamps": stamps}, sort_keys=True).encode())
    return sum(size for size, _ in listed.values())


def _is_chunk(rel: str) -> bool:
    return not rel.endswith("zarr.json")  # metadata files are parsed (and checked) on open


def file_stamp(path) -> list:
    """[size, modification time in ns] of a file: what a re-run compares instead of its bytes.
    fsspec URLs give their store's size and modification record (mtime, LastModified or ETag)."""
    path = str(path)
    if storage.is_url(path):
        info = storage.path(path).info()
        return [int(info["size"]), storage.object_stamp(info)]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    return [st.st_size, st.st_mtime_ns]


def _hash(path: Path) -> str:
    """CRC-32 of a chunk file: it detects damage, which is all it is for (no adversary), and runs
    at ~4 GB/s where blake2b ran at 0.6 (prepare rehashed every chunk it had just written)."""
    return f"{zlib.crc32(path.read_bytes()):08x}"


def _check_chunks(path: Path, recorded: dict, hashes: bool | None, stamps: dict | None = None) -> None:
    """Sizes always; hashes of every chunk (True), of none (False), or of those whose stamp
    differs from the recorded one (None)."""
    if isinstance(path, storage.ObjectPath):
        return _check_objects(path, recorded, hashes, stamps or {})
    for rel, (size, digest) in recorded.items():
        f = path / rel
        try:
            st = f.stat()
        except FileNotFoundError:
            raise DataError(path, f"chunk {rel} is missing: re-run the stage that writes it") from None
        if st.st_size != size:
            raise DataError(path, f"chunk {rel} has {st.st_size} bytes, {size} written (truncated or damaged): re-run the stage that writes it")
        check = hashes if hashes is not None else st.st_mtime_ns != CHUNK_MTIME
        if check and _hash(f) != digest:
            raise DataError(path, f"chunk {rel} content differs from what was written (damaged): re-run the stage that writes it")


def _check_objects(path, recorded: dict, hashes: bool | None, stamps: dict) -> None:
    """_check_chunks on an object store: sizes and stamps from one listing of the group."""
    listed = path.find()
    for rel, (size, digest) in recorded.items():
        info = listed.get(rel)
        if info is None:
            raise DataError(path, f"chunk {rel} is missing: re-run the stage that writes it")
        if int(info["size"]) != size:
            raise DataError(path, f"chunk {rel} has {info['size']} bytes, {size} written (truncated or damaged): re-run the stage that writes it")
        check = hashes if hashes is not None else storage.object_stamp(info) != stamps.get(rel)
        if check and f"{zlib.crc32(path.fs.cat_file((path / rel).key)):08x}" != digest:
            raise DataError(path, f"chunk {rel} content differs from what was written (damaged): re-run the stage that writes it")


def inputs_unchanged(recorded: dict) -> bool:
    """True if every input file {path: stamp} still has the recorded size and stamp."""
    for path, stamp in recorded.items():
        try:
            if file_stamp(path) != list(stamp):
                return False
        except (OSError, DataError):
            return False
    return True


def group_is_current(path, attrs: dict, verify: bool = False) -> bool:
    """The one "done" test of a stage's output group: complete, made with `attrs` (inputs and
    settings), its recorded input files unchanged (size and stamp), and intact. Reads metadata
    and stats files only; chunk hashes are read where a chunk's stamp differs, or all of them
    with `verify`."""
    try:
        reader = RaggedReader(path, verify_hashes=True if verify else None)
    except DataError:
        return False
    got = reader.attrs
    return all(got.get(k) == v for k, v in attrs.items()) and inputs_unchanged(got.get("input_stamps", {}))


def verify_group(path) -> bool:
    """True if the group at `path` is complete and every chunk has the bytes it was written with."""
    try:
        RaggedReader(path, verify_hashes=True)
    except DataError:
        return False
    return True


def dir_bytes(path) -> int:
    return storage.tree_bytes(path)


def list_groups(directory) -> list[Path]:
    """Published groups (`*.zarr`, no temporaries) directly under directory/*/; on an object
    store those with their commit record."""
    directory = storage.path(directory)
    if isinstance(directory, storage.ObjectPath):
        return [g.with_name(g.name[: -len(COMMIT_SUFFIX)]) for g in directory.glob(f"*/*.zarr{COMMIT_SUFFIX}")]
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*/*.zarr") if p.is_dir() and not is_temporary(p))


class RaggedReader:
    """Read scan i of a ragged group; each read is one contiguous slice per field."""

    def __init__(self, path, verify_hashes: bool | None = False):
        """verify_hashes: True hashes every chunk, None those whose stamp differs, False none."""
        self.path = str(path)
        location = storage.path(path)
        remote = isinstance(location, storage.ObjectPath)
        stamps = None
        if remote:  # the commit record, written last, is what makes the group exist
            try:
                stamps = json.loads(storage.read_bytes(commit_record(location)))["chunk_stamps"]
            except (DataError, ValueError, KeyError):
                missing = not location.is_dir()
                raise DataError(self.path, "missing: re-run the stage that writes it" if missing else
                                f"no valid commit record {commit_record(location).name} (an interrupted upload): "
                                "re-run the stage that writes it") from None
        elif not location.is_dir():
            raise DataError(self.path, "missing: re-run the stage that writes it")
        try:
            if remote:
                from zarr.storage import FsspecStore

                store = FsspecStore.from_url(self.path, read_only=True)
                self.group = zarr.open_group(store, mode="r", zarr_format=3)
            else:
                self.group = zarr.open_group(self.path, mode="r")
            attrs = dict(self.group.attrs)
        except Exception as exc:  # zarr raises several types for a missing/corrupt group
            raise DataError(self.path, f"not a readable Zarr group ({type(exc).__name__}): re-run the stage that writes it") from None
        if not attrs.get("complete"):
            raise DataError(self.path, "incomplete group (no 'complete' mark): re-run the stage that writes it")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise DataError(self.path, f"schema version {attrs.get('schema_version')} != {SCHEMA_VERSION}: re-run the stage that writes it")
        _check_chunks(location, attrs.get("chunk_files", {}), verify_hashes, stamps)
        self.attrs = attrs
        self._rowsets = {None: (self.group, attrs["fields"])}
        self._rowsets.update({name: (self.group[name], fields) for name, fields in attrs.get("extra_rows", {}).items()})
        self._offsets = {}
        self._arrays = {}

    def _rowset(self, rowset):
        if rowset not in self._offsets:
            group, fields = self._rowsets[rowset]
            self._offsets[rowset] = self._guard(lambda: group["offsets"][...])
            self._arrays[rowset] = self._guard(lambda: {n: group[n] for n in fields})
        return self._offsets[rowset], self._arrays[rowset]

    def _guard(self, read):
        """Run a read; a decoding failure becomes one line naming this group."""
        try:
            return read()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(self.path, f"unreadable data ({type(exc).__name__}: {str(exc)[:120]}): re-run the stage that writes it") from None

    @property
    def offsets(self) -> np.ndarray:
        return self._rowset(None)[0]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, i: int, names=None, rows: slice | None = None, rowset: str | None = None) -> dict[str, np.ndarray]:
        offsets, arrays = self._rowset(rowset)
        start, stop = int(offsets[i]), int(offsets[i + 1])
        if rows is not None:
            first = start + (rows.start or 0)
            stop = min(stop, start + rows.stop) if rows.stop is not None else stop
            start = first
        return self._guard(lambda: {n: arrays[n][start:stop] for n in (names or arrays)})
