"""Parquet manifest: one row per scan, schema version and stage config in its metadata."""
from __future__ import annotations

import json
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .atomic import atomic_path
from .errors import DataError
from .fingerprint import fingerprint_json

MANIFEST_SCHEMA_VERSION = 3  # 2: content fingerprint covers the prepare config; 3: of the shards' chunks, not the inputs
META_KEY = b"m2skd"

COLUMNS = {
    "sequence": pa.string(),
    "frame": pa.int64(),
    "frame_name": pa.string(),
    "split": pa.string(),
    "has_labels": pa.bool_(),
    "n_single": pa.int64(),
    "n_fused": pa.int64(),
    "n_hard_instances": pa.int64(),
    "shard": pa.string(),
    "shard_index": pa.int64(),
    "row_start": pa.int64(),
    "row_stop": pa.int64(),
    "shard_fingerprint": pa.string(),  # of the shard's chunks as written (size and CRC-32 of each)
    "class_points_single": pa.list_(pa.int64()),  # training-id histogram of the single scan (class weights)
    "hard_instance_points_single": pa.list_(pa.int64()),
    "hard_instance_points_fused": pa.list_(pa.int64()),
}
SCHEMA = pa.schema([pa.field(k, v) for k, v in COLUMNS.items()])


def write_manifest(rows: list[dict], path, meta: dict) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS)).sort_values(["sequence", "frame"]).reset_index(drop=True)
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    full_meta = {**meta, "schema_version": MANIFEST_SCHEMA_VERSION,
                 "content_fingerprint": content_fingerprint(df, meta.get("config_fingerprint"))}
    df.attrs["content_fingerprint"] = full_meta["content_fingerprint"]
    table = table.replace_schema_metadata({META_KEY: json.dumps(full_meta, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return df


def content_fingerprint(df: pd.DataFrame, config_fingerprint: str | None) -> str:
    """Prepare's fingerprint: the bytes it stored (each shard's chunk checksums), where each scan
    sits in them, and every setting of the prepare config, so a change upstream that changes
    what later stages read changes it."""
    return fingerprint_json([config_fingerprint, df["sequence"].tolist(), df["frame"].tolist(), df["shard"].tolist(),
                             df["shard_fingerprint"].tolist(), df["row_start"].tolist(), df["row_stop"].tolist()])


def read_manifest(path) -> tuple[pd.DataFrame, dict]:
    path = storage.path(path)
    if not path.is_file():
        raise DataError(path, "manifest not found: run `m2skd prepare` first")
    if isinstance(path, storage.ObjectPath):  # through pyarrow's file system over the fsspec one
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        table = pq.read_table(path.key, filesystem=PyFileSystem(FSSpecHandler(path.fs)))
    else:
        table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DataError(path, "not an m2skd manifest (no m2skd metadata)")
    meta = json.loads(raw)
    if meta.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise DataError(path, f"manifest schema version {meta.get('schema_version')} != {MANIFEST_SCHEMA_VERSION}; re-run prepare")
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise DataError(path, f"manifest lacks columns {sorted(missing)}")
    return table.to_pandas(), meta
