"""`m2skd demo`: the whole method on a small synthetic dataset, ending in a comparison table.

synth -> prepare -> train-teacher -> cache-teacher -> train-student (distilled) and the
baseline (same everything, no distillation) -> eval of all three on the val sequence.
Every step is the same library call the stage commands make; re-running resumes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2skd.fusion import FusionConfig
from m2skd.ragged import write_json_atomic
from m2skd.synth import SynthConfig, generate_dataset
from m2skd.train_config import load_config
from m2skd.trainer import train

from .cache_teacher import CacheConfig, run_cache
from .evaluate import run_eval
from .parallel import run_tasks
from .prepare import PrepareConfig, run_prepare


@dataclass(frozen=True)
class DemoSize:
    train_sequences: tuple[str, ...] = ("00", "01")
    val_sequences: tuple[str, ...] = ("08",)
    frames: int = 40                # scans per train sequence
    # the val drive is longer and evaluated on an evenly spaced subset: 40 consecutive scans
    # cover only 32 m of street, too few hard-class instances for a hard-class mIoU to mean much
    val_frames: int = 200
    eval_scans: int | None = 50
    beams: int = 32
    azimuth_steps: int = 1024
    teacher_steps: int = 300
    student_steps: int = 200
    config: str = "demo"
    jobs: int = 2


SIZES = {
    "default": DemoSize(),
    "tiny": DemoSize(train_sequences=("00",), frames=8, val_frames=8, eval_scans=None, beams=16, azimuth_steps=512,
                     teacher_steps=6, student_steps=6, jobs=2),
}


def student_names(seed: int, demo_seed: int) -> tuple[str, str]:
    """(distilled, baseline) run names; seeds other than the demo's own get a suffix, so a
    name always means the same seed and a re-run never mistakes one seed's model for another's."""
    suffix = "" if seed == demo_seed else f"-s{seed}"
    return f"distilled{suffix}", f"baseline{suffix}"


def final_model(run, name: str) -> Path:
    return Path(run, name, "model.pt")


def train_or_resume(run, role: str, name: str, config, callback=None) -> str:
    """The finished model of RUN/name; trains it first, resuming an interrupted run."""
    done = final_model(run, name)
    if done.exists():
        return str(done)
    resume = Path(run, name, "checkpoints", "last.pt").exists()
    return train(run, role, config, name=name, resume=resume, callback=callback)["checkpoint"]


def train_student(task) -> tuple[str, str]:
    """One student run with `threads` torch threads. Students run side by side, one thread each
    on 2 cores: the sparse ops scale poorly across threads, so two 1-thread runs finish in 0.6x
    the time of the same two runs one after the other."""
    run, name, config, threads = task
    torch.set_num_threads(threads)
    return name, train_or_resume(run, "student", name, config)


def distillation_effect(table, pairs: list[tuple[str, str]]) -> dict:
    """distilled - baseline per seed (same data, teacher and seed), and their mean and range."""
    by_name = table.set_index("checkpoint")
    out = {}
    for metric in ("hard_miou", "miou"):
        deltas = [float(by_name.loc[d, metric] - by_name.loc[b, metric]) for d, b in pairs]
        out[metric] = {"per_seed": deltas, "mean": float(np.mean(deltas)), "min": min(deltas), "max": max(deltas)}
    return out


def run_demo(out_dir, size: str = "default", seed: int = 0, backend: str = "auto", overrides: dict | None = None,
             student_seeds=None, on_stage=None, progress_factory=None) -> dict:
    """on_stage(name) announces each stage; progress_factory(name) gives a progress callable.

    `seed` fixes the synthetic data and the teacher; each of `student_seeds` (default: `seed`)
    trains one distilled student and its baseline with that seed. Re-running resumes, so extra
    student seeds can be added to a finished demo without retraining the teacher.
    """
    s = SIZES[size]
    student_seeds = tuple(student_seeds) if student_seeds else (seed,)
    out = Path(out_dir)
    data, run = out / "data", out / "run"
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)

    announce("synth")
    if not (data / "sequences").is_dir() or len(list((data / "sequences").iterdir())) < len(s.train_sequences + s.val_sequences):
        p = bar("synth")
        for sequences, frames in ((s.train_sequences, s.frames), (s.val_sequences, s.val_frames)):
            generate_dataset(data, sequences=sequences, frames=frames, seed=seed,
                             config=SynthConfig(beams=s.beams, azimuth_steps=s.azimuth_steps), jobs=s.jobs,
                             progress=(lambda n=1: p(advance=n)) if p else None)
    announce("prepare")
    prep = run_prepare(data, run, PrepareConfig(FusionConfig(), frames_per_shard=10), jobs=s.jobs, progress=bar("prepare"))

    base = {"backend": backend, **(overrides or {})}
    trained = {}

    announce("train teacher")
    p = None if final_model(run, "teacher").exists() else bar("train teacher")
    trained["teacher"] = train_or_resume(
        run, "teacher", "teacher", load_config(s.config, {"steps": s.teacher_steps, "seed": seed, **base}),
        callback=(lambda step, total, logs: p(total=total, done=None, set_to=step, postfix=logs)) if p else None)
    announce("cache-teacher")
    cache = run_cache(run, trained["teacher"], CacheConfig(backend=backend), jobs=s.jobs, progress=bar("cache-teacher"))
    pairs, todo = [], []
    for student_seed in student_seeds:
        cfg = load_config(s.config, {"steps": s.student_steps, "seed": student_seed, **base})
        distilled, baseline = student_names(student_seed, seed)
        pairs.append((distilled, baseline))
        for name, config in ((distilled, cfg), (baseline, cfg.no_distill())):
            if final_model(run, name).exists():
                trained[name] = str(final_model(run, name))
            else:
                todo.append((str(run), name, config))
    if todo:
        jobs = min(s.jobs, len(todo))
        announce(f"train {', '.join(name for _, name, _ in todo)} ({jobs} at a time)")
        p = bar("train students")
        if p:
            p(total=len(todo))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        for name, checkpoint in run_tasks(train_student, [(*t, threads) for t in todo], jobs,
                                          on_done=(lambda task, result: p(advance=1)) if p else None):
            trained[name] = checkpoint

    announce("eval")
    ordered = [trained[b] for _, b in pairs] + [trained[d] for d, _ in pairs] + [trained["teacher"]]
    report = run_eval(ordered, split="val", data_root=data, out_dir=run / "eval", backend=backend, workers=1,
                      max_scans=s.eval_scans, progress=bar("eval"))
    effect = distillation_effect(report["table"], pairs)
    write_json_atomic(run / "eval" / "distillation_effect.json", {"pairs": pairs, **effect})
    return {"prepare": prep, "cache": cache, "checkpoints": trained, "table": report["table"], "out_dir": report["out_dir"],
            "effect": effect, "size": dataclasses.asdict(s)}
