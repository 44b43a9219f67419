"""Teachers' standing on a study size's data, before any student is trained: what each teacher
could pass on. Each teacher is trained (the study's steps), cached on train and val and
evaluated on single val scans; the figures are those `m2skd study` reports as standing, plus the
cached targets' IoU per hard class on val.

    PYTHONPATH=. python scripts/teacher_standing.py OUT --size study-matched \\
        --teacher none --teacher hard --teacher hard:1 --teacher hard:0:fused_point_labels=false

A teacher is FUSION[:SEED[:KEY=VALUE,...]]. FUSION:0 is the study's own teacher (OUT/run,
OUT/run-none, ...: `m2skd study --out OUT --size SIZE` reuses it); any other is trained in
OUT/run-FUSION-sSEED[-KEY-VALUE] on a hard-linked copy of that fusion's prepared shards (its study teacher is made
first: it is what the variant is compared with). The
data is always the size's, drawn with seed 0. Teachers run one after another, each on
`--threads` torch threads; start one process per teacher to use more cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from m2skd.rundir import RunDir
from m2skd.train_config import load_config
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache
from m2skd.pipeline.demo import SIZES, build_shared, train_or_resume
from m2skd.pipeline.study import evaluate_each


def parse_teacher(spec: str) -> tuple[str, int, dict]:
    fusion, _, rest = spec.partition(":")
    seed, _, overrides = rest.partition(":")
    return fusion, int(seed or 0), dict(kv.split("=", 1) for kv in overrides.split(",") if kv)


def standing(out: Path, size: str, spec: str, backend: str) -> dict:
    fusion, seed, overrides = parse_teacher(spec)
    s = SIZES[size]
    shared = build_shared(out, size, 0, backend, fusion=fusion)
    run, teacher = shared["run"], shared["teacher"]
    if seed != 0 or overrides:
        tag = "".join(f"-{k}-{v}" for k, v in sorted(overrides.items()))
        run = out / f"run-{fusion}-s{seed}{tag}"
        if not RunDir(run).prepare.exists():
            shutil.copytree(RunDir(shared["run"]).prepare, RunDir(run).prepare, copy_function=os.link)
        config = load_config(s.config, {"steps": s.teacher_steps, "seed": seed, **shared["base"], **overrides})
        teacher = train_or_resume(run, "teacher", "teacher", config)
        run_cache(run, teacher, CacheConfig(backend=backend, splits=("train", "val")), jobs=1)
    single = evaluate_each(run, {"teacher": teacher}, shared["data"], s.eval_scans, backend)["teacher"]
    targets = json.loads(RunDir(run).cache_record.read_text())["target_quality_by_split"]
    return {"teacher": spec, "run": str(run), "single_scan_hard_miou": single["hard_miou"],
            "targets_hard_miou": {split: q["hard_miou"] for split, q in targets.items()},
            "val_targets_hard_class_iou": targets["val"].get("hard_class_iou")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="study", choices=sorted(SIZES))
    ap.add_argument("--teacher", action="append", required=True, metavar="FUSION[:SEED[:KEY=VALUE,...]]")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.teacher:
        row = standing(args.out, args.size, spec, args.backend)
        iou = row["val_targets_hard_class_iou"] or {}
        print(f"{spec:<40} single-scan val {row['single_scan_hard_miou']:.3f}  targets "
              + "  ".join(f"{k} {v:.3f}" for k, v in sorted(row["targets_hard_miou"].items()))
              + "  | val per class " + " ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in iou.items()),
              flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
