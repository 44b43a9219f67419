"""Build MinkowskiEngine from PyPI's sdist once, cache the wheel, install it into this Python.

The cache key names the ME version, the torch version and CUDA/CPU, so a cached wheel is
never installed against a torch it was not built for.

A CPU build compiles the sdist as published. A CUDA build first applies CUDA_PATCHES, small
source fixes for CUDA 12/13 toolkits and current PyTorch collected from MinkowskiEngine's issues;
`--patched-sources DIR` writes those patched sources out without building, and `--force-cuda`
builds the CUDA extension on a machine without a GPU.
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
from typing import NamedTuple


def log(msg: str) -> None:
    print(f"[minkowski] {msg}", file=sys.stderr, flush=True)


def build_flavour(force_cuda: bool = False) -> tuple[str, bool]:
    """(wheel cache tag, build with CUDA?). CUDA needs a CUDA torch and nvcc, and a visible GPU
    unless force_cuda (compiling needs no GPU). CUDA tags name the set of source fixes too."""
    import torch

    cuda = bool(torch.version.cuda) and shutil.which("nvcc") is not None and (torch.cuda.is_available() or force_cuda)
    tag = f"torch{torch.__version__.split('+')[0]}-" + (f"cu{torch.version.cuda.replace('.', '')}-fixes{fixes_digest()}" if cuda else "cpu")
    return tag, cuda


def fetch_sdist(version: str, cache: Path) -> Path:
    """The sdist from PyPI's simple index (the registry API that pip itself uses), hash-checked,
    kept under cache/sdist/ so a rebuild (or tests/test_build_minkowski.py) needs no network."""
    name = f"MinkowskiEngine-{version}.tar.gz"
    path = cache / "sdist" / name
    if path.is_file():
        return path
    index = urllib.request.urlopen("https://pypi.org/simple/minkowskiengine/", timeout=60).read().decode()
    match = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', index)
    if not match:
        raise SystemExit(f"{name} not found on PyPI's simple index")
    url, sha256 = match.groups()
    log(f"downloading {url}")
    with urllib.request.urlopen(url, timeout=300) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{url}: sha256 does not match PyPI's")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.rename(path)
    return path


def unpack_sources(sdist: Path, dest: Path, cuda: bool) -> Path:
    """The sdist's source tree under dest, as published for a CPU build, with CUDA_PATCHES for CUDA."""
    with tarfile.open(sdist) as tf:
        tf.extractall(dest, filter="data")
    src = next(p for p in dest.iterdir() if p.is_dir())
    if cuda:
        for rel, status in patch_cuda_sources(src):
            log(f"CUDA source fix {status}: {rel}")
    return src


def cuda_build_env(env: dict, scratch: Path) -> dict:
    """Include and link paths the CUDA build needs beyond what torch's BuildExtension passes:

    - CUDA 13 moved Thrust/CUB/libcu++ under include/cccl/; nvcc looks there, but g++ compiling
      the extension's .cpp files (quantization.cpp, direct_max_pool.cpp include thrust) does not:
      'fatal error: thrust/host_vector.h: No such file or directory' (found compiling here; the
      move is in NVIDIA's CUDA 13.0 notes, also met in Cytnx-dev/Cytnx#754);
    - when cuSPARSE/cuBLAS/cuSOLVER come from pip's nvidia-* wheels (PyPI's CUDA torch) rather
      than a full toolkit: their headers, and a `-lcusparse` link name (the wheels ship only
      versioned libcusparse.so.N).
    """
    from torch.utils.cpp_extension import CUDA_HOME

    cuda_include = Path(CUDA_HOME or "/usr/local/cuda", "include")
    includes = [str(cuda_include / "cccl")] if (cuda_include / "cccl" / "thrust").is_dir() else []
    libdirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        nvidia = None
    if nvidia is not None and not (cuda_include / "cusparse.h").exists():
        roots = [Path(r) for r in nvidia.__path__]
        includes += sorted({str(h.parent) for r in roots for name in ("cusparse.h", "cusolverDn.h")
                            for h in r.glob(f"*/include/{name}")})
        links = scratch / "cuda-link-names"
        links.mkdir(exist_ok=True)
        for lib in sorted(lib for r in roots for lib in r.glob("*/lib/libcusparse.so.*")):
            if not (links / "libcusparse.so").exists():
                (links / "libcusparse.so").symlink_to(lib)
        libdirs.append(str(links))
    if not includes and not libdirs:
        return env
    join = lambda *parts: os.pathsep.join(p for p in parts if p)  # noqa: E731
    log(f"CUDA build: extra include dirs {includes}, link dirs {libdirs}")
    return dict(env, CPATH=join(*includes, env.get("CPATH")), LIBRARY_PATH=join(*libdirs, env.get("LIBRARY_PATH")))


