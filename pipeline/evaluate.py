"""`m2skd eval`: official SemanticKITTI metrics for one or more checkpoints on raw sequences at
full resolution, side by side; CSV/JSON tables, PNG plots, optional `.label` predictions.
Given a teacher, also the transfer diagnostic (m2skd.transfer) of each checkpoint to it."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from m2skd import semantickitti as sk
from m2skd import storage
from m2skd.dataset import RawScanDataset, collate
from m2skd.dataset_spec import load_spec
from m2skd.errors import DataError, StaleInputError
from m2skd.inference import evaluate
from m2skd.instances import InstanceAccumulator, instance_key
from m2skd.manifest import read_manifest
from m2skd.metrics import summarize
from m2skd.ragged import RaggedReader
from m2skd.teacher_cache import stored_logits
from m2skd.transfer import TransferAccumulator
from m2skd.plots import confusion_plot, instance_plot, iou_bars
from m2skd.atomic import read_json, write_json_atomic
from m2skd.checkpoint import load_checkpoint
from m2skd.distributed import resolve_device
from m2skd.fingerprint import file_fingerprint
from m2skd.rundir import RunDir, model_label, spec_for_run

from .cache_teacher import teacher_outputs

METRICS_FILE = "metrics.json"  # in an evaluation's output directory: every checkpoint's metrics


def resolve_data(checkpoint: Path, data_root=None) -> str:
    if data_root:
        return str(data_root)
    record = RunDir.of_model(checkpoint).prepare_record
    if record.is_file():
        return read_json(record)["data_root"]
    raise StaleInputError(f"{checkpoint}: cannot tell which dataset it belongs to; pass --data")


def evenly_spaced(n: int, max_scans: int | None) -> np.ndarray:
    """Indices of the scans an evaluation limited to `max_scans` of `n` looks at (every k-th)."""
    index = np.arange(n)
    if max_scans and max_scans < n:
        index = index[:: max(1, n // max_scans)][:max_scans]
    return index


def run_eval(checkpoints, split="val", data_root=None, sequences=None, out_dir=None, save_labels=None, backend="auto",
             device=None, workers=2, batch_size=1, max_scans=None, progress=None, teacher=None) -> dict:
    """Metrics of each checkpoint; with `teacher` (a teacher model.pt in its run directory) also
    each one's transfer diagnostic to it on the same scans (`transfer_diagnostic`)."""
    checkpoints = [storage.path(c) for c in checkpoints]
    device = resolve_device(device)
    data_root = resolve_data(checkpoints[0], data_root)
    out_dir = storage.path(out_dir or RunDir.of_model(checkpoints[0]).eval)
    results = {}
    for ckpt_path in checkpoints:
        spec = spec_for_checkpoint(ckpt_path)
        model, ckpt = load_checkpoint(ckpt_path, backend, device, spec=spec)
        seqs = list(sequences) if sequences else [s for s in sk.list_sequences(data_root) if spec.split_of(s) == split]
        dataset = RawScanDataset(data_root, seqs, spec, ckpt["config"]["voxel_size"])
        dataset.items = [dataset.items[i] for i in evenly_spaced(len(dataset.items), max_scans)]
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
        label = model_label(ckpt_path)
        if progress:
            progress(total=len(dataset), postfix={"checkpoint": label})
        writer = _label_writer(dataset, spec, storage.path(save_labels) / label) if save_labels else None
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
        if teacher is not None and labelled:
            scans = [(seq.name, int(frame)) for seq, frame in dataset.items]
            summary["transfer"] = transfer_diagnostic(ckpt_path, teacher, split, scans=scans, backend=backend, device=device)
        results[label] = summary
    out_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(results)
    storage.write_csv(table, out_dir / "metrics.csv")
    write_json_atomic(out_dir / METRICS_FILE, results)
    iou_bars(results, out_dir / "per_class_iou.png")
    instances = instance_table(results)
    if len(instances):
        storage.write_csv(instances, out_dir / "instances.csv")
        instance_plot(results, out_dir / "instances.png")
    transfer = transfer_table(results)
    if len(transfer):
        storage.write_csv(transfer, out_dir / "transfer.csv")
    for label, summary in results.items():
        confusion_plot(np.array(summary["confusion"]), summary["class_names"], out_dir / f"confusion_{label}.png", f"{label}: confusion (row-normalised)")
    return {"results": results, "table": table, "instances": instances, "transfer": transfer, "out_dir": str(out_dir)}


def spec_for_checkpoint(ckpt_path: Path):
    """The dataset description (and hard classes) of the run the checkpoint was trained in."""
    run = RunDir.of_model(ckpt_path)
    return spec_for_run(run) if run.prepare_record.is_file() else load_spec()


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


