"""One trainer for the teacher (fused input, fused labels) and the student (single scans,
optionally distilled from the teacher cache). Step-based, exactly resumable, DDP-aware.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .dataset import ResumableBatchSampler, ScanDataset, collate, to_device
from .dataset_spec import load_spec
from .errors import StaleInputError
from .fingerprint import fingerprint_bytes, fingerprint_json
from .inference import autocast, evaluate
from .losses import FeatureAdapter, affinity_distillation, feature_distillation, logit_distillation, segmentation_loss
from .metrics import summarize
from .models import build_model
from .ragged import read_json, write_json_atomic
from .rundir import RunDir
from .train_config import TrainConfig
from .transforms import AugmentConfig

ROLES = ("teacher", "student")


def spec_for_run(run: RunDir):
    record = read_json(run.prepare / "config.json")
    return load_spec(record["config"]["dataset"]).with_hard_classes(record["config"]["hard_classes"])


def model_from_config(cfg: TrainConfig, num_classes: int, backend: str | None = None):
    return build_model(in_channels=4, num_classes=num_classes, depth=cfg.depth, widths=tuple(cfg.widths),
                       stem_width=cfg.stem_width, backend=backend or cfg.backend)


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def file_fingerprint(path) -> str:
    return fingerprint_bytes(Path(path).read_bytes())


def load_checkpoint(path, backend: str = "auto", device="cpu"):
    """(model, checkpoint dict): the model is rebuilt from the recorded config under `backend`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    model = model_from_config(cfg, ckpt["num_classes"], backend)
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


class DistributedContext:
    """Rank/world from torchrun's environment; a no-op in a single process."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device != "cpu"
        self.device = torch.device(device or (f"cuda:{local}" if cuda else "cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        if self.world == 1:
            return model
        if self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return value


def train(run_dir, role: str, cfg: TrainConfig, name: str | None = None, resume: bool = False, overwrite: bool = False,
          device: str | None = None, callback=None, stop_after: int | None = None) -> dict:
    """Train `role` into RUN_DIR/<name>; returns the final record (checkpoint path, validation metrics).

    callback(step, total, logs) is called after every step on the main rank (progress bars).
    stop_after: leave after this many steps as if interrupted (tests of --resume).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if cfg.amp != "none" and cfg.backend == "minkowski":
        raise ValueError("MinkowskiEngine has no fp16/bf16 kernels: use --backend torch for mixed precision")
    run = RunDir(run_dir)
    name = name or role
    out_dir = run.model_dir(name)
    ctx = DistributedContext(device)
    spec = spec_for_run(run)
    distill = role == "student" and cfg.distill_enabled()

    augment = AugmentConfig(cfg.rotate, cfg.flip, tuple(cfg.scale), cfg.jitter_std)
    input_kind = "fused" if role == "teacher" else "single"
    train_set = ScanDataset(run_dir, spec, cfg.train_splits, input_kind, cfg.voxel_size, augment, cfg.seed, with_cache=distill,
                            label_fused=cfg.fused_point_labels)
    val_set = None
    if cfg.val_every > 0:
        try:
            val_set = ScanDataset(run_dir, spec, cfg.val_splits, input_kind, cfg.voxel_size, None, cfg.seed,
                                  max_scans=cfg.val_max_scans, label_fused=cfg.fused_point_labels)
            if not val_set.rows["has_labels"].all():
                val_set = None
        except StaleInputError:
            val_set = None

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, spec.num_classes).to(ctx.device)
    if cfg.amp != "none" and model.backend != "torch":
        raise ValueError(f"mixed precision needs the torch backend; this model runs on {model.backend}")
    adapter = None
    cache_record = None
    if distill:
        cache_record = read_json(run.teacher_cache / "cache.json")
        adapter = FeatureAdapter(model.feature_channels[cfg.feature_layer], cache_record["feature_channels"]).to(ctx.device)
    params = list(model.parameters()) + (list(adapter.parameters()) if adapter else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.pct_start)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")

    record = {
        "role": role, "name": name, "config": cfg.to_dict(), "config_fingerprint": fingerprint_json(cfg.to_dict()),
        "manifest_fingerprint": train_set.manifest_fingerprint, "distill": distill,
        "cache_fingerprint": cache_record.get("cache_fingerprint") if cache_record else None,
    }
    topology = {"world_size": ctx.world, "device": str(ctx.device), "backend": model.backend}
    last = out_dir / "checkpoints" / "last.pt"
    start_step = 0
    history: list[dict] = []
    if last.exists() and resume:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        for key in ("config_fingerprint", "manifest_fingerprint", "cache_fingerprint"):
            if ckpt["record"].get(key) != record[key]:
                raise StaleInputError(f"{last}: cannot resume, {key} differs from this run's ({ckpt['record'].get(key)} != {record[key]})")
        model.load_state_dict(ckpt["model"])
        if adapter is not None:
            adapter.load_state_dict(ckpt["adapter"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_step, history = ckpt["step"], ckpt["history"]
    elif (last.exists() or (out_dir / "model.pt").exists()) and not overwrite:
        raise StaleInputError(f"{out_dir}: already has checkpoints; pass --resume to continue or --overwrite to start again")

    if ctx.main:
        write_json_atomic(out_dir / "train.json", record)
    net = ctx.wrap(model)
    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, cfg.steps, cfg.seed, start_step, ctx.rank, ctx.world)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                        persistent_workers=False, pin_memory=ctx.device.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate, num_workers=min(cfg.workers, 2)) if val_set else None
    writer = None
    if ctx.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)

    def checkpoint(step: int):
        if ctx.main:
            save_atomic({
                "model": model.state_dict(), "adapter": adapter.state_dict() if adapter else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "history": history, "record": record, "config": cfg.to_dict(), "num_classes": spec.num_classes,
            }, last)

    def validate(step: int):
        conf = evaluate(model, val_loader, spec.num_classes, ctx.device, cfg.amp)
        summary = summarize(conf.matrix, spec.class_names, spec.hard_classes)
        history.append({"step": step, "miou": summary["miou"], "hard_miou": summary["hard_miou"]})
        if writer:
            writer.add_scalar("val/miou", summary["miou"], step)
            writer.add_scalar("val/hard_miou", summary["hard_miou"], step)
        net.train()
        return summary

    net.train()
    t_start = time.perf_counter()
    step = start_step
    for batch in loader:
        batch = to_device(batch, ctx.device)
        logs = training_step(net, batch, cfg, optimizer, scheduler, scaler, params, ctx.device,
                             adapter if distill else None, seed=cfg.seed * 1_000_003 + step)
        step += 1
        if writer and (step % cfg.log_every == 0 or step == cfg.steps):
            for key, value in logs.items():
                writer.add_scalar(f"train/{key}", value, step)
        if val_loader is not None and (step % cfg.val_every == 0 or step == cfg.steps) and ctx.main:
            logs["val_miou"] = validate(step)["miou"]
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint(step)
        if callback and ctx.main:
            callback(step, cfg.steps, logs)
        if stop_after is not None and step - start_step >= stop_after:
            break
    if writer:
        writer.close()
    seconds = time.perf_counter() - t_start
    result = {**record, **topology, "steps_done": step, "seconds": seconds, "history": history, "checkpoint": None}
    if step == cfg.steps and ctx.main:
        final = out_dir / "model.pt"
        save_atomic({"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": spec.num_classes,
                     "record": record, "history": history, "step": step}, final)
        result["checkpoint"] = str(final)
        result["checkpoint_fingerprint"] = file_fingerprint(final)
        write_json_atomic(out_dir / "train.json", result)
    if ctx.world > 1:
        dist.barrier()
    return result


