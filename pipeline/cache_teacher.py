"""`m2skd cache-teacher`: run the teacher once over the fused shards and store its targets at the
single-scan points: logits for every point, decoder features for hard-class instance points.

Targets are in each scan's own frame and row order, so the student may augment freely. One
cache group per prepare shard, same relative path, written whole then renamed: resumable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2skd import storage
from m2skd.atomic import write_json_atomic
from m2skd.checkpoint import check_num_classes, load_checkpoint, read_checkpoint
from m2skd.distributed import resolve_device
from m2skd.errors import DataError, StaleInputError
from m2skd.fingerprint import file_fingerprint, fingerprint_json
from m2skd.inference import predict
from m2skd.manifest import read_manifest
from m2skd.metrics import confusion_matrix, summarize
from m2skd.models import FEATURE_NAMES
from m2skd.ragged import RaggedReader, RaggedWriter, dir_bytes, group_is_current
from m2skd.rundir import RunDir, spec_for_run
from m2skd.teacher_cache import (CACHE_FORMAT, CODES_CLEVEL, DEFAULT_FEATURE_ENCODING, DEFAULT_LOGIT_ENCODING, decode_features,
                                 decode_logits, encode_features, encode_logits, kl_per_point)
from m2skd.transforms import voxel_coords

from .parallel import run_tasks, torch_threads


CACHE_COMPRESSION = {"logit_codes": {"clevel": CODES_CLEVEL, "shuffle": "noshuffle"}}


@dataclass(frozen=True)
class CacheConfig:
    logit_encoding: str = DEFAULT_LOGIT_ENCODING
    feature_encoding: str = DEFAULT_FEATURE_ENCODING
    feature_layer: str = "dec4_preact"  # the student's default (TrainConfig.feature_layer)
    splits: tuple[str, ...] = ("train",)
    backend: str = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    threads_per_job: int = 1

    def __post_init__(self):
        if self.feature_layer not in FEATURE_NAMES:
            raise ValueError(f"feature layer {self.feature_layer!r} not in {FEATURE_NAMES}")
        if self.threads_per_job < 1:
            raise ValueError(f"threads_per_job must be >= 1, got {self.threads_per_job}")


def teacher_outputs(model, points: np.ndarray, voxel_size: float, layer: str | None, device) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-point (logits, features) of one scan, fp32, in input order; features None without `layer`."""
    if len(points) == 0:  # an empty scan: no points, no targets (backends fail on zero sites)
        channels = model.feature_channels[layer] if layer else 0
        return np.zeros((0, model.num_classes), np.float32), np.zeros((0, channels), np.float32) if layer else None
    coords = np.concatenate([np.zeros((len(points), 1), np.int32), voxel_coords(points[:, :3], voxel_size)], axis=1)
    feats = points.astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(coords).to(device), torch.from_numpy(feats).to(device), features=(layer,) if layer else ())
    return out.logits.float().cpu().numpy(), out.features[layer].float().cpu().numpy() if layer else None


def cache_shard(shard_rel: str, run: RunDir, teacher_path: str, cfg: CacheConfig, attrs: dict) -> dict:
    with torch_threads(cfg.threads_per_job):
        return _cache_shard(shard_rel, run, teacher_path, cfg, attrs)


