"""Package data (dataset descriptions, training configs) in both layouts: inside the installed
package (the wheel puts data_manifests/ and configs/ under m2skd/), or at the top of a source
checkout, where the repository keeps them."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_dir(name: str) -> Path:
    """The folder `name` ("data_manifests" or "configs") of this installation."""
    packaged = Path(str(files("m2skd") / name))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name
