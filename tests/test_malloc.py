"""retain_freed_memory: a large array allocated again after being freed reuses the process's
memory instead of a fresh mapping, counted as page faults in fresh interpreters with and without it."""
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from m2skd.malloc import retain_freed_memory
(getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage(False)  # 4 kB pages, whatever the kernel's huge-page setting
if sys.argv[1] == "retain":
    assert retain_freed_memory()
nbytes = 40 << 20  # beyond glibc's largest default threshold (32 MB): mapped afresh each time by default
block = np.ones(nbytes, np.uint8)  # the first one faults in either way: not counted
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = np.ones(nbytes, np.uint8)
    del block
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_allocation(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_freed_large_block_is_reused_without_page_faults():
    fresh, retained = _faults_per_allocation("default"), _faults_per_allocation("retain")
    assert fresh > 5000  # 10,240 pages of 4 kB
    assert retained < fresh / 20
