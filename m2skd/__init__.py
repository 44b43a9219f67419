"""m2skd: Multi-to-Single Knowledge Distillation for LiDAR semantic segmentation.

One import name. The repository keeps the stage implementations in `pipeline/`, the click layer
in `cli.py` and the dataset descriptions and configs in `data_manifests/` and `configs/` at its
top level; the wheel installs them as `m2skd.pipeline`, `m2skd.cli` and package data inside
`m2skd` (the mapping is in setup.py). So that code imports them one way everywhere, a source
checkout (plain or editable install) resolves the same two names to the top-level files through
the narrow finder below: it answers only for those names and only when this package sits in a
checkout, so an installed wheel never consults it.
"""

import sys
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parent.parent
_SOURCE_MODULES = {"m2skd.pipeline": _CHECKOUT / "pipeline", "m2skd.cli": _CHECKOUT / "cli.py"}


class _CheckoutFinder:
    """Meta-path finder for m2skd.pipeline and m2skd.cli in a source checkout."""

    @staticmethod
    def find_spec(fullname, path=None, target=None) -> ModuleSpec | None:
        location = _SOURCE_MODULES.get(fullname)
        if location is None:
            return None
        if location.is_dir():
            return spec_from_file_location(fullname, location / "__init__.py", submodule_search_locations=[str(location)])
        return spec_from_file_location(fullname, location)


if (_CHECKOUT / "pyproject.toml").is_file() and all(p.exists() for p in _SOURCE_MODULES.values()):
    # first, so a checkout's m2skd never pairs with another checkout's pipeline/ (shared editable venvs)
    sys.meta_path.insert(0, _CheckoutFinder)
