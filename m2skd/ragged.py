"""Ragged per-scan arrays in one Zarr v3 group: flat arrays plus an `offsets` array.

zarr-python 3 has no native ragged type, so a group holds, per field, the concatenation of
all scans' rows, and `offsets[i]:offsets[i+1]` selects scan i. A group is written whole by
one writer into a temporary directory and renamed into place, so a reader never sees a
half-written group and a killed writer leaves only a `.tmp-*` directory that is swept later.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .errors import DataError

SCHEMA_VERSION = 1
ROWS_PER_CHUNK = 1 << 18  # ~262k rows: one scan spans one or two chunks


def _compressor(dtype: np.dtype) -> BloscCodec:
    # zstd inside blosc with byte shuffle: float32 coordinates compress ~20% better shuffled.
    shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=dtype.itemsize)


def write_ragged(path, fields: dict[str, list[np.ndarray]], attrs: dict, per_scan: dict[str, np.ndarray] | None = None) -> int:
    """Write one group atomically; returns bytes on disk. All fields share the row offsets."""
    path = Path(path)
    names = list(fields)
    counts = np.array([len(a) for a in fields[names[0]]], dtype=np.int64)
    for name in names[1:]:
        other = np.array([len(a) for a in fields[name]], dtype=np.int64)
        if not np.array_equal(other, counts):
            raise ValueError(f"field {name!r} has row counts that differ from {names[0]!r}")
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name in names:
        flat = np.concatenate(fields[name]) if len(fields[name]) else np.zeros((0,), np.float32)
        chunks = (ROWS_PER_CHUNK,) + flat.shape[1:]
        arr = root.create_array(name, shape=flat.shape, dtype=flat.dtype, chunks=chunks, compressors=_compressor(flat.dtype))
        arr[...] = flat
    root.create_array("offsets", data=offsets, compressors=_compressor(offsets.dtype))
    for name, values in (per_scan or {}).items():
        values = np.asarray(values)
        root.create_array(name, data=values, compressors=_compressor(values.dtype))
    root.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "fields": names, "complete": True})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return dir_bytes(path)


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sweep_temporaries(directory) -> int:
    """Remove `.tmp-*` groups left by killed writers; returns how many."""
    removed = 0
    for tmp in Path(directory).rglob("*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


class RaggedReader:
    """Read scan i of a ragged group; each read is one contiguous slice per field."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except Exception as exc:  # zarr raises several types for a missing/corrupt group
            raise DataError(self.path, f"not a readable Zarr group ({exc})") from None
        attrs = dict(self.group.attrs)
        if not attrs.get("complete"):
            raise DataError(self.path, "incomplete group (no 'complete' mark): re-run the stage that writes it")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise DataError(self.path, f"schema version {attrs.get('schema_version')} != {SCHEMA_VERSION}")
        self.attrs = attrs
        self.offsets = self.group["offsets"][...]
        self._arrays = {name: self.group[name] for name in attrs["fields"]}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, i: int, names=None, rows: slice | None = None) -> dict[str, np.ndarray]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if rows is not None:
            start, stop = start + (rows.start or 0), start + (rows.stop if rows.stop is not None else stop - start)
        return {n: self._arrays[n][start:stop] for n in (names or self._arrays)}

    def per_scan(self, name: str) -> np.ndarray:
        return self.group[name][...]


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
