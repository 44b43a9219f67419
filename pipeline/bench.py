"""`m2skd bench`: every stage against its baseline, measured side by side in one run.

Builds a synthetic dataset of realistic size (64 x 2048 simulated LiDAR, about 120k points
per scan), then times prepare (against bare I/O), the training input pipeline, train steps
(baseline, distilled from the cache, online teacher) per backend, the sparse backbone per
backend (timed in turns), the teacher-cache encodings (bytes per point and KL error), and eval
throughput.
Budgets are checked as ratios from this one run; results go to bench-<machine>.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m2skd import semantickitti as sk
from m2skd import storage
from m2skd.checkpoint import load_checkpoint, write_checkpoint
from m2skd.dataset import ScanDataset, collate, to_device
from m2skd.fusion import FusionConfig
from m2skd.losses import FeatureAdapter
from m2skd.models import build_model, count_parameters, sparse_torch
from m2skd.models.me_compat import minkowski_available
from m2skd import ragged
from m2skd.atomic import write_json_atomic
from m2skd.ragged import write_ragged
from m2skd.rundir import RunDir, spec_for_run
from m2skd.synth import SynthConfig, generate_dataset
from m2skd.teacher_cache import (DEFAULT_FEATURE_ENCODING, DEFAULT_LOGIT_ENCODING, FEATURE_ENCODINGS, LOGIT_ENCODINGS,
                                 decode_features, decode_logits, encode_features, encode_logits, kl_per_point)
from m2skd.train_config import ConfigError, load_config
from m2skd.trainer import train, training_step
from m2skd.transforms import AugmentConfig

from .cache_teacher import CACHE_COMPRESSION, CacheConfig, run_cache, teacher_outputs
from . import prepare as prepare_module
from .evaluate import run_eval
from .prepare import PrepareConfig, run_prepare

BUDGETS = {
    "distilled_vs_baseline_step": ("<=", 1.15),
    "online_vs_baseline_step": (">=", 1.8),
    "prepare_vs_io_rate": (">=", 0.5),
    "prepare_vs_io_rate_1job": (">=", 0.3),
    "cache_bytes_per_point": ("<=", 6.0),
    "cache_kl_nats": ("<=", 1e-3),
    "torch_vs_minkowski_backbone": ("<=", 2.0),
    "torch_vs_minkowski_conv_cpu": ("<=", 0.6),
}


def timed_in_turns(fns: dict, repeats: int, warmup: int = 1, sync=None) -> dict:
    """Median wall seconds of each fn() over `repeats` rounds after `warmup` rounds; a round
    calls every fn once, in turn, so a shared machine's drift hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median wall seconds of fn() over `repeats` calls after `warmup` calls."""
    return timed_in_turns({0: fn}, repeats, warmup, sync)[0]


def machine_name() -> str:
    gpu = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
    return f"{platform.node()}-{os.cpu_count()}cores-{gpu}"


# --- prepare ------------------------------------------------------------------------------

def io_only_rate(data: Path, sequences, out_bytes: int, scratch: Path, repeats: int = 5) -> float:
    """Scans/s for reading every input .bin/.label once and writing `out_bytes` to disk (written
    and fsynced), the median of `repeats`. Each starts after os.sync(): without that, the rate
    measured how fast the page cache took writes while the kernel flushed earlier steps' output
    (39 to 1,900 scans/s on one machine, by what ran before)."""
    files = []
    for name in sequences:
        seq = sk.Sequence(data, name)
        for frame in seq.frames:
            files += [seq.scan_path(frame), seq.label_path(frame)]
    n_scans = len(files) // 2
    block = np.zeros(1 << 24, np.uint8)
    probe = scratch / "io_probe.bin"
    seconds = []
    for _ in range(repeats):
        os.sync()
        t0 = time.perf_counter()
        for f in files:
            f.read_bytes()
        with open(probe, "wb") as fh:
            left = out_bytes
            while left > 0:
                fh.write(block[: min(left, block.size)].data)
                left -= block.size
            os.fsync(fh.fileno())
        seconds.append(time.perf_counter() - t0)
        probe.unlink()
    return n_scans / statistics.median(seconds)


def prepare_on_disk(data: Path, run: Path, cfg, jobs: int, sequences, repeats: int = 5) -> tuple[float, float, dict]:
    """(scans/s, CPU s per scan, summary) of prepare into a new `run`, medians of `repeats`, each
    timed from an os.sync() to its output on disk (os.sync() after), as io_only_rate is. Five, as
    the probe's: on the 2-core VM of docs/results.md some runs (the first of a process nearly
    always) spend 4-7x the CPU in the write() calls of the same bytes (0.7 -> 3-5 ms a scan),
    and a median of 3 was often decided by them."""
    seconds, cpu = [], []
    for _ in range(repeats):
        shutil.rmtree(run, ignore_errors=True)
        os.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        summary = run_prepare(data, run, cfg, jobs=jobs, sequences=sequences)
        os.sync()
        seconds.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / summary["scans"])
    return summary["scans"] / statistics.median(seconds), statistics.median(cpu), summary


