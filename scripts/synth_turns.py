"""Time `simulate_scan` of several code trees (checkouts) in turns.

    python scripts/synth_turns.py [--rounds 5] [--scans 20] [--frames 150] [--seed 0] [--seq 00] NAME=TREE ...

Each round runs every tree once, each in a fresh subprocess (cwd = the tree, so `import m2skd`
resolves to that tree), in alternating order (forward on even rounds, reversed on odd ones).
A subprocess builds the street of sequence SEQ (FRAMES scans, SEED) untimed, simulates one scan
untimed to warm up, then times simulate_scan on SCANS evenly spaced frames (each with its
generate.py noise stream) and reports seconds and points. Per tree: the median over rounds of
seconds per 124k points (sum of seconds / sum of points * 124000), wall-clock and the
process's CPU time (less sensitive to other jobs on a shared machine), and the ratio of medians
to the first tree.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import numpy as np
from m2skd.synth.generate import scene_for, sequence_key
from m2skd.synth.lidar import simulate_scan
seq, frames, seed, scans = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
scene = scene_for(seq, frames, seed)
pick = np.linspace(0, frames - 1, scans).round().astype(int)
rng = lambda f: np.random.default_rng(np.random.SeedSequence([seed, sequence_key(seq), 1, int(f)]))
simulate_scan(scene, int(pick[0]), rng(pick[0]))
sec, cpu, pts = 0.0, 0.0, 0
for f in pick:
    r = rng(f)
    t0, c0 = time.perf_counter(), time.process_time()
    scan = simulate_scan(scene, int(f), r)
    sec += time.perf_counter() - t0
    cpu += time.process_time() - c0
    pts += len(scan.points)
print(json.dumps({"seconds": sec, "cpu": cpu, "points": pts, "file": __import__("m2skd.synth.lidar").synth.lidar.__file__}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scans", type=int, default=20)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq", default="00")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("trees", nargs="+", help="NAME=PATH")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.trees]
    per = {name: [] for name, _ in trees}
    per_cpu = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            out = subprocess.run([args.python, "-c", WORKER, args.seq, str(args.frames), str(args.seed), str(args.scans)],
                                 cwd=path, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            assert Path(res["file"]).resolve().is_relative_to(Path(path).resolve()), (res["file"], path)
            s = res["seconds"] / res["points"] * 124_000
            c = res["cpu"] / res["points"] * 124_000
            per[name].append(s)
            per_cpu[name].append(c)
            print(f"round {r} {name}: {s:.4f} s wall, {c:.4f} s CPU per 124k points "
                  f"({res['points'] / args.scans:.0f} points/scan)", flush=True)
    first = trees[0][0]
    for label, table in (("wall", per), ("CPU", per_cpu)):
        base = statistics.median(table[first])
        print(f"median {label} s per 124k points, ratio to {first}")
        for name, _ in trees:
            m = statistics.median(table[name])
            ratios = [a / b for a, b in zip(table[name], table[first])]
            print(f"  {name}: {m:.4f}  ratio {m / base:.3f}  (per-round ratios {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
