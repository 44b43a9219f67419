"""Kill stages at random moments and check that re-running them gives the uninterrupted result.

For prepare, train-teacher, cache-teacher and train-student (in that order) on a small synthetic
dataset: run the stage once uninterrupted (the reference), then in a second run directory start
it again and again, each time SIGKILLing it after a random delay (seeded), checking after every
kill that nothing published is corrupt; then let it finish (re-run / --resume) and compare its
outputs with the reference bit for bit; no temporary may be left behind.

Delays count from the moment the run's directory first changes (the stage has started work,
past its imports) and are drawn within the work the reference did after that moment, less what
the earlier kills of the stage already saw done: so the kills land in the work, from start to
end, on a loaded machine as on an idle one (a delay from the process's start, drawn from the
reference's whole duration, missed on a loaded machine, and after one miss the stage is finished
and every later kill misses too).

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
import tempfile
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


def _local_contents(root) -> set:
    found = set()
    for d, _, files in os.walk(root):
        for f in files:
            try:
                st = os.stat(os.path.join(d, f), follow_symlinks=False)
            except FileNotFoundError:  # renamed or removed while listed
                continue
            found.add((os.path.join(d, f), st.st_size, st.st_mtime_ns))
    return found


def contents(run, staging: Path) -> frozenset:
    """(name, size, stamp) of everything under the run directory, and for an object store of
    the local staging folder its writes pass through: changes when anything is written."""
    from m2skd.storage import object_stamp, path as location

    run = location(run)
    if isinstance(run, Path):
        return frozenset(_local_contents(run))
    return frozenset({(k, v.get("size"), object_stamp(v)) for k, v in run.find().items()} | _local_contents(staging))


def run_watched(cmd: list[str], env: dict, run, kill_after: float | None = None) -> tuple[float | None, float, bool]:
    """Run cmd; return (seconds until the run's directory first changed (None if never), seconds
    to the end, whether it was killed). With `kill_after`, SIGKILL it that many seconds after
    that first change, if still running."""
    staging = Path(env["M2SKD_STAGING"])
    before = contents(run, staging)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        started = None
        while proc.poll() is None:
            now = time.perf_counter() - t0
            if started is None and contents(run, staging) != before:
                started = now
            if started is not None and kill_after is not None and now >= started + kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return started, now, True
            time.sleep(0.01 if started is None else 0.002)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read().decode(errors='replace')[-2000:]}")
    return started, time.perf_counter() - t0, False


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
    work = args.work
    # the killed runs' local staging (object stores) in a folder of their own, watched for their first writes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "M2SKD_STAGING": str(work.resolve() / "staging")}
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
        if stage not in kill_stages:
            run_to_end(ref_cmds[stage], env)
            run_to_end(run_cmds[stage], env)
            continue
        started, seconds, _ = run_watched(ref_cmds[stage], env, ref)
        work_seconds = seconds - (started or 0.0)
        left_to_do, landed, corrupt = work_seconds, 0, []
        for _ in range(args.kills):
            delay = rng.uniform(0.0, max(left_to_do, 0.05))
            _, _, killed = run_watched(run_cmds[stage], env, run, kill_after=delay)
            landed += killed
            left_to_do -= delay if killed else left_to_do
            corrupt += corrupt_outputs(run)
        run_to_end(run_cmds[stage], env)
        diffs = compare(stage, ref, run)
        left = temporaries(run)
        summary["stages"][stage] = {"reference_seconds": round(seconds, 2), "reference_work_seconds": round(work_seconds, 2),
                                    "kills": args.kills, "killed_running": landed, "corrupt_after_kill": corrupt,
                                    "mismatches": diffs, "temporaries_left": left}
        failed |= bool(corrupt or diffs or left)
    summary["ok"] = not failed
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