#: prepare's phases at 1 job, by the functions that run them (module or class, name); "other" is
#: the rest (manifest rows of each scan, planning, stamps, the writer thread's bookkeeping)
PREPARE_PHASES = {
    "read": [(sk, "read_bytes")],
    "parse": [(sk, "parse_scan"), (sk, "parse_label"), (sk, "training_ids")],
    "fusion": [(prepare_module, "fuse")],
    "compress": [(ragged, "_compress")],
    # rows packed into chunk buffers, chunk files and their CRC-32s, offsets and metadata: the write less compress
    "shard_files": [(ragged.RaggedWriter, "append"), (ragged, "_put_chunk"), (ragged.RaggedWriter, "finish"),
                    (ragged.RaggedWriter, "_pack"), (ragged.RaggedWriter, "_complete")],
    "manifest": [(prepare_module, "manifest_rows"), (prepare_module, "write_manifest")],
}


@contextmanager
def cpu_by_phase(phases: dict[str, list[tuple[object, str]]]):
    """Yields {phase: CPU seconds} spent in each phase's functions while the context is open, each
    call timed by its own thread's CPU clock (the shard writer compresses in a thread of its own);
    time in a phase's function called from another's is the inner one's."""
    spent: dict[str, float] = defaultdict(float)
    local = threading.local()  # per thread: CPU of inner phases, per open call
    saved = []

    def wrap(fn, phase):
        def timed_call(*args, **kwargs):
            stack = local.__dict__.setdefault("stack", [])
            c0 = time.thread_time()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt, inner = time.thread_time() - c0, stack.pop()
                spent[phase] += dt - inner
                if stack:
                    stack[-1] += dt
        return timed_call

    for phase, targets in phases.items():
        for owner, name in targets:
            if hasattr(owner, name):
                saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, wrap(getattr(owner, name), phase))
    try:
        yield spent
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def bench_prepare(data: Path, work: Path, sequences, cores: int) -> dict:
    """Prepare's rate at 1 job and at all cores against the I/O-only rate (medians of repeated
    runs, each to its output on disk), with 8 frames a shard (a dozen shards from 96 scans, so
    jobs have shards to share) and at 1 job with the default shard size; its CPU per scan by phase
    at 1 job (a separate run), and a re-run on the finished output: plain (sizes and stamps) and
    with verify (every chunk hashed)."""
    rates, cpu = {}, {}
    default = PrepareConfig(FusionConfig(k=4))
    rate_default, _, _ = prepare_on_disk(data, work / "prep_default", default, 1, sequences)
    shutil.rmtree(work / "prep_default", ignore_errors=True)
    cfg = PrepareConfig(FusionConfig(k=4), frames_per_shard=8)
    for jobs in sorted({1, cores}):
        run = work / f"prep_j{jobs}"
        rates[jobs], cpu[jobs], summary = prepare_on_disk(data, run, cfg, jobs, sequences)
    rerun = timed(lambda: run_prepare(data, run, cfg, jobs=1, sequences=sequences), 2, warmup=0)
    rerun_verify = timed(lambda: run_prepare(data, run, cfg, jobs=1, sequences=sequences, verify=True), 1, warmup=0)
    io = io_only_rate(data, sequences, summary["shard_bytes"], work)
    profiled = work / "prep_phases"
    shutil.rmtree(profiled, ignore_errors=True)
    with cpu_by_phase(PREPARE_PHASES) as spent:
        c0 = time.process_time()
        run_prepare(data, profiled, cfg, jobs=1, sequences=sequences)
        total = time.process_time() - c0
    shutil.rmtree(profiled, ignore_errors=True)
    phases = {phase: 1000 * spent[phase] / summary["scans"] for phase in PREPARE_PHASES}
    phases["other"] = 1000 * total / summary["scans"] - sum(phases.values())
    return {"scans_per_s_1job": rates[1], "scans_per_s_all": rates[cores], "jobs_all": cores, "io_only_scans_per_s": io,
            "prepare_vs_io_rate": rates[cores] / io, "prepare_vs_io_rate_1job": rates[1] / io,
            "frames_per_shard": cfg.frames_per_shard, "frames_per_shard_default": default.frames_per_shard,
            "scans_per_s_1job_default_shards": rate_default, "prepare_vs_io_rate_1job_default_shards": rate_default / io,
            "cpu_ms_per_scan_1job": 1000 * cpu[1], "cpu_ms_per_scan_by_phase": phases,
            "rerun_finished_s": rerun, "rerun_verify_s": rerun_verify,
            "bytes_per_single_point": summary["bytes_per_single_point"],
            "median_points_per_hard_instance_single": summary["median_points_per_hard_instance_single"],
            "median_points_per_hard_instance_fused": summary["median_points_per_hard_instance_fused"], "run": str(run)}


