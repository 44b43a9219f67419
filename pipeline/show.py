"""`m2skd show`: pictures from a run directory's real outputs (prepare shards, teacher cache,
checkpoints), written as PNGs into RUN/show/:

  bev.png     one val scan from above: ground truth beside each checkpoint's predictions;
  fusion.png  one hard-class instance before and after fusion, coloured by source scan;
  cache.png   one train scan: the teacher-cache targets (argmax of cached logits) beside the
              students' predictions.

Scans and the instance are chosen from the manifest (most hard-class instances; the instance
whose fusion adds most relative to its single-scan points) unless given.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from m2skd import storage
from m2skd.atomic import write_json_atomic
from m2skd.instances import instance_key
from m2skd.errors import M2SKDError, StaleInputError
from m2skd.manifest import read_manifest
from m2skd.ragged import RaggedReader
from m2skd.render import bev_figure, class_colours, fusion_figure
from m2skd.checkpoint import load_checkpoint
from m2skd.rundir import RunDir, model_label, spec_for_run
from m2skd.teacher_cache import stored_logits
from m2skd.transforms import voxel_coords

VIEWS = ("bev", "fusion", "cache")
DEFAULT_CHECKPOINTS = ("baseline", "distilled", "teacher")


def default_checkpoints(run: RunDir) -> list[Path]:
    """baseline, distilled, teacher where present; otherwise every RUN/*/model.pt."""
    named = [run.model(n) for n in DEFAULT_CHECKPOINTS]
    found = [p for p in named if p.is_file()]
    return found or run.models()


def resolve_checkpoint(run: RunDir, name_or_path) -> Path:
    path = storage.path(name_or_path)
    if path.is_file():
        return path
    path = run.model(str(name_or_path))
    if not path.is_file():
        raise StaleInputError(f"{path}: no such checkpoint in {run.root}")
    return path


def _pick_row(manifest, split_order, row_id=None, score=None):
    """The manifest row `SEQ/FRAME` if given, else the best-scoring labelled row of the first
    split in `split_order` that has one."""
    if row_id:
        seq, _, frame = str(row_id).partition("/")
        match = manifest[(manifest["sequence"] == seq) & (manifest["frame_name"] == frame)]
        if match.empty:
            raise StaleInputError(f"scan {row_id}: not in the prepared run (use SEQUENCE/FRAME, e.g. 08/000010)")
        return match.iloc[0]
    score = score or (lambda r: (r["n_hard_instances"], sum(r["hard_instance_points_single"])))
    for split in split_order:
        rows = manifest[(manifest["split"] == split) & manifest["has_labels"]]
        if len(rows):
            best = max(range(len(rows)), key=lambda j: score(rows.iloc[j]))
            return rows.iloc[best]
    raise StaleInputError(f"no labelled scans in splits {list(split_order)} of the prepared run")


def _predict(model, voxel_size: float, points: np.ndarray, device) -> np.ndarray:
    coords = np.concatenate([np.zeros((len(points), 1), np.int32), voxel_coords(points[:, :3], voxel_size)], axis=1)
    with torch.no_grad():
        out = model(torch.from_numpy(coords).to(device), torch.from_numpy(points[:, :4].astype(np.float32)).to(device))
    return out.logits.float().argmax(1).cpu().numpy()


def _scan_name(row) -> str:
    return f"{row['sequence']}/{row['frame_name']}"


def run_show(run_dir, out_dir=None, checkpoints=None, views=VIEWS, scan=None, cache_scan=None, backend="auto",
             device="cpu") -> dict:
    """Write the requested views; returns {view: {"path", "scan", ...}} (also RUN/show/show.json)."""
    run = RunDir(run_dir)
    bad = set(views) - set(VIEWS)
    if bad:
        raise M2SKDError(f"--views: unknown views {', '.join(sorted(bad))}; choose from {', '.join(VIEWS)}")
    out = storage.path(out_dir) if out_dir else run.show
    spec = spec_for_run(run)
    manifest, _ = read_manifest(run.manifest)
    colours = class_colours(spec)
    ckpts = [resolve_checkpoint(run, c) for c in checkpoints] if checkpoints else default_checkpoints(run)
    models = {}

    def model(path: Path):
        if path not in models:
            m, ckpt = load_checkpoint(path, backend, device)
            m.eval()
            models[path] = (m, ckpt["config"]["voxel_size"])
        return models[path]

    def read_scan(row, names=("points", "label", "source")):
        reader = RaggedReader(run.prepare / row["shard"])
        return reader.read(int(row["shard_index"]), names=list(names))

    written = {}
    if "bev" in views:
        row = _pick_row(manifest, ("val", "train"), scan)
        data = read_scan(row, ("points", "label"))
        n = int(row["n_single"])
        points, raw = data["points"][:n], data["label"][:n]
        gt = spec.learning_lut[raw & 0xFFFF].astype(np.int64)
        preds = {model_label(p): _predict(*model(p), points, device) for p in ckpts}
        path = bev_figure(points, gt, preds, colours, spec.hard_mask, spec.class_names, out / "bev.png",
                          title=f"scan {_scan_name(row)} ({row['split']}), bird's-eye view")
        written["bev"] = {"path": path, "scan": _scan_name(row), "checkpoints": list(preds)}

    if "fusion" in views:
        def fusion_gain(r):
            single = np.asarray(r["hard_instance_points_single"], dtype=np.float64)
            fused = np.asarray(r["hard_instance_points_fused"], dtype=np.float64)
            return float(((fused - single) / (single + 10.0)).max()) if len(single) else -1.0

        row = _pick_row(manifest, ("train", "val"), scan, score=fusion_gain)
        data = read_scan(row)
        train = spec.learning_lut[data["label"] & 0xFFFF].astype(np.int64)
        keys = instance_key(train, data["label"] >> 16, spec.hard_mask)
        n = int(row["n_single"])
        single_keys, single_counts = np.unique(keys[:n][keys[:n] > 0], return_counts=True)
        if len(single_keys) == 0:
            raise StaleInputError(f"scan {_scan_name(row)}: no hard-class instance to show")
        fused_keys = keys[n:][keys[n:] > 0]
        pos = np.searchsorted(single_keys, fused_keys).clip(0, len(single_keys) - 1)
        fused_counts = np.bincount(pos[single_keys[pos] == fused_keys], minlength=len(single_keys))
        best = int(np.argmax(fused_counts / (single_counts + 10.0)))
        key = single_keys[best]
        k = int(read_config_k(run))
        sel_single = np.flatnonzero(keys[:n] == key)
        sel_fused = n + np.flatnonzero(keys[n:] == key)
        cls = int(key >> 16)
        path = fusion_figure(data["points"][sel_single, :3], data["points"][sel_fused, :3], data["source"][sel_fused], k,
                             out / "fusion.png",
                             title=f"{spec.class_names[cls]} instance {int(key & 0xFFFF)} in scan {_scan_name(row)}: "
                                   f"{len(sel_single)} points alone, {len(sel_single) + len(sel_fused)} fused")
        written["fusion"] = {"path": path, "scan": _scan_name(row), "class": spec.class_names[cls],
                             "instance": int(key & 0xFFFF), "single_points": int(len(sel_single)),
                             "fused_points": int(len(sel_fused))}

    if "cache" in views:
        rows = manifest[[(run.teacher_cache / s).is_dir() for s in manifest["shard"]]]
        if rows.empty:
            raise StaleInputError(f"{run.teacher_cache}: no teacher cache to show; run `m2skd cache-teacher` first")
        row = _pick_row(rows, ("train", "val", "test"), cache_scan)
        data = read_scan(row, ("points", "label"))
        n = int(row["n_single"])
        points, raw = data["points"][:n], data["label"][:n]
        gt = spec.learning_lut[raw & 0xFFFF].astype(np.int64)
        cache = RaggedReader(run.teacher_cache / row["shard"])
        panels = {"teacher cache (argmax)": stored_logits(cache, int(row["shard_index"]), spec.num_classes).argmax(1)}
        students = [p for p in ckpts if model_label(p) != "teacher"] or ckpts
        panels.update({model_label(p): _predict(*model(p), points, device) for p in students})
        path = bev_figure(points, gt, panels, colours, spec.hard_mask, spec.class_names, out / "cache.png",
                          title=f"scan {_scan_name(row)} ({row['split']}): teacher-cache targets vs students")
        written["cache"] = {"path": path, "scan": _scan_name(row), "checkpoints": list(panels)}
    write_json_atomic(out / "show.json", written)
    return written


def read_config_k(run: RunDir) -> int:
    """k of the prepare run (fused points carry source 1..k)."""
    from m2skd.atomic import read_json

    record = read_json(run.prepare_record)
    fusion = record["config"].get("fusion", {})
    return int(fusion.get("k", 4)) if fusion.get("mode", "hard") != "none" else 0