# Source fixes for the CUDA extension with CUDA 12/13 and current PyTorch, applied to CUDA builds
# only (the CPU build compiles the sdist as published). Each Fix replaces `old` (found exactly
# `count` times) by `new`; `new` carries an "m2skd" marker, so a second run sees it and leaves the
# file alone, and an `old` that no longer matches stops the build instead of compiling
# half-patched sources. `why` names the error it fixes and where the fix was reported.
class Fix(NamedTuple):
    file: str
    old: str
    new: str
    why: str
    count: int = 1


CUDA_PATCHES = [
    Fix("src/3rdparty/concurrent_unordered_map.cuh",
        "#include <thrust/count.h>\n",
        "#include <thrust/count.h>\n#include <thrust/execution_policy.h> // m2skd: thrust::device\n",
        "CUDA 12+: 'namespace thrust has no member device' (no longer included transitively); "
        "NVIDIA/MinkowskiEngine#543, #594, #601, PR #626"),
    Fix("src/3rdparty/concurrent_unordered_map.cuh",
        "#include <cudf/detail/nvtx/ranges.hpp>\n",
        "// m2skd: cudf's bundled NVTX3 C++ header dropped (see CUDF_FUNC_RANGE below)\n",
        "CUDA 12.2+: '\"nvtx3::domain\" is ambiguous': cudf's old nvtx3.hpp collides with the NVTX3 header "
        "CUB/Thrust include; NVIDIA/MinkowskiEngine#614 (whose fix defines NVTX_DISABLE; dropping the one "
        "profiling range that needs cudf's copy keeps CCCL's NVTX ranges)"),
    Fix("src/3rdparty/concurrent_unordered_map.cuh",
        "    CUDF_FUNC_RANGE();\n",
        "    // m2skd: CUDF_FUNC_RANGE() (an NVTX profiling range) removed with cudf's NVTX header\n",
        "the one use of the header removed above; NVIDIA/MinkowskiEngine#614"),
    Fix("src/3rdparty/concurrent_unordered_map.cuh",
        "#include <type_traits>\n",
        "#include <type_traits>\n\n"
        "// m2skd: CUDA 13 passes the prefetch target as a cudaMemLocation, with a flags argument\n"
        "inline cudaError_t m2skd_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream)\n"
        "{\n"
        "#if CUDART_VERSION >= 13000\n"
        "  cudaMemLocation location{};\n"
        "  location.type = cudaMemLocationTypeDevice;\n"
        "  location.id   = device;\n"
        "  return cudaMemPrefetchAsync(ptr, bytes, location, 0, stream);\n"
        "#else\n"
        "  return cudaMemPrefetchAsync(ptr, bytes, device, stream);\n"
        "#endif\n"
        "}\n",
        "CUDA 13: 'no suitable constructor exists to convert from int to cudaMemLocation' "
        "(cudaMemPrefetchAsync's CUDA 13 signature; the CUDA 13 build of NVIDIA/MinkowskiEngine#632)"),
    Fix("src/3rdparty/concurrent_unordered_map.cuh",
        "cudaMemPrefetchAsync(m_hashtbl_values,",
        "/*m2skd*/m2skd_prefetch(m_hashtbl_values,",
        "the two prefetches of the table through the helper above (CUDA 13)", count=2),
    Fix("src/3rdparty/concurrent_unordered_map.cuh",
        "cudaMemPrefetchAsync(this,",
        "/*m2skd*/m2skd_prefetch(this,",
        "the prefetch of the map object through the helper above (CUDA 13)"),
    Fix("src/coordinate_map_gpu.cuh",
        "      m_map = map_type::create(\n"
        "          compute_hash_table_size(size, m_hashtable_occupancy),\n"
        "          m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);\n",
        "      { // m2skd: shared_ptr from (pointer, deleter) rather than from the unique_ptr\n"
        "        auto created = map_type::create(\n"
        "            compute_hash_table_size(size, m_hashtable_occupancy),\n"
        "            m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);\n"
        "        auto deleter = created.get_deleter();\n"
        "        m_map = std::shared_ptr<map_type>(created.release(), std::move(deleter));\n"
        "      }\n",
        "CUDA 12.4+ with libstdc++: 'more than one instance of overloaded function std::__to_address' "
        "(ADL also finds cuda::std::__to_address through thrust::pair, now cuda::std::pair, in the map's "
        "type when shared_ptr is built from a unique_ptr); NVIDIA/MinkowskiEngine#596"),
    Fix("src/coordinate_map_gpu.cu",
        "#include <thrust/sort.h>\n",
        "#include <thrust/sort.h>\n// m2skd: algorithms used below, no longer included transitively\n"
        "#include <thrust/remove.h>\n#include <thrust/unique.h>\n",
        "CUDA 12+: 'namespace thrust has no member remove_if / unique'; NVIDIA/MinkowskiEngine#601, #543, PR #626"),
    Fix("src/spmm.cu",
        "#include <cusparse.h>\n",
        "#include <cusparse.h>\n// m2skd: thrust algorithms used below, no longer included transitively\n"
        "#include <thrust/execution_policy.h>\n#include <thrust/reduce.h>\n#include <thrust/sort.h>\n",
        "CUDA 12+: 'namespace thrust has no member sort_by_key / reduce_by_key'; NVIDIA/MinkowskiEngine#638, PR #626"),
    Fix("src/convolution_kernel.cuh",
        "#include <vector>\n",
        "#include <vector>\n\n#include <thrust/execution_policy.h> // m2skd: thrust::device\n",
        "CUDA 12+: 'namespace thrust has no member device'; NVIDIA/MinkowskiEngine PR #626"),
    *(Fix(f, "#include <ATen/cuda/CUDAUtils.h>\n",
          "#include <ATen/core/Tensor.h> // m2skd: at::Tensor for CUDAUtils.h\n#include <ATen/cuda/CUDAUtils.h>\n",
          "Recent PyTorch (seen with 2.14.1): 'incomplete type \"at::Tensor\" is not allowed' in ATen/cuda/CUDAUtils.h, which no longer "
          "brings at::Tensor with it, where nothing before it has (found compiling spmm.cu here)")
      for f in ("src/spmm.cu", "src/spmm.cuh", "src/convolution_kernel.cu")),
    Fix("src/coordinate_map_functors.cuh",
        "struct find_coordinate\n    : public thrust::unary_function<uint32_t,\n"
        "                                    thrust::pair<uint32_t, uint32_t>> {\n",
        "struct find_coordinate { // m2skd: thrust::unary_function base dropped (CCCL 3)\n",
        "CUDA 13 (CCCL 3.0 removed thrust::unary_function): 'namespace thrust has no member class "
        "unary_function'; NVIDIA/MinkowskiEngine#632. The base only added typedefs nothing reads"),
]