# --- object store -------------------------------------------------------------------------

@contextlib.contextmanager
def local_s3_server():
    """An S3-protocol server (moto, in its own process so it does not share this one's
    interpreter) on 127.0.0.1 with one bucket; yields the bucket's URL. The endpoint reaches
    s3fs through AWS_ENDPOINT_URL, as a user's would."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):  # up in about a second
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        with storage.s3_endpoint(f"http://127.0.0.1:{port}", "m2skd-bench") as bucket:
            yield bucket
    finally:
        server.terminate()
        server.wait()


def epoch_reads(run, scans: int | None = None) -> float:
    """Seconds to read every train scan once as the teacher's loader does (fused points and
    labels, one contiguous slice per field), without the voxelisation a step adds."""
    spec = spec_for_run(RunDir(run))
    dataset = ScanDataset(run, spec, ("train",), "fused", 0.05)
    t0 = time.perf_counter()
    for i in range(len(dataset) if scans is None else min(scans, len(dataset))):
        reader = dataset._reader(dataset.run.prepare / dataset._shard[i])
        reader.read(int(dataset._index[i]), names=["points", "label"])
    return time.perf_counter() - t0


def bench_object_store(data: Path, work: Path, sequences) -> dict:
    """prepare (1 job) and one epoch's reads with the run directory on a local S3 server (moto)
    against local disk, side by side in this run; None without s3fs and moto[server]."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"needs s3fs and moto[server] ({exc.name} missing)"}
    cfg = PrepareConfig(FusionConfig(k=4), frames_per_shard=8)
    local = work / "prep_store_local"
    shutil.rmtree(local, ignore_errors=True)
    with local_s3_server() as bucket:
        remote = f"{bucket}/run"
        seconds = {}
        for name, run in (("local", local), ("s3", remote)):
            t0 = time.perf_counter()
            summary = run_prepare(data, run, cfg, jobs=1, sequences=sequences)
            seconds[f"prepare_{name}"] = time.perf_counter() - t0
            seconds[f"rerun_{name}"] = timed(lambda: run_prepare(data, run, cfg, jobs=1, sequences=sequences), 1, warmup=0)
        reads = timed_in_turns({"local": lambda: epoch_reads(local), "s3": lambda: epoch_reads(remote)}, repeats=2)
    scans = summary["scans"]
    return {"scans": scans, "prepare_local_s": seconds["prepare_local"], "prepare_s3_s": seconds["prepare_s3"],
            "prepare_s3_vs_local_time": seconds["prepare_s3"] / seconds["prepare_local"],
            "rerun_local_s": seconds["rerun_local"], "rerun_s3_s": seconds["rerun_s3"],
            "epoch_reads_local_s": reads["local"], "epoch_reads_s3_s": reads["s3"],
            "epoch_reads_s3_vs_local_time": reads["s3"] / reads["local"]}


# --- teacher cache encodings --------------------------------------------------------------

#: SemanticKITTI's train set, for the projected cache size: 19,130 scans of ~124k points, 0.5%
#: of them on hard-class instances (docs/method.md, teacher cache)
KITTI_TRAIN_POINTS = 19_130 * 124_000
KITTI_HARD_FRACTION = 0.005


