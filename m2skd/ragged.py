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

import dataclasses
import json
import os
import sys
import zlib
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


def write_ragged(path, fields: dict[str, list], attrs: dict, per_scan: dict[str, np.ndarray] | None = None,
                 extra_rows: dict[str, dict[str, list[np.ndarray]]] | None = None, compression: dict[str, dict] | None = None) -> int:
    """Write one group atomically; returns bytes on disk.

    `fields` (name -> one entry per scan: its rows, an array or a tuple of arrays stored in
    order) share one row set (`offsets`); each entry of `extra_rows` is another row set with
    its own offsets (`<name>/offsets`), e.g. features kept only for hard-class points.
    `compression`: {field: {"cname": .., "clevel": .., "shuffle": ..}} where a field is better stored otherwise.
    """
    path = storage.path(path)
    if isinstance(path, storage.ObjectPath):
        with storage.local_stage(path) as tmp:
            root_attrs, _ = _write_group(tmp, fields, attrs, per_scan, extra_rows, compression)
            return _publish_group(tmp, root_attrs, path)
    with atomic_path(path) as tmp:
        _, nbytes = _write_group(tmp, fields, attrs, per_scan, extra_rows, compression)
    return nbytes if nbytes is not None else dir_bytes(path)


def _write_group(tmp: Path, fields, attrs, per_scan, extra_rows, compression) -> tuple[dict, int | None]:
    """Every file of the group into the new directory `tmp`; returns the root's attributes.
    Metadata documents are made in memory (an array's by zarr's own metadata class, so its file is
    the one zarr writes; a group's as compact JSON) and the root's, which lists the chunk files,
    is written last. Returns the root's attributes and the group's bytes (None where zarr wrote
    some of its files)."""
    files = _Files(Path(tmp))
    compression = compression or {}
    written = _write_rowset(files, "", fields, compression)
    for name, rowset in (extra_rows or {}).items():
        files.put(f"{name}/zarr.json", _group_json({}))
        written.update(_write_rowset(files, name, rowset, compression))
    for name, values in (per_scan or {}).items():
        values = np.asarray(values)
        written.update(_store_array(files, name, values, _compressor(values.dtype), chunks=None, write_empty=False))
    root_attrs = {**attrs, "schema_version": SCHEMA_VERSION, "fields": list(fields),
                  "extra_rows": {k: list(v) for k, v in (extra_rows or {}).items()},
                  "chunk_files": files.stamp_chunks(written) if files.all_ours else chunk_files(tmp, written),
                  "complete": True}
    files.put("zarr.json", _group_json(root_attrs))
    return root_attrs, files.nbytes if files.all_ours else None


class _Files:
    """Plain files under a new directory, written in this thread; the directories made once.
    Knowing every file it wrote, it stamps the chunks and counts the bytes without listing the
    directory again, unless zarr wrote some of them (`all_ours` false)."""

    def __init__(self, root: Path):
        self.root, self.dirs = root, set()
        self.nbytes, self.all_ours = 0, True

    def put(self, key: str, blob: bytes) -> None:
        path = os.path.join(self.root, key)
        parent = os.path.dirname(path)
        if parent not in self.dirs:
            os.makedirs(parent, exist_ok=True)
            self.dirs.add(parent)
        with open(path, "wb") as f:
            f.write(blob)
        self.nbytes += len(blob)

    def stamp_chunks(self, written: dict[str, list]) -> dict[str, list]:
        """chunk_files for a group whose chunks are all in `written`: each stamped CHUNK_MTIME."""
        for rel in written:
            os.utime(os.path.join(self.root, rel), ns=(CHUNK_MTIME, CHUNK_MTIME))
        return {rel: written[rel] for rel in sorted(written)}


def _group_json(attributes: dict) -> bytes:
    """A group's zarr.json as zarr reads it, written compactly: zarr's own serialiser deep-copies
    the attributes and indents them with the pure-Python JSON encoder, which took 2 ms a scan of
    prepare for its shards' manifest rows; without indentation the C encoder writes them."""
    return json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}, allow_nan=True,
                      separators=(",", ":")).encode()


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


def chunk_files(group_dir, written: dict[str, list] | None = None) -> dict[str, list]:
    """{relative path: [size, crc32]} of every chunk file under a group, each stamped CHUNK_MTIME.
    `written`: {relative path: [size, crc32]} of the bytes this process just wrote, so a file of
    that size is not read back to be hashed again."""
    group_dir = Path(group_dir)
    written = written or {}
    out = {}
    for f in sorted(group_dir.rglob("*")):
        rel = f.relative_to(group_dir).as_posix()
        if f.is_file() and _is_chunk(rel):
            size = f.stat().st_size
            out[rel] = [size, written[rel][1] if rel in written and written[rel][0] == size else _hash(f)]
            os.utime(f, ns=(CHUNK_MTIME, CHUNK_MTIME))
    return out


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