def patch_cuda_sources(src: Path) -> list[tuple[str, str]]:
    """Apply CUDA_PATCHES under the sdist root `src`; [(file, 'applied' | 'already applied')].

    Raises SystemExit naming the fix if its old text is missing or found a different number of times.
    """
    report = []
    for fix in CUDA_PATCHES:
        path = src / fix.file
        text = path.read_text()
        if fix.new in text:
            report.append((fix.file, "already applied"))
            continue
        found = text.count(fix.old)
        if found != fix.count:
            raise SystemExit(f"{fix.file}: CUDA source fix matches {found} times, expected {fix.count} ({fix.why})")
        path.write_text(text.replace(fix.old, fix.new))
        report.append((fix.file, "applied"))
    return report


def fixes_digest() -> str:
    """Short hash of CUDA_PATCHES: a cached CUDA wheel is reused only with the same fixes."""
    return hashlib.sha256(repr(CUDA_PATCHES).encode()).hexdigest()[:8]


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
    ap.add_argument("--force-cuda", action="store_true",
                    help="build the CUDA extension without a visible GPU (needs nvcc and a CUDA build of torch; "
                         "set TORCH_CUDA_ARCH_LIST, e.g. 9.0, or every architecture torch supports is compiled)")
    ap.add_argument("--patched-sources", metavar="DIR",
                    help="only unpack the sdist into DIR with the CUDA source fixes applied (to read or compile by hand)")
    args = ap.parse_args()
    if args.patched_sources:
        src = unpack_sources(fetch_sdist(args.version, Path(args.cache)), Path(args.patched_sources), cuda=True)
        log(f"patched sources in {src}")
        return
    tag, cuda = build_flavour(args.force_cuda)
    wheel_dir = Path(args.cache) / "wheels" / f"MinkowskiEngine-{args.version}-{tag}"
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        ensure_build_deps(cuda)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            src = unpack_sources(fetch_sdist(args.version, Path(args.cache)), tmp / "src", cuda)
            cmd = [sys.executable, "setup.py", "bdist_wheel", "--blas=openblas"]
            if not cuda:
                cmd.insert(3, "--cpu_only")
            elif args.force_cuda:
                cmd.append("--force_cuda")
            env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 2))
            if cuda:
                env = cuda_build_env(env, tmp)
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