def _cache_shard(shard_rel: str, run: RunDir, teacher_path: str, cfg: CacheConfig, attrs: dict) -> dict:
    spec = spec_for_run(run)
    device = resolve_device(cfg.device)
    model, ckpt = load_checkpoint(teacher_path, cfg.backend, device, spec=spec)
    model.eval()
    voxel = ckpt["config"]["voxel_size"]
    temperature = attrs["temperature"]
    reader = RaggedReader(run.prepare / shard_rel)
    kl_sum, kl_max, feat_err, n_points = 0.0, 0.0, [], 0
    conf = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    # scan by scan: a scan's targets are compressed and written while the teacher runs on the next
    with RaggedWriter(run.teacher_cache / shard_rel, CACHE_COMPRESSION) as writer:
        for i in range(len(reader)):
            data = reader.read(i, names=["points", "label"])
            n = int(reader.attrs["rows"][i]["n_single"])
            logits, feats = teacher_outputs(model, data["points"], voxel, cfg.feature_layer, device)
            logits, feats, raw = logits[:n], feats[:n], data["label"][:n]
            hard = spec.hard_instance_points(raw)
            conf += confusion_matrix(predict(logits), spec.learning_lut[raw & 0xFFFF], spec.num_classes)
            try:
                enc = encode_logits(logits, cfg.logit_encoding, temperature)
                fenc = encode_features(feats[hard], cfg.feature_encoding)
            except ValueError as exc:
                scan = reader.attrs["rows"][i]
                raise DataError(teacher_path, f"scan {scan['sequence']}/{scan['frame_name']}: {exc} (a diverged teacher?)") from None
            fenc["point_index"] = np.flatnonzero(hard).astype(np.int32)
            writer.append(enc, {"hard": fenc})
            if n:
                kl = kl_per_point(logits, decode_logits(enc, spec.num_classes, cfg.logit_encoding, temperature), temperature)
                kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
            if hard.any():
                exact = feats[hard]
                feat_err.append(float(((decode_features(fenc) - exact) ** 2).sum() / max((exact ** 2).sum(), 1e-12)))
            n_points += n
        stats = {"feature_channels": int(feats.shape[1]), "kl_sum": kl_sum, "kl_max": kl_max, "points": n_points,
                 "feature_rel_mse": float(np.mean(feat_err)) if feat_err else 0.0, "target_confusion": conf.tolist()}
        nbytes = writer.finish({**attrs, **stats})
    return {"shard": shard_rel, "scans": len(reader), "points": n_points, "bytes": nbytes, **stats}


def ensure_cache_shard(shard_rel: str, run: RunDir, teacher_path: str, cfg: CacheConfig, attrs: dict, overwrite: bool,
                       verify: bool = False) -> dict:
    """Reuse the cache shard if current (same inputs and settings; intact, ragged.group_is_current), else (re)write it."""
    if not overwrite and group_is_current(run.teacher_cache / shard_rel, attrs, verify):
        return {"shard": shard_rel, "scans": len(RaggedReader(run.prepare / shard_rel).attrs["rows"]), "written": False}
    return {**cache_shard(shard_rel, run, teacher_path, cfg, attrs), "written": True}


def teacher_reference(run: RunDir, teacher_path: Path) -> str:
    """The teacher's path relative to the run directory when inside it, so a moved or copied
    run directory still names its own teacher."""
    try:
        return teacher_path.relative_to(run.root.resolve()).as_posix()
    except (ValueError, TypeError):  # elsewhere, or on another file system
        return str(teacher_path)


def check_teacher(run: RunDir, teacher_path: Path, meta: dict) -> dict:
    """The teacher checkpoint, refused unless trained (as a teacher) on this run's shards."""
    if not teacher_path.is_file():
        raise StaleInputError(f"{teacher_path}: no teacher checkpoint; run `m2skd train-teacher {run.root}` first")
    ckpt = read_checkpoint(teacher_path)
    check_num_classes(teacher_path, ckpt, spec_for_run(run))
    record = ckpt.get("record", {})
    if record.get("role") != "teacher":
        raise StaleInputError(f"{teacher_path}: not a teacher checkpoint (role {record.get('role')})")
    if record.get("manifest_fingerprint") != meta["content_fingerprint"]:
        raise StaleInputError(
            f"{teacher_path}: trained on other prepared shards (manifest {record.get('manifest_fingerprint')} "
            f"!= {meta['content_fingerprint']} in {run.manifest}); re-run `m2skd train-teacher {run.root} --overwrite`"
        )
    return ckpt