def bench_encodings(run: Path, teacher_ckpt: str, scans: int, temperature: float, split: str = "train") -> list[dict]:
    """Bytes per single-scan point on disk (compressed as the cache stores them) and KL(exact ||
    stored) at T, mean and max over points, for every logit encoding; features per encoding;
    and the default pair's total, also projected to SemanticKITTI's train set."""
    from m2skd.manifest import read_manifest
    from m2skd.ragged import RaggedReader

    spec = spec_for_run(RunDir(run))
    model, ckpt = load_checkpoint(teacher_ckpt, "torch")
    model.eval()
    df, _ = read_manifest(RunDir(run).manifest)
    rows = df[df["split"] == split].head(scans)
    logits, feats = [], []
    for _, row in rows.iterrows():
        data = RaggedReader(RunDir(run).prepare / row["shard"]).read(int(row["shard_index"]))
        lg, ft = teacher_outputs(model, data["points"], ckpt["config"]["voxel_size"], CacheConfig.feature_layer, "cpu")
        n = int(row["n_single"])
        raw = data["label"][:n]
        hard = spec.hard_instance_points(raw)
        logits.append(lg[:n])
        feats.append(ft[:n][hard])
    n_points = sum(len(x) for x in logits)
    n_hard = sum(len(x) for x in feats)
    out, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for enc in LOGIT_ENCODINGS:
            encoded = [encode_logits(x, enc, temperature) for x in logits]
            nbytes = write_ragged(Path(tmp) / enc, {k: [e[k] for e in encoded] for k in encoded[0]}, {}, compression=CACHE_COMPRESSION)
            kl = np.concatenate([kl_per_point(x, decode_logits(e, spec.num_classes, enc, temperature), temperature)
                                 for x, e in zip(logits, encoded)])
            sizes[("logits", enc)] = nbytes / n_points
            out.append({"kind": "logits", "encoding": enc, "bytes_per_point": nbytes / n_points, "kl_nats": float(kl.mean()),
                        "kl_max_nats": float(kl.max())})
        for enc in FEATURE_ENCODINGS:
            encoded = [encode_features(x, enc) for x in feats]
            nbytes = write_ragged(Path(tmp) / f"f_{enc}", {k: [e[k] for e in encoded] for k in encoded[0]}, {})
            exact = np.concatenate(feats)
            got = np.concatenate([decode_features(e) for e in encoded])
            rel = float(((got - exact) ** 2).sum() / max((exact ** 2).sum(), 1e-12))
            sizes[("features", enc)] = nbytes / n_points
            out.append({"kind": "features", "encoding": enc, "bytes_per_point": nbytes / n_points, "relative_mse": rel,
                        "hard_points_fraction": n_hard / n_points, "bytes_per_hard_point": nbytes / max(n_hard, 1)})
    logit_bpp = sizes[("logits", DEFAULT_LOGIT_ENCODING)]
    feat_per_hard = sizes[("features", DEFAULT_FEATURE_ENCODING)] * n_points / max(n_hard, 1)
    kitti_bpp = logit_bpp + feat_per_hard * KITTI_HARD_FRACTION
    default = next(r for r in out if r["kind"] == "logits" and r["encoding"] == DEFAULT_LOGIT_ENCODING)
    out.append({"kind": "default", "encoding": f"{DEFAULT_LOGIT_ENCODING}+{DEFAULT_FEATURE_ENCODING}",
                "bytes_per_point": logit_bpp + sizes[("features", DEFAULT_FEATURE_ENCODING)], "kl_nats": default["kl_nats"],
                "kl_max_nats": default["kl_max_nats"], "hard_points_fraction": n_hard / n_points,
                "kitti_bytes_per_point": kitti_bpp, "kitti_train_gb": kitti_bpp * KITTI_TRAIN_POINTS / 1e9})
    return out


def recalibrate_batchnorm(run: Path, checkpoint: str, scans: int) -> None:
    """Batch-norm running statistics of a few-step teacher, re-estimated (cumulative averages)
    over `scans` fused train scans spread over the drive. After 3 steps they are still mostly
    their initial values, and in eval mode its logits reach 1e5-1e6, which no trained teacher
    gives: the cache rows would measure the encodings on outputs of no use (a softmax of them is
    one-hot). The weights stay as trained; the checkpoint is rewritten in place."""
    spec = spec_for_run(RunDir(run))
    model, ckpt = load_checkpoint(checkpoint, "torch")
    fused = ScanDataset(run, spec, ("train",), "fused", ckpt["config"]["voxel_size"], None)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in np.unique(np.linspace(0, len(fused) - 1, scans).round().astype(int)):
            batch = collate([fused[int(i)]])
            model(batch["coords"], batch["feats"])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    write_checkpoint(checkpoint, model, ckpt["config"], ckpt["num_classes"], ckpt["record"], ckpt["history"], ckpt["step"])


# --- input pipeline and train steps -------------------------------------------------------

def bench_loader(run: Path, samples: int) -> dict:
    spec = spec_for_run(RunDir(run))
    ds = ScanDataset(run, spec, ("train",), "single", 0.05, AugmentConfig(), seed=0, with_cache=True)
    n = min(samples, len(ds))
    ds[0]
    t0 = time.perf_counter()
    for i in range(n):
        collate([ds[(i, 0)]])
    return {"scans_per_s_per_worker": n / (time.perf_counter() - t0), "scans": n}


