"""Trainer, teacher cache and student input pipeline on tiny synthetic data (torch backend)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from m2skd.checkpoint import load_checkpoint
from m2skd.dataset import ScanDataset, collate
from m2skd.errors import StaleInputError
from m2skd.losses import kd_weight_for
from m2skd.manifest import read_manifest
from m2skd.metrics import confusion_matrix, summarize
from m2skd.ragged import RaggedReader
from m2skd.rundir import RunDir, spec_for_run
from m2skd.teacher_cache import decode_features, stored_logits
from m2skd.train_config import TrainConfig
from m2skd.trainer import train
from m2skd.transforms import AugmentConfig
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache, teacher_outputs

TINY = TrainConfig(depth=18, widths=(8, 16, 16, 16, 16, 16, 12, 12), stem_width=8, backend="torch", voxel_size=0.4,
                   steps=4, batch_size=2, lr=0.01, workers=0, checkpoint_every=2, val_every=1000, val_max_scans=2, log_every=1)


@pytest.fixture(scope="module")
def teacher_run(prepared_run):
    run, _ = prepared_run
    result = train(run, "teacher", TINY, name="teacher", overwrite=True)
    cache = run_cache(run, result["checkpoint"], CacheConfig(backend="torch", logit_encoding="fp16", feature_encoding="fp16"))
    return run, result, cache


def test_cached_targets_equal_a_fresh_teacher_forward(teacher_run):
    run, result, cache = teacher_run
    assert cache["kl_stored_vs_exact"] < 1e-4
    model, ckpt = load_checkpoint(result["checkpoint"], backend="torch")
    model.eval()
    df, _ = read_manifest(RunDir(run).manifest)
    row = df[df["split"] == "train"].iloc[5]
    shard = RaggedReader(RunDir(run).prepare / row["shard"])
    cached = RaggedReader(RunDir(run).teacher_cache / row["shard"])
    points = shard.read(int(row["shard_index"]))["points"]
    logits, feats = teacher_outputs(model, points, ckpt["config"]["voxel_size"], "dec4_preact", "cpu")
    n = int(row["n_single"])
    stored = stored_logits(cached, int(row["shard_index"]), 20)
    assert stored.shape == (n, 20)
    relative = logits[:n] - logits[:n].max(axis=1, keepdims=True)  # what fp16 stores: the softmax is the same
    np.testing.assert_allclose(stored, relative, rtol=2e-3, atol=2e-3)
    hard = cached.read(int(row["shard_index"]), rowset="hard")
    assert len(hard["point_index"]) > 0
    np.testing.assert_allclose(decode_features(hard), feats[hard["point_index"]], rtol=2e-3, atol=2e-3)


def test_cache_reports_the_accuracy_of_its_targets(teacher_run):
    """cache.json's target_quality is the teacher's argmax on every cached single-scan point."""
    run, result, cache = teacher_run
    model, ckpt = load_checkpoint(result["checkpoint"], backend="torch")
    model.eval()
    spec = spec_for_run(RunDir(run))
    df, _ = read_manifest(RunDir(run).manifest)
    conf = np.zeros((20, 20), np.int64)
    for _, row in df[df["split"] == "train"].iterrows():
        data = RaggedReader(RunDir(run).prepare / row["shard"]).read(int(row["shard_index"]))
        logits, _ = teacher_outputs(model, data["points"], ckpt["config"]["voxel_size"], "dec4", "cpu")
        n = int(row["n_single"])
        conf += confusion_matrix(logits[:n, 1:].argmax(1) + 1, spec.learning_lut[data["label"][:n] & 0xFFFF], 20)
    expected = summarize(conf, spec.class_names, spec.hard_classes)
    record = json.loads((RunDir(run).teacher_cache / "cache.json").read_text())
    assert record["target_quality"]["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert record["target_quality"]["hard_miou"] == pytest.approx(expected["hard_miou"], abs=1e-6)
    assert cache["target_miou"] == record["target_quality"]["miou"]


def test_cache_reports_its_targets_per_split(teacher_run, tmp_path):
    """With train and val cached, target_quality_by_split holds each split's own figures (the
    teacher's argmax against the labels of that split's single-scan points), and target_quality
    the whole."""
    import shutil

    run, result, _ = teacher_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model, ckpt = load_checkpoint(result["checkpoint"], backend="torch")
    model.eval()
    spec = spec_for_run(RunDir(copy))
    df, _ = read_manifest(RunDir(copy).manifest)
    conf = {}
    for _, row in df[df["has_labels"]].iterrows():
        data = RaggedReader(RunDir(copy).prepare / row["shard"]).read(int(row["shard_index"]))
        logits, _ = teacher_outputs(model, data["points"], ckpt["config"]["voxel_size"], "dec4", "cpu")
        n = int(row["n_single"])
        c = confusion_matrix(logits[:n, 1:].argmax(1) + 1, spec.learning_lut[data["label"][:n] & 0xFFFF], 20)
        conf[row["split"]] = conf.get(row["split"], 0) + c
    assert set(conf) == {"train", "val"}
    threads = torch.get_num_threads()
    cache = run_cache(copy, result["checkpoint"], CacheConfig(backend="torch", splits=("train", "val"), logit_encoding="fp16",
                                                             feature_encoding="fp16", threads_per_job=threads + 1))
    # the shards ran in this process (jobs=1) at their own thread count, which was restored after:
    # a later training here computes with the threads it had (other threads, other bits)
    assert cache["shards_written"] > 0 and torch.get_num_threads() == threads
    record = json.loads((RunDir(copy).teacher_cache / "cache.json").read_text())
    for split, c in conf.items():
        expected = summarize(c, spec.class_names, spec.hard_classes)
        got = record["target_quality_by_split"][split]
        assert got["miou"] == pytest.approx(expected["miou"], abs=1e-6)
        assert got["hard_miou"] == pytest.approx(expected["hard_miou"], abs=1e-6)
        assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        hard = {c["name"]: c["iou"] for c in expected["per_class"] if c["hard"]}
        assert set(got["hard_class_iou"]) == {spec.class_names[c] for c in spec.hard_classes}
        for name, iou in hard.items():
            assert got["hard_class_iou"][name] == (pytest.approx(iou, abs=1e-6) if iou is not None else None)
        assert cache[f"target_hard_miou_{split}"] == got["hard_miou"]
    whole = summarize(conf["train"] + conf["val"], spec.class_names, spec.hard_classes)
    assert record["target_quality"]["miou"] == pytest.approx(whole["miou"], abs=1e-6)


def test_augmentation_keeps_targets_on_their_points(teacher_run):
    run, _, _ = teacher_run
    spec = spec_for_run(RunDir(run))
    plain = ScanDataset(run, spec, ("train",), "single", 0.4, None, seed=1, with_cache=True)
    aug = ScanDataset(run, spec, ("train",), "single", 0.4, AugmentConfig(jitter_std=0.0), seed=1, with_cache=True)
    a, b = plain[3], aug[(3, 0)]
    for key in ("label", "instance", "teacher_logits", "teacher_feats", "teacher_feat_index"):
        assert np.array_equal(a[key], b[key])
    # each point moved by one similarity transform: fit it and check the per-point residual
    xa, xb = a["feats"][:, :3].astype(np.float64), b["feats"][:, :3].astype(np.float64)
    M, *_ = np.linalg.lstsq(xa, xb, rcond=None)
    assert not np.allclose(xa, xb)
    assert np.abs(xa @ M - xb).max() < 1e-3
    batch = collate([a, b])
    assert batch["teacher_logits"].shape[0] == batch["coords"].shape[0]
    assert (batch["teacher_feat_index"][len(a["teacher_feat_index"]):] >= len(a["label"])).all()


def test_resume_equals_uninterrupted_run(teacher_run):
    run, _, _ = teacher_run
    cfg = dataclasses.replace(TINY, steps=4, checkpoint_every=2)
    full = train(run, "student", cfg, name="full", overwrite=True)
    part = train(run, "student", cfg, name="part", overwrite=True, stop_after=2)
    assert part["steps_done"] == 2 and part["checkpoint"] is None
    with pytest.raises(StaleInputError, match="--resume"):
        train(run, "student", cfg, name="part")
    resumed = train(run, "student", cfg, name="part", resume=True)
    assert resumed["steps_done"] == 4
    a = torch.load(full["checkpoint"], weights_only=False)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_short_training_lowers_the_loss(teacher_run):
    run, _, _ = teacher_run
    losses = []
    cfg = dataclasses.replace(TINY, steps=30, checkpoint_every=1000, rotate=False, flip=False, lr=0.02)
    train(run, "student", cfg, name="short", overwrite=True, callback=lambda step, total, logs: losses.append(logs))
    assert len(losses) == 30 and all(np.isfinite(l["loss"]) for l in losses)
    # the logged loss is the configured weighting of the logged terms, so each term reaches the gradient
    kd_weight = kd_weight_for(cfg.kd_form, cfg.kd_weight)
    for l in losses:
        expected = (l["ce"] + cfg.lovasz_weight * l["lovasz"] + kd_weight * l["kd"] + cfg.feat_weight * l["feat"]
                    + cfg.affinity_weight * l["affinity"])
        assert l["loss"] == pytest.approx(expected, rel=1e-5), l
    # the distillation terms work on these batches: the teacher differs from the student, and
    # batches hold hard-class instances whose affinities the student does not match yet
    assert kd_weight > 0 and cfg.affinity_weight > 0
    assert all(l["kd"] > 0 for l in losses)
    assert sum(l["affinity"] > 1e-4 for l in losses) >= len(losses) // 2, [round(l["affinity"], 5) for l in losses]
    first, last = np.mean([l["loss"] for l in losses[:5]]), np.mean([l["loss"] for l in losses[-5:]])
    assert last < 0.8 * first, (first, last)


def test_val_every_zero_skips_validation(teacher_run):
    run, _, _ = teacher_run
    result = train(run, "teacher", dataclasses.replace(TINY, steps=2, val_every=0), name="noval", overwrite=True)
    assert result["steps_done"] == 2 and result["history"] == []
    with_val = train(run, "teacher", dataclasses.replace(TINY, steps=2), name="val", overwrite=True)
    assert [h["step"] for h in with_val["history"]] == [2]


def test_validation_during_training_leaves_the_trained_weights_unchanged(teacher_run):
    """Runs that validate at other intervals (the demo every 300 steps, the study never) train
    the same model: validation must neither draw from the training's random streams nor move
    batch-norm statistics."""
    run, _, _ = teacher_run
    models = {}
    for val_every in (0, 1):
        cfg = dataclasses.replace(TINY, steps=3, val_every=val_every)
        result = train(run, "student", cfg.no_distill(), name=f"val{val_every}", overwrite=True)
        assert len(result["history"]) == (3 if val_every else 0)
        models[val_every] = torch.load(result["checkpoint"], weights_only=False)["model"]
    assert models[0].keys() == models[1].keys()
    assert any(k.endswith("running_mean") for k in models[0])
    assert [k for k in models[0] if not torch.equal(models[0][k], models[1][k])] == []


def test_cache_refuses_mismatched_teacher(teacher_run, tmp_path):
    run, result, _ = teacher_run
    ckpt = torch.load(result["checkpoint"], weights_only=False)
    ckpt["record"]["manifest_fingerprint"] = "0123456789abcdef"
    bad = tmp_path / "stale.pt"
    torch.save(ckpt, bad)
    with pytest.raises(StaleInputError, match="trained on other prepared shards"):
        run_cache(run, bad, CacheConfig(backend="torch"))


def test_torchrun_ddp_on_cpu(teacher_run, tmp_path):
    """Two gloo ranks through torchrun: DDP wraps the model and the run finishes with a checkpoint."""
    import json
    import subprocess
    import sys

    import yaml

    run, _, _ = teacher_run
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(TINY).items()}
    cfg.update(steps=2, batch_size=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "m2skd",
           "train-student", str(run), "--config", str(tmp_path / "tiny.yaml"), "--name", "ddp", "--overwrite", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "ddp" / "train.json").read_text())
    assert record["world_size"] == 2 and record["steps_done"] == 2 and record["checkpoint"]


def test_config_file_and_overrides(tmp_path):
    from m2skd.train_config import ConfigError, load_config, parse_overrides

    cfg = load_config("demo", parse_overrides(["steps=7", "amp=none", "val_max_scans=none", "widths=8,8,8,8,8,8,8,8", "flip=false"]))
    assert cfg.steps == 7 and cfg.amp == "none" and cfg.val_max_scans is None and cfg.widths == (8,) * 8 and cfg.flip is False
    assert cfg.depth == 18  # from configs/demo.yaml
    with pytest.raises(ConfigError, match="unknown training config keys"):
        load_config("demo", {"stepz": 1})
    for key, value in (("steps", 0), ("batch_size", -1), ("checkpoint_every", 0), ("voxel_size", 0), ("voxel_size", -0.1)):
        with pytest.raises(ConfigError, match=f"{key} must be > 0"):
            load_config("demo", {key: value})


def test_bf16_mixed_precision_student_step(teacher_run):
    run, _, _ = teacher_run
    losses = []
    cfg = dataclasses.replace(TINY, steps=2, amp="bf16", checkpoint_every=1000)
    result = train(run, "student", cfg, name="bf16", overwrite=True, callback=lambda s, t, logs: losses.append(logs))
    assert result["checkpoint"] and all(np.isfinite(l["loss"]) and l["kd"] > 0 for l in losses)
    with pytest.raises(ValueError, match="no fp16/bf16 kernels"):
        train(run, "student", dataclasses.replace(cfg, backend="minkowski"), name="bf16me", overwrite=True)


def test_fused_points_as_unlabelled_context(prepared_run):
    """fused_point_labels=false: the teacher's input keeps every fused point, its loss sees
    only the single-scan points (labels of fused points become the ignore id)."""
    run, _ = prepared_run
    spec = spec_for_run(RunDir(run))
    labelled = ScanDataset(run, spec, ("train",), "fused", 0.4, None)
    context = ScanDataset(run, spec, ("train",), "fused", 0.4, None, label_fused=False)
    i = int(np.argmax(labelled.rows["n_fused"].to_numpy()))
    a, b = labelled[i], context[i]
    n = a["n_single"]
    assert len(a["label"]) > n and np.array_equal(a["feats"], b["feats"])
    assert np.array_equal(a["label"][:n], b["label"][:n])
    assert (a["label"][n:] > 0).all() and (b["label"][n:] == 0).all()
    run_config = dataclasses.replace(TINY, fused_point_labels=False, steps=1)
    assert train(run, "teacher", run_config, name="teacher-context", overwrite=True)["steps_done"] == 1


def _lrs(make, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total,pct", [(20, 0.05), (25, 0.04), (50, 0.02), (1, 0.05), (2, 0.05), (7, 0.3)])
def test_one_cycle_is_defined_for_every_step_count(total, pct):
    """torch's OneCycleLR raises ZeroDivisionError when the warm-up is exactly one step
    (pct_start x steps == 1: `train-teacher --steps 20` at the demo's 0.05)."""
    from m2skd.trainer import one_cycle

    lrs = _lrs(lambda opt: one_cycle(opt, 0.01, total, pct), total)
    assert len(lrs) == total and all(np.isfinite(lrs))
    if pct * total >= 1:
        assert lrs[0] == pytest.approx(0.01 / 25)  # OneCycleLR's default initial lr
    if round(pct * total) == 1 and total > 1:
        assert lrs[1] > 0.99 * 0.01  # warmed up in one step: annealing from the peak
        assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    if pct * total != 1:  # every other count: torch's schedule, unchanged
        ref = _lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=total, pct_start=pct), total)
        assert lrs == ref


