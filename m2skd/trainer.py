"""One trainer for the teacher (fused input, fused labels) and the student (single scans,
optionally distilled from the teacher cache). Step-based, exactly resumable, DDP-aware.
"""
from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np

import torch
from torch.utils.data import DataLoader

from . import storage
from .atomic import read_json, write_json_atomic
from .checkpoint import model_from_config, read_checkpoint, restore_training, write_checkpoint
from .dataset import ResumableBatchSampler, ScanDataset, collate, to_device
from .distributed import DistributedContext, world_size
from .errors import DataError, StaleInputError
from .fingerprint import file_fingerprint, fingerprint_json
from .inference import autocast, evaluate
from .losses import FeatureAdapter, distillation_loss, segmentation_loss
from .manifest import read_manifest
from .metrics import summarize
from .models import resolve_backend
from .rundir import RunDir, spec_for_run
from .teacher_cache import CACHE_FORMAT
from .train_config import ConfigError, TrainConfig
from .transforms import AugmentConfig

ROLES = ("teacher", "student")


class StudentNet(torch.nn.Module):
    """The student and its feature adapter as one module, so DistributedDataParallel keeps both
    in sync across ranks and a checkpoint holds both."""

    def __init__(self, model, adapter):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, coords, feats, features=()):
        return self.model(coords, feats, features=features)


def training_record(role: str, name: str, cfg: TrainConfig, manifest_fingerprint: str, cache_record: dict | None,
                    world: int) -> dict:
    """What a checkpoint was trained from. Its `fingerprint` chains prepare's (the manifest),
    the training mathematics and, for a distilled student, the teacher cache's. A run without a
    cache (teacher, baseline) is fingerprinted with its distillation settings cleared
    (`no_distill`): they change nothing it computes, so tuning them never makes it stale."""
    maths = (cfg if cache_record is not None else cfg.no_distill()).math_dict()
    record = {
        "role": role, "name": name, "config": cfg.to_dict(), "config_fingerprint": fingerprint_json(maths),
        "manifest_fingerprint": manifest_fingerprint, "distill": cache_record is not None,
        "cache_fingerprint": cache_record.get("cache_fingerprint") if cache_record else None,
        "teacher_fingerprint": cache_record.get("teacher_fingerprint") if cache_record else None,
        "world_size": world,
    }
    record["fingerprint"] = fingerprint_json({k: record[k] for k in ("role", "config_fingerprint", "manifest_fingerprint",
                                                                      "cache_fingerprint")})
    return record


def current_model(run_dir, name: str, role: str, cfg: TrainConfig) -> str | None:
    """RUN/name/model.pt if it is what training `role` with `cfg` on the run's current shards
    (and, for a distilled student, its current cache) would give; None if absent or stale."""
    run = RunDir(run_dir)
    path = run.model(name)
    if not path.is_file() or not run.manifest.is_file():
        return None
    try:
        ckpt = read_checkpoint(path)
    except DataError:
        return None
    cache_record = None
    if role == "student" and cfg.distill_enabled():
        cache_record = read_json(run.cache_record) if run.cache_record.is_file() else {}
    expected = training_record(role, name, cfg, read_manifest(run.manifest)[1]["content_fingerprint"], cache_record, world_size())
    same_length = ckpt["config"].get("steps") == cfg.steps and ckpt["config"].get("epochs") == cfg.epochs
    return str(path) if same_length and ckpt.get("record", {}).get("fingerprint") == expected["fingerprint"] else None


