"""scripts/build_minkowski.py: the CUDA source fixes match MinkowskiEngine 0.5.4's sdist exactly,
apply once, and never touch the CPU build's sources.

Needs the sdist that the set-up script keeps in its cache (~/.cache/m2skd/sdist, or $M2SKD_CACHE);
skipped where it is absent (no network is used here).
"""
import importlib.util
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_minkowski", ROOT / "scripts" / "build_minkowski.py")
bm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bm)

CACHE = Path(os.environ.get("M2SKD_CACHE", Path.home() / ".cache" / "m2skd"))
SDIST = CACHE / "sdist" / "MinkowskiEngine-0.5.4.tar.gz"
needs_sdist = pytest.mark.skipif(not SDIST.is_file(), reason=f"{SDIST} not cached (scripts/setup_env.sh keeps it)")


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_sdist
def test_every_cuda_fix_matches_the_sdist_once_and_is_idempotent(tmp_path):
    src = bm.unpack_sources(SDIST, tmp_path / "cuda", cuda=True)
    pristine = tree(bm.unpack_sources(SDIST, tmp_path / "cpu", cuda=False))
    patched = tree(src)
    assert sorted(patched) == sorted(pristine)  # no file added or removed
    changed = {f for f in patched if patched[f] != pristine[f]}
    assert changed == {fix.file for fix in bm.CUDA_PATCHES}
    for fix in bm.CUDA_PATCHES:
        text = patched[fix.file].decode()
        assert text.count(fix.new) == fix.count, fix.why
        if fix.old not in fix.new:  # a replacement, not an insertion next to the old text
            assert fix.old not in text, fix.why
    # a second run finds every fix in place and changes nothing
    assert {status for _, status in bm.patch_cuda_sources(src)} == {"already applied"}
    assert tree(src) == patched


@needs_sdist
def test_cpu_build_sources_are_the_sdist_as_published(tmp_path):
    src = bm.unpack_sources(SDIST, tmp_path, cuda=False)
    with tarfile.open(SDIST) as tf:
        published = {m.name.split("/", 1)[1]: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    assert tree(src) == published


def test_a_fix_that_no_longer_matches_stops_the_build(tmp_path):
    fix = bm.CUDA_PATCHES[0]
    target = tmp_path / fix.file
    target.parent.mkdir(parents=True)
    target.write_text("// a MinkowskiEngine version these fixes were not written for\n")
    with pytest.raises(SystemExit, match="matches 0 times"):
        bm.patch_cuda_sources(tmp_path)
