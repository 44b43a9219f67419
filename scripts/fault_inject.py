"""Kill stages at random moments and check that re-running them gives the uninterrupted result.

For prepare, train-teacher, cache-teacher and train-student (in that order) on a small synthetic
dataset: run the stage once uninterrupted (the reference), then in a second run directory start
it again and again, each time SIGKILLing it after a random delay (seeded), checking after every
kill that nothing published is corrupt; then let it finish (re-run / --resume) and compare its
outputs with the reference bit for bit; no temporary may be left behind.

    python scripts/fault_inject.py --kills 20 --work /tmp/fi     # 20 kills per stage
    python scripts/fault_inject.py --kills 5 --work /tmp/fi --run-url s3://bucket/fi --stages prepare,cache-teacher
With --run-url the killed stages write to that fsspec URL (an object store: no rename) and are
compared with the reference run on local disk; --stages picks the stages to kill (the others
run once, uninterrupted, as inputs of the next). The test suite runs it with --kills 2. Prints
one JSON summary line; exit code 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_CONFIG = {"depth": 18, "widths": [8, 16, 16, 16, 16, 16, 12, 12], "stem_width": 8, "backend": "torch",
               "voxel_size": 0.4, "batch_size": 2, "lr": 0.01, "workers": 0, "checkpoint_every": 1, "val_every": 0,
               "log_every": 1}


STAGES = ("prepare", "train-teacher", "cache-teacher", "train-student")


def stage_commands(data: Path, run, config: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "m2skd"]
    train = ["--config", str(config), "--resume"]
    return {
        "prepare": cli + ["prepare", str(data), str(run), "--frames-per-shard", "2"],
        "train-teacher": cli + ["train-teacher", str(run), *train, "--steps", "8"],
        "cache-teacher": cli + ["cache-teacher", str(run), "--backend", "torch", "--device", "cpu"],
        "train-student": cli + ["train-student", str(run), *train, "--steps", "8"],
    }


def run_to_end(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def kill_after(cmd: list[str], env: dict, delay: float) -> bool:
    """Start cmd, SIGKILL it after `delay` seconds; True if it was still running then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def temporaries(run) -> list[str]:
    """Temporaries on disk; on an object store, unreferenced checkpoint objects and groups
    without their commit record (m2skd.storage.leftovers)."""
    from m2skd.storage import leftovers

    return leftovers(run)


def corrupt_outputs(run) -> list[str]:
    """Published groups whose chunks differ from what was written, or unreadable JSON/manifest/checkpoints."""
    from m2skd.checkpoint import read_checkpoint
    from m2skd.manifest import read_manifest
    from m2skd.ragged import list_groups, verify_group
    from m2skd.storage import path as location

    run = location(run)
    if not run.exists():
        return []
    bad = [str(p) for d in (run / "prepare/shards", run / "teacher_cache/shards") for p in list_groups(d) if not verify_group(p)]
    for f in run.rglob("*.json"):
        if "tensorboard" in f.parts or ".zarr" in str(f):
            continue
        try:
            json.loads(f.read_text())
        except ValueError:
            bad.append(str(f))
    for f in run.rglob("*.pt"):
        try:
            read_checkpoint(f)
        except Exception:  # noqa: BLE001 - a published checkpoint must load
            bad.append(str(f))
    if (run / "prepare/manifest.parquet").exists():
        try:
            read_manifest(run / "prepare/manifest.parquet")
        except Exception:  # noqa: BLE001 - any failure to read is corruption here
            bad.append(str(run / "prepare/manifest.parquet"))
    return bad


def same_groups(a_dir, b_dir) -> list[str]:
    from m2skd.ragged import RaggedReader, list_groups

    diffs = []
    a_groups = [p.relative_to(a_dir).as_posix() for p in list_groups(a_dir)]
    if a_groups != [p.relative_to(b_dir).as_posix() for p in list_groups(b_dir)]:
        return [f"{b_dir}: other shards"]
    for rel in a_groups:
        ra, rb = RaggedReader(a_dir / rel), RaggedReader(b_dir / rel)
        for rowset in [None] + list(ra.attrs.get("extra_rows", {})):
            for i in range(len(ra) if rowset is None else len(ra._rowset(rowset)[0]) - 1):
                xa, xb = ra.read(i, rowset=rowset), rb.read(i, rowset=rowset)
                if xa.keys() != xb.keys() or any(not np.array_equal(xa[k], xb[k]) for k in xa):
                    diffs.append(f"{b_dir / rel} scan {i} ({rowset or 'points'})")
    return diffs


def compare(stage: str, ref: Path, run) -> list[str]:
    import torch

    from m2skd.checkpoint import read_checkpoint
    from m2skd.manifest import read_manifest
    from m2skd.rundir import RunDir

    a, b = RunDir(ref), RunDir(run)
    if stage == "prepare":
        da, _ = read_manifest(a.manifest)
        db, _ = read_manifest(b.manifest)
        return ([] if da.equals(db) else ["manifest differs"]) + same_groups(a.shards, b.shards)
    if stage == "cache-teacher":
        ca, cb = (json.loads(d.cache_record.read_bytes()) for d in (a, b))
        diffs = [] if ca["cache_fingerprint"] == cb["cache_fingerprint"] else ["cache fingerprint differs"]
        return diffs + same_groups(a.teacher_cache / "shards", b.teacher_cache / "shards")
    name = "teacher" if stage == "train-teacher" else "student"
    sa, sb = (read_checkpoint(d.model(name))["model"] for d in (a, b))
    return [f"{name}/model.pt: {k}" for k in sa if not torch.equal(sa[k], sb[k])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (data, ref/, run/)")
    parser.add_argument("--run-url", default=None, help="the killed run's directory as an fsspec URL (default WORK/run)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to kill (the others run once)")
    args = parser.parse_args(argv)
    kill_stages = [s for s in args.stages.split(",") if s]
    if set(kill_stages) - set(STAGES):
        parser.error(f"--stages: choose from {','.join(STAGES)}")
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    work = args.work
    data, ref, run = work / "data", work / "ref", args.run_url or work / "run"
    config = work / "tiny.yaml"
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(TINY_CONFIG))  # JSON is YAML
    if not (data / "sequences").is_dir():
        run_to_end([sys.executable, "-m", "m2skd", "synth", str(data), "--sequences", "00,08", "--frames", "8",
                    "--beams", "16", "--azimuth-steps", "512", "--seed", "1"], env)
    summary = {"kills_per_stage": args.kills, "stages": {}}
    failed = False
    ref_cmds, run_cmds = stage_commands(data, ref, config), stage_commands(data, run, config)
    for stage in list(ref_cmds)[: max(STAGES.index(s) for s in kill_stages) + 1]:  # none after the last killed one
        seconds = run_to_end(ref_cmds[stage], env)
        if stage not in kill_stages:
            run_to_end(run_cmds[stage], env)
            continue
        landed, corrupt = 0, []
        for _ in range(args.kills):
            landed += kill_after(run_cmds[stage], env, rng.uniform(0.2, seconds))
            corrupt += corrupt_outputs(run)
        run_to_end(run_cmds[stage], env)
        diffs = compare(stage, ref, run)
        left = temporaries(run)
        summary["stages"][stage] = {"reference_seconds": round(seconds, 2), "kills": args.kills, "killed_running": landed,
                                    "corrupt_after_kill": corrupt, "mismatches": diffs, "temporaries_left": left}
        failed |= bool(corrupt or diffs or left)
    summary["ok"] = not failed
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
