"""Peak RSS of one MinkUNet34 training step (torch backend, fp32, 2 threads) on the first two
train scans of a prepared and cached run (real recipe: 0.05 m, distilled from the cache), for
the decoder features a forward is asked to slice back to the points.

    python scripts/peak_memory_step.py RUN_DIR [--features dec4 | --features dec1,dec2,dec3,dec4]

RUN_DIR: e.g. the `m2skd bench` work run (runs/bench/work/prep_j2), which holds 64-beam scans.
One process per measurement: ru_maxrss only grows.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import torch

from m2skd.dataset import ScanDataset, collate
from m2skd.losses import FeatureAdapter
from m2skd.models import build_model
from m2skd.rundir import RunDir, spec_for_run
from m2skd.train_config import load_config
from m2skd.trainer import training_step
from m2skd.transforms import AugmentConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--features", default="dec4", help="comma-separated decoder stages to slice")
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = spec_for_run(RunDir(args.run_dir))
    cfg = dataclasses.replace(load_config("semantickitti"), backend="torch", batch_size=2)
    ds = ScanDataset(args.run_dir, spec, ("train",), "single", cfg.voxel_size, AugmentConfig(), with_cache=True)
    batch = collate([ds[(0, 0)], ds[(1, 0)]])
    torch.manual_seed(0)
    student = build_model(4, spec.num_classes, 34, cfg.widths, cfg.stem_width, "torch").train()
    adapter = FeatureAdapter(student.feature_channels[cfg.feature_layer], batch["teacher_feats"].shape[1])
    params = list(student.parameters()) + list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    training_step(student, batch, cfg, optimizer, None, scaler, params, torch.device("cpu"), True, adapter,
                  features=tuple(args.features.split(",")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{batch['coords'].shape[0]} points, features {args.features}: step {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {peak:.0f} MB ({before:.0f} MB before the step)")


if __name__ == "__main__":
    main()
