"""Size/KL table of the teacher-cache encodings on real-sized (64-beam) scans, for a teacher
trained to a useful accuracy rather than the bench's 3-step one.

    python scripts/cache_encodings.py RUN_DIR TEACHER.pt [--split val] [--scans 6]

The table of record (README, "Teacher cache encodings") was made with this recipe:

    m2skd synth runs/enc/data --sequences 00 --frames 40 --beams 32 --azimuth-steps 1024 --seed 0
    m2skd synth runs/enc/data --sequences 08 --frames 6 --seed 1          # 64 x 2048, ~124k points
    m2skd prepare runs/enc/data runs/enc/run --frames-per-shard 10
    m2skd train-teacher runs/enc/run --config demo --backend torch --set steps=100 --set workers=0
    python scripts/cache_encodings.py runs/enc/run runs/enc/run/teacher/checkpoints/last.pt --split val

(train on 32-beam drive 00, measure on the 64-beam val drive 08: the teacher's accuracy there
is printed with the table).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from m2skd.checkpoint import load_checkpoint
from m2skd.inference import predict
from m2skd.manifest import read_manifest
from m2skd.metrics import confusion_matrix, summarize
from m2skd.ragged import RaggedReader
from m2skd.rundir import RunDir, spec_for_run
from m2skd.pipeline.bench import bench_encodings
from m2skd.pipeline.cache_teacher import teacher_outputs


def teacher_quality(run: str, checkpoint: str, split: str, scans: int) -> dict:
    """mIoU / hard-class mIoU of the teacher's argmax at the single-scan points measured."""
    spec = spec_for_run(RunDir(run))
    model, ckpt = load_checkpoint(checkpoint, "torch")
    model.eval()
    df, _ = read_manifest(RunDir(run).manifest)
    conf = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    for _, row in df[df["split"] == split].head(scans).iterrows():
        data = RaggedReader(RunDir(run).prepare / row["shard"]).read(int(row["shard_index"]))
        logits, _ = teacher_outputs(model, data["points"], ckpt["config"]["voxel_size"], "dec4", "cpu")
        n = int(row["n_single"])
        conf += confusion_matrix(predict(logits[:n]), spec.learning_lut[data["label"][:n] & 0xFFFF], spec.num_classes)
    return summarize(conf, spec.class_names, spec.hard_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("teacher")
    parser.add_argument("--split", default="val")
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    q = teacher_quality(args.run_dir, args.teacher, args.split, args.scans)
    temperature = float(torch.load(args.teacher, map_location="cpu", weights_only=False)["config"]["temperature"])
    rows = bench_encodings(args.run_dir, args.teacher, args.scans, temperature, split=args.split)
    print(f"teacher {args.teacher}: mIoU {q['miou']:.3f}, hard-class mIoU {q['hard_miou']:.3f}, accuracy {q['accuracy']:.3f} "
          f"on {args.scans} {args.split} scans; KL at T = {temperature:.3g}")
    print("| kind | encoding | B/point | KL mean (nats) | KL max (nats) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "features":
            print(f"| features | {r['encoding']} | {r['bytes_per_point']:.2f} | rel. MSE {r['relative_mse']:.1e} | "
                  f"{r['hard_points_fraction']:.2%} hard points, {r['bytes_per_hard_point']:.1f} B each |")
        else:
            print(f"| {r['kind']} | {r['encoding']} | {r['bytes_per_point']:.2f} | {r['kl_nats']:.2e} | {r['kl_max_nats']:.2e} |")
    d = rows[-1]
    print(f"default projected to SemanticKITTI train (0.5% hard points): {d['kitti_bytes_per_point']:.2f} B/point, "
          f"{d['kitti_train_gb']:.1f} GB")


if __name__ == "__main__":
    main()