def teacher_targets(teacher, split: str, backend="auto", device=None):
    """(run, spec, rows, read(row) -> teacher logits at the row's single-scan points, source).

    `teacher` is a model.pt or a run directory (its teacher/model.pt). The teacher's own run
    directory (RUN/teacher/model.pt -> RUN) holds the prepared `split`
    with the fused input the teacher saw. Its cache is read where it holds `split` and was made
    by this very teacher from these shards (source "cache"); otherwise the teacher is run on the
    fused input (source "teacher")."""
    teacher = storage.path(teacher)
    if teacher.is_dir():
        teacher = RunDir(teacher).model("teacher")
    run = RunDir.of_model(teacher)
    if not run.manifest.is_file():
        raise StaleInputError(f"{teacher}: no prepared data in its run directory {run.root}; prepare it first")
    spec = spec_for_run(run)
    manifest, meta = read_manifest(run.manifest)
    rows = manifest[(manifest["split"] == split) & manifest["has_labels"]].sort_values(["sequence", "frame"])
    if rows.empty:
        raise StaleInputError(f"{run.manifest}: no labelled {split} scans; prepare the {split} split")
    record = read_json(run.cache_record) if run.cache_record.is_file() else {}
    if (split in record.get("splits", ()) and record.get("manifest_fingerprint") == meta["content_fingerprint"]
            and record.get("teacher_fingerprint") == file_fingerprint(teacher)):
        def read(row):
            return stored_logits(RaggedReader(run.teacher_cache / row["shard"]), int(row["shard_index"]), spec.num_classes)
        return run, spec, rows, read, "cache"
    device = resolve_device(device)
    model, ckpt = load_checkpoint(teacher, backend, device, spec=spec)
    model.eval()

    def run_teacher(row):
        points = RaggedReader(run.prepare / row["shard"]).read(int(row["shard_index"]), names=["points"])["points"]
        return teacher_outputs(model, points, ckpt["config"]["voxel_size"], None, device)[0][: int(row["n_single"])]
    return run, spec, rows, run_teacher, "teacher"


def transfer_diagnostic(checkpoint, teacher, split: str = "val", scans=None, max_scans=None, backend="auto",
                        device=None) -> dict:
    """KL(teacher || student) x T^2 and argmax agreement of `checkpoint` to `teacher` at the
    single-scan points of the prepared `split` in the teacher's run directory (all points,
    hard-class points, per instance bucket; m2skd.transfer). T is the checkpoint's distillation
    temperature. `scans` [(sequence, frame number)] picks the scans (eval's), else `max_scans`
    evenly spaced ones."""
    run, spec, rows, read_teacher, source = teacher_targets(teacher, split, backend, device)
    if scans is not None:
        wanted = pd.MultiIndex.from_tuples([(str(q), int(f)) for q, f in scans])
        rows = rows[pd.MultiIndex.from_arrays([rows["sequence"].astype(str), rows["frame"].astype(int)]).isin(wanted)]
        if len(rows) < len(wanted):
            raise StaleInputError(f"{run.manifest}: {len(wanted) - len(rows)} of the {split} scans evaluated are not "
                                  f"prepared in the teacher's run directory; prepare them")
    else:
        rows = rows.iloc[evenly_spaced(len(rows), max_scans)]
    device = resolve_device(device)
    model, ckpt = load_checkpoint(checkpoint, backend, device, spec=spec)
    model.eval()
    voxel = ckpt["config"]["voxel_size"]
    acc = TransferAccumulator(ckpt["config"]["temperature"])
    for _, row in rows.iterrows():
        n = int(row["n_single"])
        if n == 0:
            continue
        data = RaggedReader(run.prepare / row["shard"]).read(int(row["shard_index"]), names=["points", "label"],
                                                             rows=slice(0, n))
        student = teacher_outputs(model, data["points"], voxel, None, device)[0]
        target = read_teacher(row)
        if target.shape != student.shape:
            raise DataError(run.teacher_cache / row["shard"], f"teacher logits {target.shape} for "
                            f"{row['sequence']}/{row['frame']} but the scan has {student.shape}; re-run cache-teacher")
        raw = data["label"]
        train = spec.learning_lut[raw & 0xFFFF].astype(np.int64)
        acc.add(student, target, spec.hard_mask[train], instance_key(train, raw >> 16, spec.hard_mask))
    return {**acc.summary(), "teacher": str(teacher), "source": source, "scans": int(len(rows))}


def transfer_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per checkpoint with a transfer diagnostic: KL and agreement, all, hard, per bucket."""
    rows = []
    for label, s in results.items():
        t = s.get("transfer")
        if not t:
            continue
        row = {"checkpoint": label, "teacher": t["teacher"], "kl_all": t["all"]["kl"], "kl_hard": t["hard"]["kl"],
               "agreement_all": t["all"]["agreement"], "agreement_hard": t["hard"]["agreement"]}
        for b in t["by_points"]:
            row[f"kl {b['bucket']}"] = b["kl"]
            row[f"agreement {b['bucket']}"] = b["agreement"]
        rows.append(row)
    return pd.DataFrame(rows)
