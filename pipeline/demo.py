"""`m2skd demo`: the whole method on a small synthetic dataset, ending in a comparison table.

synth -> prepare -> train-teacher -> cache-teacher -> train-student (distilled) and the
baseline (same everything, no distillation) -> eval of all three on the val sequence ->
pictures (`m2skd show`).
Every step is the same library call the stage commands make; re-running resumes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from m2skd.fusion import FusionConfig
from m2skd.stats import paired_effect
from m2skd.atomic import write_json_atomic
from m2skd.synth import SynthConfig, generate_dataset
from m2skd.train_config import load_config
from m2skd.errors import StaleInputError
from m2skd.trainer import current_model, train

from .cache_teacher import CacheConfig, run_cache
from .evaluate import run_eval
from .parallel import run_tasks
from .prepare import PrepareConfig, run_prepare
from .show import run_show


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


def student_names(seed: int, demo_seed: int, kd_form: str = "kl") -> tuple[str, str]:
    """(distilled, baseline) run names; seeds other than the demo's own get a suffix, so a
    name always means the same seed and a re-run never mistakes one seed's model for another's.
    A distilled student of another logit form than "kl" is named after it (distilled-release);
    the baseline, which has no logit term, is shared by every form."""
    suffix = "" if seed == demo_seed else f"-s{seed}"
    form = "" if kd_form == "kl" else f"-{kd_form}"
    return f"distilled{form}{suffix}", f"baseline{suffix}"


def final_model(run, name: str) -> Path:
    return Path(run, name, "model.pt")


def train_or_resume(run, role: str, name: str, config, callback=None) -> str:
    """The finished model of RUN/name if it is current (same shards, cache and settings);
    otherwise trains it, resuming an interrupted run of the same settings, else from scratch."""
    done = current_model(run, name, role, config)
    if done:
        return done
    if Path(run, name, "checkpoints", "last.pt").exists():
        try:
            return train(run, role, config, name=name, resume=True, callback=callback)["checkpoint"]
        except StaleInputError:
            pass  # a run of other settings or inputs: start again
    return train(run, role, config, name=name, overwrite=True, callback=callback)["checkpoint"]


def train_student(task) -> tuple[str, str]:
    """One student run with `threads` torch threads. Students run side by side, one thread each
    on 2 cores: the sparse ops scale poorly across threads, so two 1-thread runs finish in 0.6x
    the time of the same two runs one after the other."""
    run, name, config, threads = task
    torch.set_num_threads(threads)
    return name, train_or_resume(run, "student", name, config)


def distillation_effect(table, pairs: list[tuple[str, str]]) -> dict:
    """distilled - baseline per seed (same data, teacher and seed): mean, range and 95% t-interval."""
    by_name = table.set_index("checkpoint")
    return {metric: paired_effect([float(by_name.loc[d, metric] - by_name.loc[b, metric]) for d, b in pairs])
            for metric in ("hard_miou", "miou")}


def build_shared(out_dir, size: str = "default", seed: int = 0, backend: str = "auto", overrides: dict | None = None,
                 on_stage=None, progress_factory=None) -> dict:
    """What every student of a demo (or a study) shares: synthetic data, prepared shards, the
    teacher and its cache, each made only if missing. Returns paths, summaries and the base
    training overrides the students use."""
    s = SIZES[size]
    out = Path(out_dir)
    data, run = out / "data", out / "run"
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)

    announce("synth")
    if not (data / "sequences").is_dir() or len(list((data / "sequences").iterdir())) < len(s.train_sequences + s.val_sequences):
        p = bar("synth")
        if p:
            p(total=s.frames * len(s.train_sequences) + s.val_frames * len(s.val_sequences))
        for sequences, frames in ((s.train_sequences, s.frames), (s.val_sequences, s.val_frames)):
            generate_dataset(data, sequences=sequences, frames=frames, seed=seed,
                             config=SynthConfig(beams=s.beams, azimuth_steps=s.azimuth_steps), jobs=s.jobs,
                             progress=(lambda n=1: p(advance=n)) if p else None)
    announce("prepare")
    prep = run_prepare(data, run, PrepareConfig(FusionConfig(), frames_per_shard=10), jobs=s.jobs, progress=bar("prepare"))

    base = {"backend": backend, **(overrides or {})}
    announce("train teacher")
    p = None if final_model(run, "teacher").exists() else bar("train teacher")
    teacher = train_or_resume(
        run, "teacher", "teacher", load_config(s.config, {"steps": s.teacher_steps, "seed": seed, **base}),
        callback=(lambda step, total, logs: p(total=total, done=None, set_to=step, postfix=logs)) if p else None)
    announce("cache-teacher")
    cache = run_cache(run, teacher, CacheConfig(backend=backend), jobs=s.jobs, progress=bar("cache-teacher"))
    return {"size": s, "data": data, "run": run, "prepare": prep, "cache": cache, "teacher": teacher, "base": base}


def plan_students(shared: dict, student_seeds, demo_seed: int, kd_forms=(None,)) -> tuple[dict, dict]:
    """Per logit form, the (distilled, baseline) pair of each seed, and name -> config of every
    student run they need (a baseline appears once, whatever the forms). kd_form None: the
    form the configuration (and its overrides) sets."""
    s, base = shared["size"], shared["base"]
    pairs, configs = {}, {}
    for form in kd_forms:
        for student_seed in student_seeds:
            values = {"steps": s.student_steps, "seed": student_seed, **base}
            if form is not None:
                values["kd_form"] = form
            cfg = load_config(s.config, values)
            distilled, baseline = student_names(student_seed, demo_seed, cfg.kd_form)
            pairs.setdefault(cfg.kd_form, []).append((distilled, baseline))
            configs.setdefault(distilled, cfg)
            configs.setdefault(baseline, cfg.no_distill())
    return pairs, configs


def train_students(shared: dict, configs: dict, on_stage=None, progress_factory=None) -> dict:
    """name -> finished checkpoint for every run in `configs`; the missing ones are trained,
    `size.jobs` side by side (each resumes if it was interrupted)."""
    run, s = shared["run"], shared["size"]
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)
    trained, todo = {}, []
    for name, config in configs.items():
        done = current_model(run, name, "student", config)
        if done:
            trained[name] = done
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
    return trained


def run_demo(out_dir, size: str = "default", seed: int = 0, backend: str = "auto", overrides: dict | None = None,
             student_seeds=None, on_stage=None, progress_factory=None) -> dict:
    """on_stage(name) announces each stage; progress_factory(name) gives a progress callable.

    `seed` fixes the synthetic data and the teacher; each of `student_seeds` (default: `seed`)
    trains one distilled student and its baseline with that seed. Re-running resumes, so extra
    student seeds can be added to a finished demo without retraining the teacher. Ends with a
    few pictures (`m2skd show`) in RUN/show/.
    """
    student_seeds = tuple(student_seeds) if student_seeds else (seed,)
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)
    shared = build_shared(out_dir, size, seed, backend, overrides, on_stage, progress_factory)
    s, run = shared["size"], shared["run"]
    pairs_by_form, configs = plan_students(shared, student_seeds, seed)
    (pairs,) = pairs_by_form.values()
    trained = {"teacher": shared["teacher"], **train_students(shared, configs, on_stage, progress_factory)}

    announce("eval")
    ordered = [trained[b] for _, b in pairs] + [trained[d] for d, _ in pairs] + [trained["teacher"]]
    report = run_eval(ordered, split="val", data_root=shared["data"], out_dir=run / "eval", backend=backend, workers=1,
                      max_scans=s.eval_scans, progress=bar("eval"))
    effect = distillation_effect(report["table"], pairs)
    write_json_atomic(run / "eval" / "distillation_effect.json", {"pairs": pairs, **effect})
    announce("show")
    distilled, baseline = pairs[0]
    pictures = run_show(run, checkpoints=[baseline, distilled, "teacher"], backend=backend)
    return {"prepare": shared["prepare"], "cache": shared["cache"], "checkpoints": trained, "table": report["table"],
            "instances": report["instances"], "out_dir": report["out_dir"], "effect": effect,
            "pictures": {view: v["path"] for view, v in pictures.items()}, "size": dataclasses.asdict(s)}
