"""`m2skd eval`: official SemanticKITTI metrics for one or more checkpoints on raw sequences at
full resolution, side by side; CSV/JSON tables, PNG plots, optional `.label` predictions."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from m2skd import semantickitti as sk
from m2skd.dataset import RawScanDataset, collate
from m2skd.dataset_spec import load_spec
from m2skd.errors import StaleInputError
from m2skd.inference import evaluate
from m2skd.instances import InstanceAccumulator
from m2skd.metrics import summarize
from m2skd.plots import confusion_plot, instance_plot, iou_bars
from m2skd.atomic import read_json, write_json_atomic
from m2skd.rundir import RunDir
from m2skd.trainer import load_checkpoint, resolve_device, spec_for_run


def checkpoint_label(path: Path) -> str:
    """RUN/student/model.pt -> 'student'."""
    path = Path(path)
    return path.parent.name if path.name == "model.pt" else path.stem


def resolve_data(checkpoint: Path, data_root=None) -> str:
    if data_root:
        return str(data_root)
    record = checkpoint.resolve().parent.parent / "prepare" / "config.json"
    if record.is_file():
        return read_json(record)["data_root"]
    raise StaleInputError(f"{checkpoint}: cannot tell which dataset it belongs to; pass --data")


def run_eval(checkpoints, split="val", data_root=None, sequences=None, out_dir=None, save_labels=None, backend="auto",
             device=None, workers=2, batch_size=1, max_scans=None, progress=None) -> dict:
    checkpoints = [Path(c) for c in checkpoints]
    device = resolve_device(device)
    data_root = resolve_data(checkpoints[0], data_root)
    out_dir = Path(out_dir or checkpoints[0].resolve().parent.parent / "eval")
    results = {}
    for ckpt_path in checkpoints:
        spec = spec_for_checkpoint(ckpt_path)
        model, ckpt = load_checkpoint(ckpt_path, backend, device, spec=spec)
        seqs = list(sequences) if sequences else [s for s in sk.list_sequences(data_root) if spec.split_of(s) == split]
        dataset = RawScanDataset(data_root, seqs, spec, ckpt["config"]["voxel_size"])
        if max_scans and max_scans < len(dataset):
            dataset.items = dataset.items[:: max(1, len(dataset.items) // max_scans)][:max_scans]
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
        label = checkpoint_label(ckpt_path)
        if progress:
            progress(total=len(dataset), postfix={"checkpoint": label})
        writer = _label_writer(dataset, spec, Path(save_labels) / label) if save_labels else None
        labelled = all(seq.has_labels for seq, _ in dataset.items)
        instances = InstanceAccumulator()

        def on_batch(batch, pred):
            if writer:
                writer(batch, pred)
            if labelled:  # instance keys are batch-unique (collate), so a batch is added at once
                instances.add(batch["feats"][:, :3].cpu().numpy(), batch["instance"].cpu().numpy(),
                              (pred == batch["label"]).cpu().numpy())
            if progress:
                progress(advance=len(batch["n_single"]))

        t0 = time.perf_counter()
        conf = evaluate(model, loader, spec.num_classes, device, on_batch=on_batch)
        seconds = time.perf_counter() - t0
        summary = summarize(conf.matrix, spec.class_names, spec.hard_classes)
        summary.update(checkpoint=str(ckpt_path), split=split, sequences=seqs, scans=len(dataset), seconds=seconds,
                       points=int(conf.matrix.sum()), points_per_second=float(conf.matrix.sum()) / max(seconds, 1e-9),
                       labelled=labelled, instances=instances.summary() if labelled else None)
        results[label] = summary
    out_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(results)
    table.to_csv(out_dir / "metrics.csv", index=False)
    write_json_atomic(out_dir / "metrics.json", results)
    iou_bars(results, out_dir / "per_class_iou.png")
    instances = instance_table(results)
    if len(instances):
        instances.to_csv(out_dir / "instances.csv", index=False)
        instance_plot(results, out_dir / "instances.png")
    for label, summary in results.items():
        confusion_plot(np.array(summary["confusion"]), summary["class_names"], out_dir / f"confusion_{label}.png", f"{label}: confusion (row-normalised)")
    return {"results": results, "table": table, "instances": instances, "out_dir": str(out_dir)}


def spec_for_checkpoint(ckpt_path: Path):
    """The dataset description (and hard classes) of the run the checkpoint was trained in."""
    run = RunDir(Path(ckpt_path).resolve().parent.parent)
    return spec_for_run(run) if (run.prepare / "config.json").is_file() else load_spec()


def _label_writer(dataset: RawScanDataset, spec, root: Path):
    """Predictions as raw-id .label files: ROOT/sequences/NN/predictions/XXXXXX.label."""

    def write(batch, pred):
        pred = pred.cpu().numpy()
        offsets = batch["offsets"].cpu().numpy()
        for b, index in enumerate(batch["index"].tolist()):
            seq, frame = dataset.items[index]
            raw = spec.inverse_lut[pred[offsets[b]:offsets[b + 1]]]
            sk.write_label(root / "sequences" / seq.name / "predictions" / f"{frame}.label", raw)

    return write


def comparison_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per checkpoint: official mIoU, hard-class mIoU, accuracy, then per-class IoU."""
    rows = []
    for label, s in results.items():
        row = {"checkpoint": label, "miou": s["miou"], "hard_miou": s["hard_miou"], "miou_present": s["miou_present"],
               "accuracy": s["accuracy"]}
        row.update({pc["name"]: pc["iou"] for pc in s["per_class"]})
        rows.append(row)
    return pd.DataFrame(rows)


def instance_table(results: dict[str, dict]) -> pd.DataFrame:
    """Sparse-instance buckets side by side: one row per (grouping, bucket), per checkpoint its
    mean point recall and hit rate. Empty when no checkpoint was evaluated on labelled scans."""
    labelled = {k: s["instances"] for k, s in results.items() if s.get("instances")}
    if not labelled:
        return pd.DataFrame()
    rows = []
    first = next(iter(labelled.values()))
    for key, grouping in (("by_points", "points"), ("by_range", "range_m")):
        for j, bucket in enumerate(first[key]):
            row = {"grouping": grouping, "bucket": bucket["bucket"], "count": bucket["count"]}
            for label, inst in labelled.items():
                row[f"{label} recall"] = inst[key][j]["point_recall"]
                row[f"{label} hit"] = inst[key][j]["hit_rate"]
            rows.append(row)
    return pd.DataFrame(rows)
