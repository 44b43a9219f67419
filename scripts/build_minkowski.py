"""Build MinkowskiEngine from PyPI's sdist once, cache the wheel, install it into this Python.

The cache key names the ME version, the torch version and CUDA/CPU, so a cached wheel is
never installed against a torch it was not built for.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path


def log(msg: str) -> None:
    print(f"[minkowski] {msg}", file=sys.stderr, flush=True)


def build_flavour() -> tuple[str, bool]:
    import torch

    cuda = bool(torch.version.cuda) and shutil.which("nvcc") is not None and torch.cuda.is_available()
    tag = f"torch{torch.__version__.split('+')[0]}-" + (f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu")
    return tag, cuda


def fetch_sdist(version: str, dest: Path) -> Path:
    """The sdist from PyPI's simple index (the registry API that pip itself uses), hash-checked."""
    index = urllib.request.urlopen("https://pypi.org/simple/minkowskiengine/", timeout=60).read().decode()
    name = f"MinkowskiEngine-{version}.tar.gz"
    match = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', index)
    if not match:
        raise SystemExit(f"{name} not found on PyPI's simple index")
    url, sha256 = match.groups()
    path = dest / name
    log(f"downloading {url}")
    with urllib.request.urlopen(url, timeout=300) as r:
        path.write_bytes(r.read())
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise SystemExit(f"{path}: sha256 does not match PyPI's")
    return path


def ensure_build_deps(cuda: bool) -> None:
    have_blas = Path("/usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h").exists() or Path("/usr/include/openblas").exists() or Path("/usr/include/cblas.h").exists()
    if have_blas and shutil.which("ninja"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("need libopenblas-dev and ninja; install them (not root or no apt-get here)")
        return
    log("apt-get install libopenblas-dev ninja-build")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "libopenblas-dev", "ninja-build"], check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.5.4")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "m2skd"))
    args = ap.parse_args()
    tag, cuda = build_flavour()
    wheel_dir = Path(args.cache) / "wheels" / f"MinkowskiEngine-{args.version}-{tag}"
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        ensure_build_deps(cuda)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            sdist = fetch_sdist(args.version, tmp)
            with tarfile.open(sdist) as tf:
                tf.extractall(tmp, filter="data")
            src = next(p for p in tmp.iterdir() if p.is_dir())
            cmd = [sys.executable, "setup.py", "bdist_wheel", "--blas=openblas"]
            if not cuda:
                cmd.insert(3, "--cpu_only")
            env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 2))
            log(f"building ({'CUDA' if cuda else 'CPU only'}; several minutes): {' '.join(cmd[1:])}")
            logfile = Path(args.cache) / f"build-{tag}.log"
            logfile.parent.mkdir(parents=True, exist_ok=True)
            with open(logfile, "w") as fh:
                res = subprocess.run(cmd, cwd=src, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if res.returncode:
                raise SystemExit(f"MinkowskiEngine build failed; log: {logfile}")
            built = list((src / "dist").glob("*.whl"))
            staging = wheel_dir.with_name(wheel_dir.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for w in built:
                shutil.copy2(w, staging / w.name)
            shutil.rmtree(wheel_dir, ignore_errors=True)
            staging.rename(wheel_dir)
        wheels = sorted(wheel_dir.glob("*.whl"))
    log(f"installing {wheels[-1].name} from cache {wheel_dir}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheels[-1])], check=True)


if __name__ == "__main__":
    main()
