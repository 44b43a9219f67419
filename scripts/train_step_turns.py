"""Time a training step and its segmentation loss of several code trees (checkouts) in turns.

    python scripts/train_step_turns.py RUN_DIR [--input single|fused] [--rounds 3] [--batches 4] NAME=TREE ...

Each round runs every tree once, each in a fresh subprocess (cwd = the tree, so `import m2skd`
resolves to that tree), in alternating order (forward on even rounds, reversed on odd ones), one
torch thread. A subprocess loads the first 2 x BATCHES train scans of RUN_DIR (a prepared run;
`--input fused`: the teacher's fused input), builds the demo configuration's network (torch
backend, seed 0) and runs one untimed step, then times BATCHES steps of forward, segmentation
loss (cross-entropy + Lovasz-softmax), backward and an SGD step at learning rate 0 (every step and
every tree sees the same weights), and the loss's forward+backward alone on the same logits.
Per tree: medians over rounds of seconds per step and per loss, and their ratios to the first tree.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from m2skd.checkpoint import model_from_config
from m2skd.dataset import collate
from m2skd.losses import segmentation_loss
from m2skd.rundir import RunDir, spec_for_run
from m2skd.train_config import load_config
from m2skd.trainer import training_set
run_dir, role, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config("demo")
run = RunDir(run_dir)
spec = spec_for_run(run)
data = training_set(run, spec, cfg, role, False)
batches = [collate([data[(2 * b, 0)], data[(2 * b + 1, 0)]]) for b in range(n + 1)]
torch.manual_seed(0)
model = model_from_config(cfg, spec.num_classes, "torch")
opt = torch.optim.SGD(model.parameters(), lr=0.0)
def step(batch):
    out = model(torch.as_tensor(batch["coords"]), torch.as_tensor(batch["feats"]))
    loss, _ = segmentation_loss(out.logits, torch.as_tensor(batch["label"]))
    opt.zero_grad(); loss.backward(); opt.step()
    return out.logits.detach()
step(batches[0])
steps = losses = points = 0.0
for batch in batches[1:]:
    t0 = time.perf_counter(); logits = step(batch); steps += time.perf_counter() - t0
    logits.requires_grad_(True)
    t0 = time.perf_counter()
    segmentation_loss(logits, torch.as_tensor(batch["label"]))[0].backward()
    losses += time.perf_counter() - t0
    points += len(batch["label"])
print(json.dumps({"step_s": steps / n, "loss_s": losses / n, "points_per_batch": points / n}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("trees", nargs="+", help="NAME=TREE")
    ap.add_argument("--input", choices=("single", "fused"), default="single")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.trees]
    role = "teacher" if args.input == "fused" else "student"
    times: dict[str, list[dict]] = {name: [] for name, _ in trees}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    for r in range(args.rounds):
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            proc = subprocess.run([sys.executable, "-c", WORKER, str(args.run_dir.resolve()), role, str(args.batches)],
                                  cwd=tree, env=env,
                                  capture_output=True, text=True, check=True)
            times[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = trees[0][0]
    med = {name: {k: statistics.median(t[k] for t in runs) for k in ("step_s", "loss_s")} for name, runs in times.items()}
    for name, runs in times.items():
        m = med[name]
        print(f"{name}: {runs[0]['points_per_batch']:.0f} points a batch; step {m['step_s']:.3f} s "
              f"({m['step_s'] / med[first]['step_s']:.2f}x), loss fwd+bwd {m['loss_s']:.3f} s "
              f"({m['loss_s'] / med[first]['loss_s']:.2f}x); rounds {[round(t['step_s'], 3) for t in runs]}")


if __name__ == "__main__":
    main()
