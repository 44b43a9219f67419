"""Content fingerprints: short, stable hashes that let later stages refuse stale inputs."""
from __future__ import annotations

import hashlib
import json


def fingerprint_bytes(*chunks: bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def fingerprint_json(obj) -> str:
    return fingerprint_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def file_fingerprint(path) -> str:
    """Hash of a file's bytes, read in blocks (checkpoints can be hundreds of MB); a local path or
    an fsspec URL, where a pointer object is followed (m2skd.storage)."""
    from .storage import open_read

    h = hashlib.blake2b(digest_size=8)
    with open_read(path) as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
