"""The bench's prepare rows alone: the same synthetic data as `m2skd bench` (64-beam drives 00 and
08, 48 scans each, seed 0) and the same function (pipeline/bench.py: bench_prepare), for the code
tree on PYTHONPATH, without the hour of training rows around it.

    PYTHONPATH=TREE python scripts/bench_prepare.py WORK [--frames 48] [--merge BENCH_JSON]

WORK keeps the generated data (work/data, reused when present) and the runs. Prints the bench's
prepare lines and one JSON line. --merge replaces the "prepare" entry of a bench result file with
this run's and re-checks prepare's budgets, noting the date, commit and load of the prepare rows there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from m2skd.atomic import write_json_atomic
from m2skd.pipeline import bench
from m2skd.synth import SynthConfig, generate_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--merge", type=Path)
    args = ap.parse_args()
    data = args.work / "data"
    sequences = ("00", "08")
    cores = os.cpu_count() or 1
    if not (data / "sequences" / sequences[-1] / "poses.txt").is_file():
        generate_dataset(data, sequences=sequences, frames=args.frames, seed=0, config=SynthConfig(), jobs=cores)
    load = os.getloadavg()
    p = bench.bench_prepare(data, args.work, sequences, cores)
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    tree = Path(bench.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    note = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "load_average_max": load, "command": "scripts/bench_prepare.py"}
    table = bench.format_table({"machine": bench.machine_name(), "torch": "-", "device": "cpu", "prepare": p,
                                "synth": {"seconds_per_scan": float("nan"), "points_per_scan": float("nan")},
                                "loader": {"scans_per_s_per_worker": float("nan")}, "train_step": [], "backbone": [],
                                "cache_encodings": [], "eval": {"points_per_s": float("nan"), "backend": "-"}, "budgets": []})
    print("\n".join(line for line in table.splitlines() if line.startswith(("prepare", "shard", "hard"))))
    print(json.dumps({**p, "measured": note}))
    if args.merge:
        result = json.loads(args.merge.read_text())
        result["prepare"] = {**p, "measured": note}
        result["budgets"] = merge_prepare_budgets(result.get("budgets", []), p)
        write_json_atomic(args.merge, result)


def merge_prepare_budgets(budgets: list[dict], p: dict) -> list[dict]:
    """The result's budget rows with prepare's re-checked from `p` (the others as they were:
    an older result may lack what check_budgets needs of the other stages)."""
    out = [b for b in budgets if not b["ratio"].startswith("prepare_")]
    for name in ("prepare_vs_io_rate", "prepare_vs_io_rate_1job"):
        op, bound = bench.BUDGETS[name]
        ok = p[name] <= bound if op == "<=" else p[name] >= bound
        out.append({"ratio": name, "value": p[name], "budget": f"{op} {bound}", "ok": bool(ok)})
    return out


if __name__ == "__main__":
    main()