def _write_rowset(files: "_Files", prefix: str, fields: dict[str, list], compression: dict[str, dict]) -> dict[str, list]:
    """Write the fields and offsets of one row set (the group at `prefix`); returns
    {path relative to the root: [size, crc32]} of the chunks written directly (_store_array).
    A scan's rows in a field are one array or a tuple of arrays (its pieces, stored in order)."""
    names = list(fields)
    pieces = {name: [scan if isinstance(scan, tuple) else (scan,) for scan in fields[name]] for name in names}
    counts = np.array([sum(len(a) for a in scan) for scan in pieces[names[0]]], dtype=np.int64)
    for name in names[1:]:
        if not np.array_equal([sum(len(a) for a in scan) for scan in pieces[name]], counts):
            raise ValueError(f"field {name!r} has row counts that differ from {names[0]!r}")
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    written = {}
    at = f"{prefix}/" if prefix else ""
    for name in names:
        parts = [a for scan in pieces[name] for a in scan]
        dtype = np.result_type(*parts)
        # every chunk is written (and recorded), and no chunk is compared with the fill value
        written.update(_store_array(files, at + name, parts, _compressor(dtype, **compression.get(name, {})),
                                    chunks=(ROWS_PER_CHUNK,) + parts[0].shape[1:], write_empty=True))
    written.update(_store_array(files, at + "offsets", offsets, _compressor(offsets.dtype), chunks=None, write_empty=False))
    return written


def _store_array(files: "_Files", key: str, values, compressor: BloscCodec, chunks, write_empty: bool) -> dict[str, list]:
    """The array `key` holding `values` (an array, or a list of arrays: its rows in pieces) as
    zarr's create_array(key, shape, dtype, chunks, compressors) and `arr[...] = values` store it,
    byte for byte (tests/test_ragged.py compares them); returns {chunk path: [size, crc32]} of
    the chunks encoded here. Zarr creating an array awaits a dozen store operations on its event
    loop, and its chunk pipeline spent about twice the compressor's own time per chunk (a
    fill-value buffer, copies, a thread hop per codec): together most of a shard write. Pieces are
    copied once, into a buffer of whole chunks whose tail is already the fill value."""
    parts = values if isinstance(values, list) else None
    shape = ((sum(len(a) for a in parts),) + parts[0].shape[1:]) if parts is not None else values.shape
    dtype = np.result_type(*parts) if parts is not None else values.dtype
    meta = _array_metadata(shape, dtype.str, chunks, compressor)
    files.put(f"{key}/zarr.json", meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
    if parts is not None:
        rows = meta.chunk_grid.chunk_shape[0]
        padded = np.empty((-(-shape[0] // rows) * rows,) + shape[1:], dtype)
        np.concatenate(parts, out=padded[: shape[0]])
        padded[shape[0]:] = meta.fill_value
        values = padded[: shape[0]]
    else:
        padded = None
    encoded = _encode_chunks(meta, key, np.ascontiguousarray(values), write_empty, padded)
    if encoded is None:  # another codec chain: zarr's own pipeline
        files.all_ours = False
        arr = zarr.open_array(zarr.storage.LocalStore(files.root), path=key, mode="r+",
                              config={"write_empty_chunks": write_empty})
        arr[...] = values
        return {}
    for chunk_key, blob in encoded.items():
        files.put(chunk_key, blob)
    return {chunk_key: [len(blob), f"{zlib.crc32(blob):08x}"] for chunk_key, blob in encoded.items()}


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


def _encode_chunks(meta: ArrayV3Metadata, key: str, flat: np.ndarray, write_empty: bool,
                   padded: np.ndarray | None = None) -> dict[str, bytes] | None:
    """{path: bytes} of every chunk of the array `key` (metadata `meta`, chunked along rows only)
    holding `flat`, as zarr encodes them: the same blosc call on the same bytes, the last chunk
    padded with the fill value, a chunk of fill values left out unless the array writes empty
    chunks. None where the codec chain is not bytes + blosc on native little-endian data.
    `padded`: `flat` followed by fill values to whole chunks, where the caller has it."""
    codecs = meta.codecs
    chunk_shape = tuple(meta.chunk_grid.chunk_shape)
    if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec)
            or sys.byteorder != "little" or not flat.dtype.isnative or not flat.flags.c_contiguous or chunk_shape[1:] != flat.shape[1:]):
        return None
    c = codecs[1]
    blosc = Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=_SHUFFLE[c.shuffle.value], blocksize=c.blocksize, typesize=c.typesize)
    rows, fill = chunk_shape[0], meta.fill_value
    out = {}
    whole = flat if padded is None else padded
    for j, start in enumerate(range(0, len(flat), rows)):
        block = whole[start : start + rows]
        if len(block) < rows:  # only without `padded`
            last = np.full((rows,) + flat.shape[1:], fill, flat.dtype)
            last[: len(block)] = block
            block = last
        if not write_empty and (block == fill).all():
            continue
        out[f"{key}/{meta.encode_chunk_key((j,) + (0,) * (flat.ndim - 1))}"] = blosc.encode(block.view(np.uint8).reshape(-1))
    return out


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

    def per_scan(self, name: str) -> np.ndarray:
        return self._guard(lambda: self.group[name][...])