def training_step(net, batch: dict, cfg: TrainConfig, optimizer, scheduler, scaler, params, device, adapter=None, seed: int = 0) -> dict:
    """One optimisation step; with `adapter` (a student with a teacher cache) the distillation
    terms are added. Returns the loss terms as floats for logging."""
    with autocast(device, cfg.amp):
        out = net(batch["coords"], batch["feats"])
    logits = out.logits.float()
    total, seg_parts = segmentation_loss(logits, batch["label"], lovasz_weight=cfg.lovasz_weight)
    logs = {"ce": seg_parts["ce"], "lovasz": seg_parts["lovasz"]}
    if adapter is not None:
        total = total + distill_terms(cfg, out, batch, adapter, logs, seed)
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


def distill_terms(cfg: TrainConfig, out, batch: dict, adapter, logs: dict, seed: int) -> torch.Tensor:
    """KD on every point; feature and affinity terms on the hard-class points the cache holds."""
    logits = out.logits.float()
    kd = logit_distillation(logits, batch["teacher_logits"], temperature=cfg.temperature)
    idx = batch["teacher_feat_index"]
    student_feats = out.features[cfg.feature_layer][idx].float()
    teacher_feats = batch["teacher_feats"]
    feat = feature_distillation(adapter(student_feats), teacher_feats, mask=None) if len(idx) else logits.sum() * 0
    generator = torch.Generator(device=student_feats.device).manual_seed(seed)
    instance = batch["instance"][idx]
    class_ids = batch["label"][idx] + (instance >> 24) * 64  # per scan, for affinity_mode=class
    aff = affinity_distillation(student_feats, teacher_feats, instance, cfg.affinity_max_points, generator,
                                mode=cfg.affinity_mode, class_ids=class_ids) if len(idx) else logits.sum() * 0
    logs.update(kd=kd, feat=feat, affinity=aff)
    return cfg.kd_weight * kd + cfg.feat_weight * feat + cfg.affinity_weight * aff
