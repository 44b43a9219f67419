"""SIGKILL each stage at random moments (seeded), re-run or resume it, and compare with an
uninterrupted run bit for bit (scripts/fault_inject.py; `--kills 20` outside the suite)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_killed_stages_resume_to_the_uninterrupted_result(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/fault_inject.py"), "--kills", "2", "--seed", "3",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["ok"], json.dumps(summary, indent=1)
    stages = summary["stages"]
    assert list(stages) == ["prepare", "train-teacher", "cache-teacher", "train-student"]
    # the kills must land while the stages work, or the test shows nothing
    assert sum(s["killed_running"] for s in stages.values()) >= 5, stages