def run_cache(run_dir, teacher_path=None, cfg: CacheConfig = CacheConfig(), jobs: int = 1, overwrite=False, progress=None,
              dask_scheduler=None, verify=False) -> dict:
    """Cache every shard not already current, then write cache.json over all of them.
    `verify`: hash every chunk of the existing cache shards (else only where a size or stamp differs)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    run = RunDir(run_dir)
    teacher_path = storage.path(teacher_path or run.model("teacher")).resolve()
    manifest, meta = read_manifest(run.manifest)
    ckpt = check_teacher(run, teacher_path, meta)
    prepare_fp = meta["config_fingerprint"]
    teacher_fp = file_fingerprint(teacher_path)
    # the cache's inputs and settings: whatever changes one of them makes a different cache
    attrs = {"teacher_fingerprint": teacher_fp, "manifest_fingerprint": meta["content_fingerprint"], "cache_format": CACHE_FORMAT,
             "logit_encoding": cfg.logit_encoding, "feature_encoding": cfg.feature_encoding, "feature_layer": cfg.feature_layer,
             "temperature": float(ckpt["config"]["temperature"])}
    rows = manifest[manifest["split"].isin(list(cfg.splits)) & manifest["has_labels"]]
    if rows.empty:
        raise StaleInputError(f"{run.manifest}: no labelled scans in splits {list(cfg.splits)}")
    shards = sorted(rows["shard"].unique())
    for shard in shards:
        got = RaggedReader(run.prepare / shard).attrs.get("config_fingerprint")
        if got != prepare_fp:
            raise StaleInputError(f"{run.prepare / shard}: made with prepare config {got}, manifest says {prepare_fp}; re-run prepare")
    storage.sweep(run.teacher_cache)
    if progress:
        progress(total=int(rows.shape[0]))
    results = run_tasks(lambda s: ensure_cache_shard(s, run, str(teacher_path), cfg, attrs, overwrite, verify), shards, jobs,
                        on_done=(lambda s, r: progress(advance=r["scans"])) if progress else None, dask_scheduler=dask_scheduler)
    # summary over every shard, including those done by an earlier run
    nbytes = points = 0
    kl_sum, kl_max, feat_err = 0.0, 0.0, []
    by_split, every_shard = {}, True  # the teacher's confusion on its single-scan points, per split
    split_of = dict(zip(rows["shard"], rows["split"]))
    for shard in shards:  # attributes and file sizes only: no chunk is read
        reader = RaggedReader(run.teacher_cache / shard)
        nbytes += dir_bytes(run.teacher_cache / shard)
        points += int(reader.attrs["points"])
        kl_sum += reader.attrs["kl_sum"]
        kl_max = max(kl_max, reader.attrs["kl_max"])
        feat_err.append(reader.attrs["feature_rel_mse"])
        shard_conf = reader.attrs.get("target_confusion")  # absent in caches from before it was recorded
        if shard_conf is None:
            every_shard = False
        else:
            by_split[split_of[shard]] = by_split.get(split_of[shard], 0) + np.asarray(shard_conf, np.int64)
    by_split = by_split if every_shard else {}
    record = {**attrs, "teacher": teacher_reference(run, teacher_path), "feature_channels": reader.attrs["feature_channels"],
              "splits": list(cfg.splits), "shards": shards, "points": points, "bytes": nbytes,
              "bytes_per_point": nbytes / max(points, 1), "kl_stored_vs_exact": kl_sum / max(points, 1), "kl_max": kl_max,
              "feature_relative_mse": float(np.mean(feat_err))}
    record["cache_fingerprint"] = fingerprint_json({**attrs, "splits": list(cfg.splits), "shards": shards})
    # How good the targets are: the teacher's argmax on the single-scan points it labels, over all
    # of them and per split. A teacher that has learnt its train scans by heart gives train targets
    # near the labels, which carry little a student's own labels do not (its val figures say how
    # much it knows beyond them).
    spec = spec_for_run(run)
    quality = summarize(sum(by_split.values()), spec.class_names, spec.hard_classes) if by_split else {}
    record["target_quality"] = {k: quality.get(k) for k in ("miou", "hard_miou", "accuracy")}
    # per hard class too: a teacher that loses one class (a domain it never saw) shows it here
    record["target_quality_by_split"] = {
        split: {**{k: q.get(k) for k in ("miou", "hard_miou", "accuracy")},
                "hard_class_iou": {c["name"]: c["iou"] for c in q["per_class"] if c["hard"]}}
        for split, q in ((s, summarize(c, spec.class_names, spec.hard_classes)) for s, c in sorted(by_split.items()))}
    write_json_atomic(run.cache_record, record)
    return {"shards": len(shards), "shards_written": sum(r["written"] for r in results), "cache_fingerprint": record["cache_fingerprint"], "points": points, "bytes_per_point": record["bytes_per_point"],
            "logit_encoding": cfg.logit_encoding, "feature_encoding": cfg.feature_encoding,
            "kl_stored_vs_exact": record["kl_stored_vs_exact"], "kl_max": kl_max, "feature_relative_mse": record["feature_relative_mse"],
            "target_miou": record["target_quality"]["miou"], "target_hard_miou": record["target_quality"]["hard_miou"],
            **{f"target_hard_miou_{split}": q["hard_miou"] for split, q in record["target_quality_by_split"].items()}}
