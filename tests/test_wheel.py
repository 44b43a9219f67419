"""The wheel works outside the source tree: one import name (m2skd), package data inside it, the
console script and `python -m m2skd` run synth, prepare and a 2-step train-teacher from another
directory. The fresh virtual environment reuses this interpreter's installed dependencies."""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "tests")


def run(cmd, cwd, env, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def fresh_venv(venv: Path, env: dict):
    """A virtual environment whose dependencies (and pip) are this interpreter's: a path listed in
    a .pth file is not a site dir, so the .pth files there (an editable m2skd among them) stay inert."""
    run([sys.executable, "-m", "venv", "--without-pip", venv], venv.parent, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bin_dir / "python"
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv.parent, env).strip())
    (purelib / "_reuse_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv, bin_dir, py


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    pytest.importorskip("setuptools", reason="the wheel is built without isolation, with this environment's setuptools")
    # build from a clean copy: an in-tree build/ keeps files deleted from the source
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist", src],
        tmp_path, env)
    wheel = next((tmp_path / "dist").glob("m2skd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"m2skd", wheel.name.split("-py")[0] + ".dist-info"}, names
    for path in ("m2skd/cli.py", "m2skd/__main__.py", "m2skd/pipeline/prepare.py", "m2skd/data_manifests/semantickitti.yaml",
                 "m2skd/configs/demo.yaml", "m2skd/configs/semantickitti.yaml"):
        assert path in names, path

    venv, bin_dir, py = fresh_venv(tmp_path / "venv", env)
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([py, "-c", "import m2skd, m2skd.cli, m2skd.pipeline.prepare as p; from m2skd.dataset_spec import MANIFEST_DIR;"
                 "from m2skd.train_config import CONFIG_DIR; print(m2skd.__file__, p.__file__, MANIFEST_DIR, CONFIG_DIR)"], work, env)
    assert all(str(venv) in w for w in where.split()), where
    for generic in ("cli", "pipeline"):
        proc = subprocess.run([py, "-c", f"import {generic}"], cwd=work, env=env, capture_output=True)
        assert proc.returncode != 0, f"{generic} is importable from the wheel's environment"

    run([bin_dir / "m2skd", "synth", "data", "--sequences", "00,08", "--frames", "3", "--beams", "16", "--azimuth-steps", "256"], work, env)
    run([py, "-m", "m2skd", "prepare", "data", "run"], work, env)
    out = run([bin_dir / "m2skd", "train-teacher", "run", "--config", "demo", "--steps", "2", "--backend", "torch", "--device", "cpu",
               "--set", "widths=8,8,8,8,8,8,8,8", "--set", "stem_width=8", "--set", "val_every=0"], work, env)
    assert "trained teacher" in out and (work / "run" / "teacher" / "model.pt").is_file(), out


@pytest.mark.slow
def test_editable_install_resolves_the_same_names(tmp_path):
    """scripts/setup_env.sh installs the checkout editable: m2skd.pipeline, m2skd.cli and the
    package data resolve to the checkout's top-level folders, from any directory."""
    pytest.importorskip("setuptools", reason="the editable wheel is built with this environment's setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _, bin_dir, py = fresh_venv(tmp_path / "venv", env)
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed", "-e", src],
        tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([py, "-c", "import m2skd.cli as c, m2skd.pipeline.prepare as p; from m2skd.dataset_spec import MANIFEST_DIR;"
                 "from m2skd.train_config import CONFIG_DIR; print(c.__file__, p.__file__, MANIFEST_DIR, CONFIG_DIR)"], work, env)
    assert where.split() == [str(src / "cli.py"), str(src / "pipeline" / "prepare.py"), str(src / "data_manifests"),
                             str(src / "configs")], where
    assert "Usage: m2skd" in run([bin_dir / "m2skd", "--help"], work, env)
