"""The one place MinkowskiEngine is imported, with the Python 3.10+ compatibility fix.

MinkowskiEngine 0.5.4 uses `collections.Sequence`, removed in Python 3.10; we alias it to
`collections.abc.Sequence` before import instead of editing site-packages.
"""
from __future__ import annotations

import collections
import collections.abc

_ME = None


def import_minkowski():
    """Return the MinkowskiEngine module, or raise ImportError with the reason."""
    global _ME
    if _ME is None:
        if not hasattr(collections, "Sequence"):
            collections.Sequence = collections.abc.Sequence  # type: ignore[attr-defined]
        import MinkowskiEngine as ME  # noqa: N817

        _ME = ME
    return _ME


def minkowski_runs_on(device_type: str) -> bool:
    """Whether this MinkowskiEngine build has kernels for the device type (a CPU-only build has
    none for CUDA, and its first CUDA forward would crash)."""
    if device_type == "cpu":
        return minkowski_available()
    if device_type != "cuda" or not minkowski_available():
        return False
    return bool(getattr(import_minkowski(), "is_cuda_available", lambda: False)())


def minkowski_available() -> bool:
    try:
        import_minkowski()
        return True
    except Exception:
        return False