def bench_train_steps(run: Path, backend: str, depth: int, repeats: int, device: torch.device, amp: str = "none") -> dict:
    """Baseline, distilled-from-cache and online-teacher steps on the same batch of one scan."""
    spec = spec_for_run(RunDir(run))
    cfg = dataclasses.replace(load_config("semantickitti"), depth=depth, backend=backend, amp=amp, batch_size=1)
    single = ScanDataset(run, spec, ("train",), "single", cfg.voxel_size, AugmentConfig(), with_cache=True)
    fused = ScanDataset(run, spec, ("train",), "fused", cfg.voxel_size, AugmentConfig())
    batch = to_device(collate([single[(0, 0)]]), device)
    fused_batch = to_device(collate([fused[(0, 0)]]), device)
    torch.manual_seed(0)
    student = build_model(4, spec.num_classes, depth, cfg.widths, cfg.stem_width, backend).to(device).train()
    teacher = build_model(4, spec.num_classes, depth, cfg.widths, cfg.stem_width, backend).to(device).eval()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def stepper(teacher_width: int | None):
        """A step function with its own adapter/optimiser (the cached and online teachers differ in width)."""
        adapter = FeatureAdapter(student.feature_channels[cfg.feature_layer], teacher_width).to(device) if teacher_width else None
        params = list(student.parameters()) + (list(adapter.parameters()) if adapter else [])
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        distill = adapter is not None
        features = (cfg.feature_layer,) if distill else ()
        return lambda b: training_step(student, b, cfg, optimizer, None, scaler, params, device, distill, adapter,
                                       features=features)

    plain_step = stepper(None)
    cached_step = stepper(batch["teacher_feats"].shape[1])
    online_step = stepper(teacher.feature_channels[cfg.feature_layer])
    n_single = int(batch["n_single"][0])

    def online():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = teacher(fused_batch["coords"], fused_batch["feats"], features=(cfg.feature_layer,))
        targets = dict(batch, teacher_logits=out.logits[:n_single].float(),
                       teacher_feats=out.features[cfg.feature_layer][:n_single][batch["teacher_feat_index"]].float())
        online_step(targets)

    # in turns, as the backbone rows: sequential timing let a shared machine's drift decide the ratios
    medians = timed_in_turns({"baseline": lambda: plain_step(batch), "distilled": lambda: cached_step(batch), "online": online},
                             repeats, sync=sync)
    baseline, distilled, online_s = medians["baseline"], medians["distilled"], medians["online"]
    return {"backend": student.backend, "amp": amp, "depth": depth, "points": int(batch["coords"].shape[0]),
            "fused_points": int(fused_batch["coords"].shape[0]), "params": count_parameters(student),
            "baseline_s": baseline, "distilled_s": distilled, "online_s": online_s,
            "distilled_vs_baseline_step": distilled / baseline, "online_vs_baseline_step": online_s / baseline,
            "train_scans_per_s": 1.0 / distilled}