def test_transfer_diagnostic_by_hand_from_cache_and_from_the_teacher(teacher_run, tmp_path):
    """KL(teacher || student) x T^2 at the single-scan points: the teacher's targets read from its
    cache (split cached) or computed on the fused input (split not cached) give the hand value."""
    from m2skd.pipeline.evaluate import transfer_diagnostic

    run, result, _ = teacher_run
    student = train(run, "student", dataclasses.replace(TINY, steps=2, val_every=0), name="diag", overwrite=True)
    spec = spec_for_run(RunDir(run))
    s_model, s_ckpt = load_checkpoint(student["checkpoint"], backend="torch")
    t_model, t_ckpt = load_checkpoint(result["checkpoint"], backend="torch")
    s_model.eval(), t_model.eval()
    df, _ = read_manifest(RunDir(run).manifest)
    temp = s_ckpt["config"]["temperature"]
    for split in ("train", "val"):
        rows = df[df["split"] == split].sort_values(["sequence", "frame"]).iloc[[0, 2]]
        kl, agree, hard_kl = [], [], []
        for _, row in rows.iterrows():
            data = RaggedReader(RunDir(run).prepare / row["shard"]).read(int(row["shard_index"]))
            n = int(row["n_single"])
            zs, _ = teacher_outputs(s_model, data["points"][:n], 0.4, "dec4", "cpu")
            zt, _ = teacher_outputs(t_model, data["points"], 0.4, "dec4", "cpu")  # the fused input
            zt = zt[:n]
            lt = torch.log_softmax(torch.tensor(zt, dtype=torch.float64) / temp, 1)
            ls = torch.log_softmax(torch.tensor(zs, dtype=torch.float64) / temp, 1)
            per_point = (lt.exp() * (lt - ls)).sum(1).numpy() * temp ** 2
            kl.append(per_point)
            hard_kl.append(per_point[spec.hard_mask[spec.learning_lut[data["label"][:n] & 0xFFFF]]])
            agree.append(zs[:, 1:].argmax(1) == zt[:, 1:].argmax(1))
        scans = [(r["sequence"], int(r["frame"])) for _, r in rows.iterrows()]
        got = transfer_diagnostic(student["checkpoint"], result["checkpoint"], split, scans=scans, backend="torch")
        assert got["source"] == ("cache" if split == "train" else "teacher") and got["scans"] == 2
        tol = 2e-3 if split == "train" else 1e-6  # the cache holds fp16 logits
        assert got["all"]["kl"] == pytest.approx(np.concatenate(kl).mean(), rel=tol)
        assert got["all"]["agreement"] == pytest.approx(np.concatenate(agree).mean(), abs=0.01 if split == "train" else 1e-9)
        assert got["hard"]["points"] == len(np.concatenate(hard_kl)) > 0
        assert got["hard"]["kl"] == pytest.approx(np.concatenate(hard_kl).mean(), rel=tol)
    # m2skd eval --teacher: the same diagnostic on the scans it evaluates (the evenly spaced subset)
    from m2skd.pipeline.evaluate import run_eval

    report = run_eval([student["checkpoint"]], "val", out_dir=tmp_path / "eval", backend="torch", workers=0, max_scans=3,
                      teacher=result["checkpoint"])
    got = report["results"]["diag"]["transfer"]
    assert got == transfer_diagnostic(student["checkpoint"], result["checkpoint"], "val", max_scans=3, backend="torch")
    assert got["scans"] == 3 and (tmp_path / "eval" / "transfer.csv").is_file()
    assert report["transfer"].loc[0, "kl_hard"] == got["hard"]["kl"]


def test_plain_cuda_device_gets_an_index(monkeypatch):
    """`--device cuda` outside torchrun: torch.cuda.set_device needs an index, so 'cuda' must
    resolve to the current GPU (an H200 run of gpu_check failed on the bare 'cuda')."""
    from m2skd.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:3", local_rank=1) == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