def check_cache_current(run: RunDir, cfg: TrainConfig, manifest_fingerprint: str) -> dict:
    """The teacher cache's record, refused if made from other shards, by another teacher than
    the one now in its place, or for another feature layer than the student distils."""
    record_path = run.cache_record
    if not record_path.is_file():
        raise StaleInputError(f"{record_path}: no teacher cache; run `m2skd cache-teacher {run.root}` first")
    record = read_json(record_path)
    rerun = f"re-run `m2skd cache-teacher {run.root} --overwrite`"
    if record.get("cache_format") != CACHE_FORMAT:
        raise StaleInputError(f"{record_path}: stored in cache format {record.get('cache_format')}, this version reads "
                              f"{CACHE_FORMAT}; {rerun}")
    if record.get("manifest_fingerprint") != manifest_fingerprint:
        raise StaleInputError(f"{record_path}: made from other prepared shards (manifest {record.get('manifest_fingerprint')} "
                              f"!= {manifest_fingerprint}); {rerun}")
    teacher = record.get("teacher", "")  # relative to the run directory, or absolute (a path or URL)
    teacher = storage.path(teacher) if storage.is_url(teacher) else run.root / teacher
    if not teacher.is_file():
        raise StaleInputError(f"{record_path}: its teacher {teacher} is gone; {rerun}")
    now = file_fingerprint(teacher)
    if now != record.get("teacher_fingerprint"):
        raise StaleInputError(f"{record_path}: made by another teacher than {teacher} holds now (teacher "
                              f"{record.get('teacher_fingerprint')} != {now}); {rerun}")
    if cfg.uses_teacher_features() and record.get("feature_layer") != cfg.feature_layer:
        raise StaleInputError(f"{record_path}: holds {record.get('feature_layer')} features but the student distils "
                              f"feature_layer={cfg.feature_layer}; {rerun} --feature-layer {cfg.feature_layer}")
    return record


def training_backend(cfg: TrainConfig, device: torch.device) -> str:
    backend = resolve_backend(cfg.backend, device)
    if cfg.amp != "none" and backend != "torch":
        raise ConfigError("MinkowskiEngine has no fp16/bf16 kernels: use --backend torch for mixed precision")
    return backend


def training_set(run: RunDir, spec, cfg: TrainConfig, role: str, distill: bool) -> ScanDataset:
    """The teacher learns from the fused input, the student from single scans (with the
    teacher's cached targets when distilled)."""
    augment = AugmentConfig(cfg.rotate, cfg.flip, tuple(cfg.scale), cfg.jitter_std)
    input_kind = "fused" if role == "teacher" else "single"
    return ScanDataset(run.root, spec, cfg.train_splits, input_kind, cfg.voxel_size, augment, cfg.seed, with_cache=distill,
                       label_fused=cfg.fused_point_labels, skip_empty=True)


def validation_loader(run: RunDir, spec, cfg: TrainConfig, ctx: DistributedContext) -> DataLoader | None:
    """Single scans for both roles, so a teacher's mIoU compares with a student's; each rank
    validates its own share and the confusion matrices are summed. None without validation or
    without labelled validation scans."""
    if cfg.val_every <= 0:
        return None
    try:
        val_set = ScanDataset(run.root, spec, cfg.val_splits, "single", cfg.voxel_size, None, cfg.seed,
                              max_scans=cfg.val_max_scans, skip_empty=True)
    except StaleInputError:
        return None
    if not val_set.rows["has_labels"].all():
        return None
    shard = list(range(ctx.rank, len(val_set), ctx.world))
    return DataLoader(torch.utils.data.Subset(val_set, shard), batch_size=cfg.batch_size, collate_fn=collate,
                      num_workers=min(cfg.workers, 2))


def train_loader(train_set: ScanDataset, cfg: TrainConfig, total_steps: int, start_step: int,
                 ctx: DistributedContext) -> DataLoader:
    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, total_steps, cfg.seed, start_step, ctx.rank, ctx.world)
    return DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                      persistent_workers=False, pin_memory=ctx.device.type == "cuda")


def scheduled_steps(cfg: TrainConfig, train_scans: int, world: int) -> int:
    """steps, or with `epochs` set: enough global batches to see every train scan that often."""
    if cfg.epochs is None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * train_scans / (cfg.batch_size * world)))


def feature_adapter(cfg: TrainConfig, model, cache_record: dict | None, device) -> FeatureAdapter | None:
    """Only when the feature term uses it: DistributedDataParallel needs every parameter to get a gradient."""
    if cache_record is None or not cfg.feat_weight > 0:
        return None
    return FeatureAdapter(model.feature_channels[cfg.feature_layer], cache_record["feature_channels"]).to(device)