def bench_backbones(run: Path, variants: list[tuple[str, str]], depth: int, rounds: int, device: torch.device) -> list[dict]:
    """Forward+backward of the network alone on one single scan (no data, no optimiser), for each
    (backend, amp) variant with the same initial weights. The variants are timed in turns, one
    call of each per round, median over rounds: a shared machine's drift hits every variant
    alike, so their ratio is measured, not the moment each ran at."""
    spec = spec_for_run(RunDir(run))
    cfg = load_config("semantickitti")
    ds = ScanDataset(run, spec, ("train",), "single", cfg.voxel_size, None)
    batch = to_device(collate([ds[0]]), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    models, steps = {}, {}
    for backend, amp in variants:
        torch.manual_seed(0)
        model = build_model(4, spec.num_classes, depth, cfg.widths, cfg.stem_width, backend).to(device).train()

        def fwd_bwd(model=model, amp=amp):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(batch["coords"], batch["feats"]).logits
            torch.nn.functional.cross_entropy(logits.float(), batch["label"]).backward()
            model.zero_grad(set_to_none=True)

        models[(backend, amp)], steps[(backend, amp)] = model, fwd_bwd
    medians = timed_in_turns(steps, rounds, sync=sync)
    rows = []
    for (backend, amp), model in models.items():
        seconds = medians[(backend, amp)]
        row = {"backend": model.backend, "amp": amp, "depth": depth, "seconds": seconds, "rounds": rounds,
               "points": int(batch["coords"].shape[0]), "params": count_parameters(model)}
        if model.backend == "torch":
            with torch.no_grad(), sparse_torch.record_convs() as convs:
                model(batch["coords"], batch["feats"])
            forward = sum(2.0 * pairs * c_in * c_out for pairs, c_in, c_out in convs)
            row["conv_gflop_fwd_bwd"] = 3 * forward / 1e9  # backward: grad_x and grad_w, 2x forward
            row["conv_gflop_per_s"] = row["conv_gflop_fwd_bwd"] / seconds
        rows.append(row)
    return rows


# --- sparse convolution: efficiency and dispatches ----------------------------------------

def dense_gemm_gflops(device: torch.device, size: int = 2048, repeats: int = 3) -> float:
    """fp32 GEMM rate of this machine at the current thread count (the conv's ceiling)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return 2 * size**3 / timed(lambda: a @ b, repeats, sync=sync) / 1e9


class _CountOps(TorchDispatchMode):
    """Counts non-view aten operations (what a GPU launches, roughly one kernel each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def conv_dispatches(coords: torch.Tensor, width: int = 32) -> dict:
    """Dispatches of one 3x3x3 stride-1 conv forward / backward (kernel map prebuilt) per grouping."""
    out = {}
    previous = sparse_torch.GROUPING
    try:
        for grouping in ("gpu", "cpu"):
            sparse_torch.GROUPING = grouping
            ctx, _ = sparse_torch.SparseContext.from_coordinates(coords)
            kmap = ctx.kernel_map(1, 1, 3)
            x = torch.randn(kmap.n_in, width, device=coords.device, requires_grad=True)
            w = torch.randn(27, width, width, device=coords.device, requires_grad=True)
            sparse_torch.sparse_conv(x, w, kmap)  # CPU scratch buffers grow once
            with _CountOps() as fwd:
                y = sparse_torch.sparse_conv(x, w, kmap)
            grad = torch.randn_like(y)
            with _CountOps() as bwd:
                torch.autograd.grad(y, (x, w), grad)
            out[grouping] = {"forward": fwd.count, "backward": bwd.count}
    finally:
        sparse_torch.GROUPING = previous
    return out


def bench_sparse_conv(run: Path, backbone_rows: list[dict], device: torch.device) -> dict:
    """Torch backend vs MinkowskiEngine, achieved conv rate vs dense GEMM, dispatches per conv."""
    torch_row = next(r for r in backbone_rows if r["backend"] == "torch" and r["amp"] == "none")
    me_row = next((r for r in backbone_rows if r["backend"] == "minkowski"), None)
    dense = dense_gemm_gflops(device)
    spec = spec_for_run(RunDir(run))
    ds = ScanDataset(run, spec, ("train",), "single", load_config("semantickitti").voxel_size, None)
    coords = to_device(collate([ds[0]]), device)["coords"]
    return {"threads": torch.get_num_threads(), "grouping": sparse_torch.grouping_for(device),
            "torch_s": torch_row["seconds"], "minkowski_s": me_row["seconds"] if me_row else None,
            "torch_vs_minkowski": torch_row["seconds"] / me_row["seconds"] if me_row else None,
            "conv_gflop_fwd_bwd": torch_row["conv_gflop_fwd_bwd"], "conv_gflop_per_s": torch_row["conv_gflop_per_s"],
            "dense_gemm_gflop_per_s": dense, "conv_vs_dense_gemm": torch_row["conv_gflop_per_s"] / dense,
            "dispatches_per_conv": conv_dispatches(coords)}


# --- the whole run ------------------------------------------------------------------------

def run_bench(out_dir, frames: int = 48, depth: int = 34, repeats: int = 2, gpu: bool = False, quick: bool = False,
              announce=None, progress=None) -> dict:
    """announce(name) at the start of each stage; progress(total=, advance=) counts the stages."""
    if gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA device visible to PyTorch")
    out_dir = storage.path(out_dir)
    # the scratch data is local whatever --out is: the rows measure this machine's disk (and the S3 row a local server)
    work = out_dir / "work" if isinstance(out_dir, Path) else Path(tempfile.mkdtemp(prefix="m2skd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if gpu else "cpu")
    cores = os.cpu_count() or 1
    backends = ["torch"] + (["minkowski"] if minkowski_available() and (not gpu or _minkowski_cuda()) else [])
    amps = ["none", "bf16"] if gpu else ["none"]
    variants = [(backend, amp) for backend in backends for amp in (amps if backend == "torch" else ["none"])]
    stages_started = []

    tell = announce or (lambda name: None)

    def announce(name):  # tells the caller, and counts the stage before it as done
        if progress and stages_started:
            progress(advance=1)
        stages_started.append(name)
        tell(name)

    if progress:
        progress(total=9 + len(variants))
    data = work / "data"
    synth_cfg = SynthConfig() if not quick else SynthConfig(beams=32, azimuth_steps=1024)
    result: dict = {"machine": machine_name(), "torch": torch.__version__, "device": str(device), "frames": frames,
                    "quick": quick, "minkowski": minkowski_available()}
    announce("synth")
    t0 = time.perf_counter()
    summary = generate_dataset(data, sequences=("00", "08"), frames=frames, seed=0, config=synth_cfg, jobs=cores)
    result["synth"] = {"seconds_per_scan": (time.perf_counter() - t0) / (2 * frames), "points_per_scan": summary["points_per_scan_mean"]}

    announce("prepare")
    result["prepare"] = bench_prepare(data, work, ("00", "08"), cores)
    run = Path(result["prepare"]["run"])
    announce("object store: prepare and epoch reads on a local S3 server vs local disk")
    result["object_store"] = bench_object_store(data, work, ("00", "08"))

    announce("teacher (a few steps, for cache and loader rows)")
    tiny = dataclasses.replace(load_config("demo"), steps=3, voxel_size=0.05, workers=0, val_every=10**9, checkpoint_every=10**9, backend="torch")
    teacher = train(run, "teacher", tiny, overwrite=True)
    recalibrate_batchnorm(run, teacher["checkpoint"], scans=8)
    run_cache(run, teacher["checkpoint"], CacheConfig(backend="torch", threads_per_job=cores), overwrite=True)
    announce("cache encodings")
    result["cache_encodings"] = bench_encodings(run, teacher["checkpoint"], scans=4, temperature=tiny.temperature)
    announce("input pipeline")
    result["loader"] = bench_loader(run, samples=min(8, frames))

    result["train_step"] = []
    for backend, amp in variants:
        announce(f"train steps: {backend} {amp}")
        result["train_step"].append(bench_train_steps(run, backend, depth, repeats, device, amp))
    announce(f"backbone: {', '.join(f'{b} {a}' for b, a in variants)}, in turns")
    result["backbone"] = bench_backbones(run, variants, depth, max(3, repeats), device)
    announce("sparse conv: efficiency and dispatches")
    result["sparse_conv"] = bench_sparse_conv(run, result["backbone"], device)

    announce("eval")
    ckpt = work / "eval_model.pt"
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_config("semantickitti"), depth=depth)
    model = build_model(4, 20, depth, cfg.widths, cfg.stem_width, "auto")
    write_checkpoint(ckpt, model, cfg.to_dict(), 20, {"role": "bench"}, history=[], step=0)
    ev = run_eval([ckpt], split="val", data_root=data, out_dir=work / "eval", device=str(device), workers=min(2, cores), max_scans=4)
    result["eval"] = {"points_per_s": ev["results"]["eval_model"]["points_per_second"], "backend": model.backend}

    if progress:
        progress(advance=1)
    result["budgets"] = check_budgets(result)
    path = out_dir / f"bench-{result['machine']}.json"
    write_json_atomic(path, result)
    result["path"] = str(path)
    return result


def _minkowski_cuda() -> bool:
    from m2skd.models.me_compat import import_minkowski

    return bool(getattr(import_minkowski(), "is_cuda_available", lambda: False)())


def check_budgets(result: dict) -> list[dict]:
    ratios = {"prepare_vs_io_rate": result["prepare"]["prepare_vs_io_rate"],
              "prepare_vs_io_rate_1job": result["prepare"]["prepare_vs_io_rate_1job"]}
    default = next(r for r in result["cache_encodings"] if r["kind"] == "default")
    ratios["cache_bytes_per_point"] = default["bytes_per_point"]
    ratios["cache_kl_nats"] = default["kl_nats"]
    fp32 = [r for r in result["train_step"] if r["amp"] == "none"]
    for r in fp32:
        ratios[f"distilled_vs_baseline_step[{r['backend']}]"] = r["distilled_vs_baseline_step"]
        ratios[f"online_vs_baseline_step[{r['backend']}]"] = r["online_vs_baseline_step"]
    bb = {r["backend"]: r["seconds"] for r in result["backbone"] if r["amp"] == "none"}
    if "minkowski" in bb:
        ratios["torch_vs_minkowski_backbone"] = bb["torch"] / bb["minkowski"]
        if result["device"] == "cpu":
            ratios["torch_vs_minkowski_conv_cpu"] = bb["torch"] / bb["minkowski"]
    out = []
    for name, value in ratios.items():
        op, bound = BUDGETS[name.split("[")[0]]
        ok = value <= bound if op == "<=" else value >= bound
        out.append({"ratio": name, "value": value, "budget": f"{op} {bound}", "ok": bool(ok)})
    return out


def format_table(result: dict) -> str:
    lines = [f"m2skd bench on {result['machine']} (torch {result['torch']}, device {result['device']})", ""]
    p = result["prepare"]
    lines += [
        f"synth                     {result['synth']['seconds_per_scan']:.3f} s/scan, {result['synth']['points_per_scan']:.0f} points/scan",
        f"prepare (k=4)             {p['scans_per_s_1job']:.2f} scans/s @1 job ({p['cpu_ms_per_scan_1job']:.0f} ms CPU/scan), "
        f"{p['scans_per_s_all']:.2f} @{p['jobs_all']} jobs; I/O only {p['io_only_scans_per_s']:.1f} scans/s -> ratio "
        f"{p['prepare_vs_io_rate_1job']:.2f} @1 job, {p['prepare_vs_io_rate']:.2f} @{p['jobs_all']}"
        + (f" ({p['frames_per_shard']} frames a shard); {p['scans_per_s_1job_default_shards']:.2f} scans/s @1 job with "
           f"{p['frames_per_shard_default']} (the default) -> {p['prepare_vs_io_rate_1job_default_shards']:.2f}"
           if "scans_per_s_1job_default_shards" in p else ""),
        *(["prepare CPU by phase      " + ", ".join(f"{k} {v:.1f}" for k, v in p["cpu_ms_per_scan_by_phase"].items())
           + " ms/scan @1 job"] if "cpu_ms_per_scan_by_phase" in p else []),
        f"prepare re-run, finished  {p['rerun_finished_s']:.2f} s (sizes and stamps); with --verify {p['rerun_verify_s']:.2f} s",
        f"shard bytes/single point  {p['bytes_per_single_point']:.2f} (raw .bin+.label: 20)",
        f"hard instance points      median {p['median_points_per_hard_instance_single']:.0f} single -> {p['median_points_per_hard_instance_fused']:.0f} fused",
        f"input pipeline            {result['loader']['scans_per_s_per_worker']:.2f} scans/s per worker (read, augment, voxelise, cached targets)",
    ]
    st = result.get("object_store") or {}
    if "skipped" in st:
        lines.append(f"object store (S3)         skipped: {st['skipped']}")
    elif st:
        lines.append(f"object store (S3, moto)   prepare {st['prepare_s3_s']:.1f} s vs {st['prepare_local_s']:.1f} s local "
                     f"(x{st['prepare_s3_vs_local_time']:.2f}); re-run {st['rerun_s3_s']:.2f} vs {st['rerun_local_s']:.2f} s; "
                     f"one epoch's reads ({st['scans']} scans) {st['epoch_reads_s3_s']:.2f} vs {st['epoch_reads_local_s']:.2f} s "
                     f"(x{st['epoch_reads_s3_vs_local_time']:.2f})")
    for r in result["train_step"]:
        lines.append(f"train step {r['backend']:<9} {r['amp']:<4} MinkUNet{r['depth']}: baseline {r['baseline_s']:.2f} s, "
                     f"distilled {r['distilled_s']:.2f} s (x{r['distilled_vs_baseline_step']:.2f}), online teacher {r['online_s']:.2f} s "
                     f"(x{r['online_vs_baseline_step']:.2f}); {r['points']} points")
    for r in result["backbone"]:
        lines.append(f"backbone {r['backend']:<11} {r['amp']:<4} fwd+bwd {r['seconds']:.2f} s/scan ({r['params'] / 1e6:.1f} M params)")
    sc = result.get("sparse_conv")
    if sc:
        vs_me = f"{sc['torch_vs_minkowski']:.2f}x MinkowskiEngine's time" if sc["torch_vs_minkowski"] else "no MinkowskiEngine"
        d = sc["dispatches_per_conv"]
        lines += [
            f"sparse conv (torch)       fwd+bwd {sc['torch_s']:.2f} s = {vs_me}; {sc['conv_gflop_fwd_bwd']:.0f} GFLOP of conv "
            f"(pairs x Cin x Cout x 2, x3) at {sc['conv_gflop_per_s']:.1f} GFLOP/s = {sc['conv_vs_dense_gemm']:.2f} of dense GEMM "
            f"({sc['dense_gemm_gflop_per_s']:.0f} GFLOP/s, {sc['threads']} threads)",
            f"dispatches per 3^3 conv   GPU grouping {d['gpu']['forward']} fwd / {d['gpu']['backward']} bwd; "
            f"CPU grouping {d['cpu']['forward']} fwd / {d['cpu']['backward']} bwd (this run: {sc['grouping']})",
        ]
    for r in result["cache_encodings"]:
        if r["kind"] == "features":
            err = f"rel. MSE {r['relative_mse']:.2e}"
        else:
            err = f"KL mean {r['kl_nats']:.2e}, max {r['kl_max_nats']:.2e} nats"
        if r["kind"] == "default":
            err += (f"; SemanticKITTI train ({KITTI_HARD_FRACTION:.1%} hard points): {r['kitti_bytes_per_point']:.2f} B/point, "
                    f"{r['kitti_train_gb']:.1f} GB")
        lines.append(f"cache {r['kind']:<8} {r['encoding']:<9} {r['bytes_per_point']:.2f} B/point, {err}")
    lines.append(f"eval                      {result['eval']['points_per_s']:.0f} points/s ({result['eval']['backend']})")
    lines += ["", "budgets (ratios from this run):"]
    for b in result["budgets"]:
        lines.append(f"  {b['ratio']:<45} {b['value']:<8.3g} budget {b['budget']:<8} {'ok' if b['ok'] else 'MISSED'}")
    return "\n".join(lines)