def one_cycle(optimizer, max_lr: float, total_steps: int, pct_start: float):
    """torch's OneCycleLR, defined for every step count.

    OneCycleLR's warm-up of W = pct_start x steps peaks at step W - 1 and divides by W - 1, so
    W == 1 (e.g. 0.05 x 20 steps) raises ZeroDivisionError at construction. There the peak is
    moved 1e-9 of a step past step 0: step 0 keeps the initial lr and the annealing starts at
    once from the peak. Every other step count keeps torch's schedule unchanged (same bits).
    """
    if float(pct_start * total_steps) - 1 == 0:
        pct_start = (1 + 1e-9) / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)


def class_weight_tensor(cfg: TrainConfig, train_set, num_classes: int, device):
    if cfg.class_weights is None:
        return None
    if isinstance(cfg.class_weights, str):  # inverse_sqrt_frequency, from prepare's class histograms
        counts = np.sum(np.stack([np.asarray(v, np.float64) for v in train_set.rows["class_points_single"]]), axis=0)
        freq = counts / max(counts[1:].sum(), 1.0)
        weights = 1.0 / np.sqrt(np.maximum(freq, 1e-6))
        weights[0] = 0.0
        weights[1:] /= weights[1:][counts[1:] > 0].mean() if (counts[1:] > 0).any() else 1.0
    else:
        weights = np.asarray(cfg.class_weights, np.float64)
        if weights.shape != (num_classes,):
            raise ConfigError(f"class_weights has {weights.size} values; the dataset has {num_classes} classes")
    return torch.tensor(weights, dtype=torch.float32).to(device)


def parameter_groups(module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Decay on conv/linear weights only (norm scales and biases are 1-d): common practice."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    plain = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def clear_earlier_run(run: RunDir, name: str, overwrite: bool, main: bool) -> None:
    """Refuse to train over an earlier run's checkpoints, or with `overwrite` remove them."""
    earlier = (run.last_checkpoint(name), run.model(name))
    if not overwrite and any(path.exists() for path in earlier):
        raise StaleInputError(f"{run.model_dir(name)}: already has checkpoints; pass --resume to continue or --overwrite "
                              "to start again")
    if overwrite and main:
        for path in earlier:
            path.unlink(missing_ok=True)


def resume_from(last, record: dict, total_steps: int, allow_world_size_change: bool, model, adapter, optimizer, scheduler,
                scaler) -> tuple[int, list]:
    """(step, history) of the interrupted run in `last`, its state loaded; a longer run stretches
    the schedule to the new length."""
    ckpt = read_checkpoint(last)
    check_resumable(last, ckpt.get("record", {}), record, allow_world_size_change)
    step, history = restore_training(ckpt, model, adapter, optimizer, scheduler, scaler)
    scheduler.total_steps = total_steps
    if step > total_steps:
        raise StaleInputError(f"{last}: already at step {step}, beyond the {total_steps} steps asked for")
    return step, history


def tensorboard_writer(run: RunDir, name: str, start_step: int):
    """A SummaryWriter; for a run directory on an object store it writes to a local temporary
    folder whose files `sync_events` copies there (event files are appended to, objects cannot be)."""
    from torch.utils.tensorboard import SummaryWriter  # slow to import: only the main rank needs it

    target = run.tensorboard(name)
    if not isinstance(target, storage.ObjectPath):
        return SummaryWriter(str(target), purge_step=start_step)
    local = storage.staging_root() / f"tensorboard-{name}.tmp-{storage._HOST}-{os.getpid()}"
    writer = SummaryWriter(str(local), purge_step=start_step)
    writer.m2skd_target = (local, target)
    return writer


def sync_events(writer, close: bool = False) -> None:
    """Copy a remote run's event files to it (no-op for a local run directory)."""
    if writer is None:
        return
    local_target = getattr(writer, "m2skd_target", None)
    if close:
        writer.close()
    elif local_target is not None:
        writer.flush()
    if local_target is not None:
        storage.put_tree(*local_target)
        if close:
            shutil.rmtree(local_target[0], ignore_errors=True)


def validate(model, loader: DataLoader, spec, cfg: TrainConfig, ctx: DistributedContext) -> dict:
    """Metrics over every rank's share of the validation scans, under rank 0's norm statistics."""
    ctx.broadcast_buffers(model)
    conf = evaluate(model, loader, spec.num_classes, ctx.device, cfg.amp)
    matrix = ctx.sum(torch.as_tensor(conf.matrix, dtype=torch.int64, device=ctx.device)).cpu().numpy()
    return summarize(matrix, spec.class_names, spec.hard_classes)


def train(run_dir, role: str, cfg: TrainConfig, name: str | None = None, resume: bool = False, overwrite: bool = False,
          device: str | None = None, callback=None, stop_after: int | None = None, allow_world_size_change: bool = False,
          on_finish=None) -> dict:
    """Train `role` into RUN_DIR/<name>; returns the final record (checkpoint path, validation metrics).

    callback(step, total, logs) is called after every step on the main rank (progress bars).
    stop_after: leave after this many steps as if interrupted (tests of --resume).
    on_finish(student_module): called on every rank at the end (tests of DistributedDataParallel).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    cfg.validate()
    run, name = RunDir(run_dir), name or role
    ctx = DistributedContext(device)
    backend = training_backend(cfg, ctx.device)
    spec = spec_for_run(run)
    distill = role == "student" and cfg.distill_enabled()
    train_set = training_set(run, spec, cfg, role, distill)
    cache_record = check_cache_current(run, cfg, train_set.manifest_fingerprint) if distill else None
    val_loader = validation_loader(run, spec, cfg, ctx)
    total_steps = scheduled_steps(cfg, len(train_set), ctx.world)

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, spec.num_classes, backend).to(ctx.device)
    adapter = feature_adapter(cfg, model, cache_record, ctx.device)
    student = StudentNet(model, adapter)
    optimizer = torch.optim.AdamW(parameter_groups(student, cfg.weight_decay, cfg.no_decay_norm_bias), lr=cfg.lr)
    scheduler = one_cycle(optimizer, cfg.lr, total_steps, cfg.pct_start)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    class_weights = class_weight_tensor(cfg, train_set, spec.num_classes, ctx.device)

    record = {**training_record(role, name, cfg, train_set.manifest_fingerprint, cache_record, ctx.world), "backend": backend}
    last = run.last_checkpoint(name)
    if ctx.main:
        storage.sweep(run.model_dir(name))
    start_step, history = 0, []
    if resume and last.exists():
        start_step, history = resume_from(last, record, total_steps, allow_world_size_change, model, adapter, optimizer,
                                          scheduler, scaler)
    else:
        clear_earlier_run(run, name, overwrite, ctx.main)
    if ctx.main:
        write_json_atomic(run.train_record(name), record)
    net = ctx.wrap(student)
    loader = train_loader(train_set, cfg, total_steps, start_step, ctx)
    writer = tensorboard_writer(run, name, start_step) if ctx.main else None
    features = (cfg.feature_layer,) if distill and cfg.uses_teacher_features() else ()
    hard_lut = torch.as_tensor(spec.hard_mask, dtype=torch.bool, device=ctx.device)

    net.train()
    t_start = time.perf_counter()
    step = start_step
    for batch in loader:
        batch = to_device(batch, ctx.device)
        logs = training_step(net, batch, cfg, optimizer, scheduler, scaler, student.parameters(), ctx.device,
                             distill, adapter, seed=cfg.seed * 1_000_003 + step,
                             features=features, class_weights=class_weights, hard_lut=hard_lut)
        step += 1
        if writer and (step % cfg.log_every == 0 or step == total_steps):
            for key, value in logs.items():
                writer.add_scalar(f"train/{key}", value, step)
        if val_loader is not None and (step % cfg.val_every == 0 or step == total_steps):
            summary = validate(model, val_loader, spec, cfg, ctx)
            net.train()
            history.append({"step": step, "miou": summary["miou"], "hard_miou": summary["hard_miou"]})
            if writer:
                writer.add_scalar("val/miou", summary["miou"], step)
                writer.add_scalar("val/hard_miou", summary["hard_miou"], step)
            logs["val_miou"] = summary["miou"]
        if ctx.main and (step % cfg.checkpoint_every == 0 or step == total_steps):
            write_checkpoint(last, model, cfg.to_dict(), spec.num_classes, record, history, step, adapter,
                             optimizer, scheduler, scaler)
            sync_events(writer)
        if callback and ctx.main:
            callback(step, total_steps, logs)
        if stop_after is not None and step - start_step >= stop_after:
            break
    sync_events(writer, close=True)

    result = {**record, "device": str(ctx.device), "steps_done": step, "total_steps": total_steps,
              "seconds": time.perf_counter() - t_start, "history": history, "checkpoint": None}
    if step == total_steps and ctx.main:
        final = run.model(name)
        write_checkpoint(final, model, cfg.to_dict(), spec.num_classes, record, history, step, adapter)
        result.update(checkpoint=str(final), checkpoint_fingerprint=file_fingerprint(final))
        write_json_atomic(run.train_record(name), result)
    if on_finish is not None:
        on_finish(student)
    ctx.barrier()
    return result


def check_resumable(path, old: dict, new: dict, allow_world_size_change: bool) -> None:
    """Refuse a resume that would change what training computes (one line naming what differs)."""
    for key, what in (("config_fingerprint", "training settings that change the mathematics"),
                      ("manifest_fingerprint", "prepared data"), ("cache_fingerprint", "teacher cache")):
        if old.get(key) != new[key]:
            raise StaleInputError(f"{path}: cannot resume, the {what} differ ({key} {old.get(key)} != {new[key]}); "
                                  "start again with --overwrite")
    if old.get("world_size", 1) != new["world_size"] and not allow_world_size_change:
        raise StaleInputError(f"{path}: trained on {old.get('world_size', 1)} processes, resumed on {new['world_size']}: "
                              "that changes the global batch; pass --allow-world-size-change to accept")


def training_step(net, batch: dict, cfg: TrainConfig, optimizer, scheduler, scaler, params, device, distill: bool = False,
                  adapter=None, seed: int = 0, features=(), class_weights=None, hard_lut=None) -> dict:
    """One optimisation step; with `distill` (a student with a teacher cache in the batch) the
    distillation terms are added. Returns the loss terms as floats for logging."""
    params = list(params)
    with autocast(device, cfg.amp):
        out = net(batch["coords"], batch["feats"], features=features)
    logits = out.logits.float()
    total, seg_parts = segmentation_loss(logits, batch["label"], lovasz_weight=cfg.lovasz_weight, class_weights=class_weights)
    logs = {"ce": seg_parts["ce"], "lovasz": seg_parts["lovasz"]}
    if distill:
        total = total + distill_terms(cfg, out, batch, adapter, logs, seed, hard_lut)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in logs.items()}, "grad_norm": float(grad_norm),
            "lr": optimizer.param_groups[0]["lr"]}


def distill_terms(cfg: TrainConfig, out, batch: dict, adapter, logs: dict, seed: int, hard_lut=None) -> torch.Tensor:
    """KD on every point (hard-class points weighted by kd_hard_weight); feature and affinity
    terms on the hard-class points the cache holds, combined by losses.distillation_loss (the
    single place the weights are applied). Every setting comes from `cfg`.

    hard_lut (C,) bool marks the hard classes; without it, points of a hard-class instance."""
    idx = batch["teacher_feat_index"]
    student_feats = out.features[cfg.feature_layer][idx].float() if cfg.feature_layer in out.features else None
    generator = torch.Generator(device=out.logits.device).manual_seed(seed)
    instance = batch["instance"][idx]
    class_ids = batch["label"][idx] + (instance >> 24) * 64  # per scan, for affinity_form=class
    hard_points = hard_lut[batch["label"]] if hard_lut is not None else batch["instance"] > 0
    total, parts = distillation_loss(out.logits.float(), batch["teacher_logits"], student_feats, batch["teacher_feats"],
                                     config=cfg, instance_ids=instance, class_ids=class_ids, generator=generator,
                                     adapter=adapter, hard_points=hard_points, feat_index=idx)
    logs.update(parts)
    return total
