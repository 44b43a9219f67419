"""`m2skd demo`: the whole method on a small synthetic dataset, ending in a comparison table.

synth -> prepare -> train-teacher -> cache-teacher -> train-student (distilled) and the
baseline (same everything, no distillation) -> eval of all three on the val sequence ->
pictures (`m2skd show`). The teacher trains first on every core, then both students side by side (train_all).
Every step is the same library call the stage commands make; re-running resumes.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
from dataclasses import dataclass
from pathlib import Path


from m2skd import storage
from m2skd.fusion import FusionConfig
from m2skd.stats import paired_effect
from m2skd.atomic import write_json_atomic
from m2skd.synth import SynthConfig, generate_dataset
from m2skd.train_config import load_config
from m2skd.errors import StaleInputError
from m2skd.rundir import RunDir
from m2skd.trainer import current_model, train

from .cache_teacher import CacheConfig, run_cache
from .evaluate import run_eval
from .parallel import Task, run_graph, torch_threads
from .prepare import PrepareConfig, run_prepare
from .show import run_show
from .stats import run_stats


@dataclass(frozen=True)
class DemoSize:
    train_sequences: tuple[str, ...] = ("00", "01")
    val_sequences: tuple[str, ...] = ("08",)
    frames: int = 40                # scans per train sequence
    # the val drive is longer and evaluated on an evenly spaced subset, and it places each hard
    # class at least val_min_hard_per_100m times per 100 m near the drive: at real shares a
    # drive this short holds too few instances to score (at least 30 with 10+ points each)
    val_frames: int = 300
    eval_scans: int | None = 100
    val_min_hard_per_100m: float = 2.5
    # the train drives' floor: 0 keeps real shares; the val drive's floor gives train drives its
    # distribution of hard instances (on short drives the floor parks trucks beyond the ends, far
    # away; on long ones it also parks them along the street, close and dense)
    train_min_hard_per_100m: float = 0.0
    beams: int = 32
    azimuth_steps: int = 1024
    teacher_steps: int = 300
    student_steps: int = 200
    config: str = "demo"
    jobs: int = 2


SIZES = {
    "default": DemoSize(),
    # the first study's size: the demo's data, a teacher trained 4x longer, students 3x longer,
    # every second val scan evaluated
    "study": DemoSize(teacher_steps=1200, student_steps=600, eval_scans=150),
    # the study's steps on 10 train drives (400 scans): a teacher that cannot learn 80 scans by heart
    "study-wide": DemoSize(train_sequences=("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
                           teacher_steps=1200, student_steps=600, eval_scans=150),
    # train drives made as the val drive is (300 scans, the same floor): train and val hard
    # instances alike in range and points (docs/results.md, teachers' standing)
    "study-matched": DemoSize(frames=300, train_min_hard_per_100m=2.5, teacher_steps=1200, student_steps=600,
                              eval_scans=150),
    "tiny": DemoSize(train_sequences=("00",), frames=8, val_frames=8, eval_scans=None, beams=16, azimuth_steps=512,
                     teacher_steps=6, student_steps=6, jobs=2),
}


def student_names(seed: int, demo_seed: int, arm: str = "kl") -> tuple[str, str]:
    """(distilled, baseline) run names; seeds other than the demo's own get a suffix, so a
    name always means the same seed and a re-run never mistakes one seed's model for another's.
    A distilled student of another arm than "kl" (the default logit form) is named after it
    (distilled-release, distilled-kdh4); the baseline, which has no distillation, is shared by
    every arm."""
    suffix = "" if seed == demo_seed else f"-s{seed}"
    tag = "" if arm == "kl" else f"-{arm}"
    return f"distilled{tag}{suffix}", f"baseline{suffix}"


def train_or_resume(run, role: str, name: str, config, callback=None) -> str:
    """The finished model of RUN/name if it is current (same shards, cache and settings);
    otherwise trains it, resuming an interrupted run of the same settings, else from scratch."""
    done = current_model(run, name, role, config)
    if done:
        return done
    if RunDir(run).last_checkpoint(name).exists():
        try:
            return train(run, role, config, name=name, resume=True, callback=callback)["checkpoint"]
        except StaleInputError:
            pass  # a run of other settings or inputs: start again
    return train(run, role, config, name=name, overwrite=True, callback=callback)["checkpoint"]


def task_threads(size: DemoSize) -> int:
    """torch threads of one training in a graph of `size.jobs` at a time: the cores shared out.
    Runs side by side on one thread each beat one run on all: the sparse ops scale poorly across
    threads, so two 1-thread runs on 2 cores finish in 0.6x the time of the two one after the other."""
    return max(1, (os.cpu_count() or 1) // size.jobs)


def _step_reporter(steps, run, name):
    return (lambda step, total, logs: steps.put((str(run), name, step))) if steps is not None else None


def train_student(task) -> str:
    """One student run with `threads` torch threads (a task of train_all's graph)."""
    run, name, config, threads, steps = task
    with torch_threads(threads):
        return train_or_resume(run, "student", name, config, callback=_step_reporter(steps, run, name))


def make_teacher(run, config, backend: str, jobs: int = 1, callback=None, cache_progress=None) -> tuple[str, dict]:
    """A run's teacher trained (or resumed) and cached, both only where missing. Val is cached
    too: the transfer diagnostic reads the teacher's val targets instead of re-running it per checkpoint."""
    teacher = train_or_resume(run, "teacher", "teacher", config, callback=callback)
    cache = run_cache(run, teacher, CacheConfig(backend=backend, splits=("train", "val")), jobs=jobs, progress=cache_progress)
    return teacher, cache


def _teacher_task(task) -> tuple[str, dict]:
    run, config, backend, threads, steps = task
    with torch_threads(threads):
        return make_teacher(run, config, backend, callback=_step_reporter(steps, run, "teacher"))


def run_reporting_steps(build, total: int, jobs: int, p) -> dict:
    """run_graph over build(steps) with the trainings' steps summed on progress `p`: each run's
    training callback sends its step through a queue that a thread here drains, so a log shows
    steps (rate, ETA) while the runs work in their own processes, not only runs as they end."""
    if not p:
        return run_graph(build(None), jobs)
    p(total=total)
    with multiprocessing.Manager() as manager:
        steps, at = manager.Queue(), {}

        def drain():
            while (message := steps.get()) is not None:
                run, name, step = message
                at[(run, name)] = step
                p(set_to=sum(at.values()))

        reader = threading.Thread(target=drain, name="training-steps", daemon=True)
        reader.start()
        try:
            return run_graph(build(steps), jobs)
        finally:
            steps.put(None)
            reader.join()


def distillation_effect(table, pairs: list[tuple[str, str]]) -> dict:
    """distilled - baseline per seed (same data, teacher and seed): mean, range and 95% t-interval."""
    by_name = table.set_index("checkpoint")
    return {metric: paired_effect([float(by_name.loc[d, metric] - by_name.loc[b, metric]) for d, b in pairs])
            for metric in ("hard_miou", "miou")}


def run_dir_for(out_dir, fusion: str = "hard") -> Path:
    """OUT/run holds the method's (hard-fused) data and teacher, and the baselines; a control
    teacher of another fusion mode has its own prepared data and cache in OUT/run-<fusion>."""
    return storage.path(out_dir) / ("run" if fusion == "hard" else f"run-{fusion}")


def prepare_shared(out_dir, size: str = "default", seed: int = 0, backend: str = "auto", overrides: dict | None = None,
                   on_stage=None, progress_factory=None, fusion: str = "hard") -> dict:
    """What every student of a demo (or a study) shares before its teacher: synthetic data and
    prepared shards, each made only if missing, and the teacher's and students' base settings.
    `fusion` picks the teacher's input (prepare's --fusion), in its own run directory
    (run_dir_for); the synthetic data is shared."""
    s = SIZES[size]
    out = storage.path(out_dir)
    data, run = out / "data", run_dir_for(out, fusion)
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)

    announce("synth")
    if not (data / "sequences").is_dir() or len(list((data / "sequences").iterdir())) < len(s.train_sequences + s.val_sequences):
        p = bar("synth")
        if p:
            p(total=s.frames * len(s.train_sequences) + s.val_frames * len(s.val_sequences))
        for sequences, frames, floor in ((s.train_sequences, s.frames, s.train_min_hard_per_100m),
                                         (s.val_sequences, s.val_frames, s.val_min_hard_per_100m)):
            generate_dataset(data, sequences=sequences, frames=frames, seed=seed,
                             config=SynthConfig(beams=s.beams, azimuth_steps=s.azimuth_steps, min_hard_per_100m=floor),
                             jobs=s.jobs, progress=(lambda n=1: p(advance=n)) if p else None)
    base = {"backend": backend, **(overrides or {})}
    announce("prepare" if fusion == "hard" else f"prepare (fusion {fusion})")
    voxel_size = load_config(s.config, base).voxel_size  # the gain fusion gives hard instances at the training voxels
    prep = run_prepare(data, run, PrepareConfig(FusionConfig(mode=fusion), frames_per_shard=10), jobs=s.jobs, progress=bar("prepare"),
                       voxel_size=voxel_size)
    return {"size": s, "data": data, "run": run, "prepare": prep, "base": base, "fusion": fusion,
            "teacher_config": load_config(s.config, {"steps": s.teacher_steps, "seed": seed, **base})}


def build_shared(out_dir, size: str = "default", seed: int = 0, backend: str = "auto", overrides: dict | None = None,
                 on_stage=None, progress_factory=None, fusion: str = "hard") -> dict:
    """prepare_shared's dict with the teacher trained and cached here, in this process (its
    "teacher" and "cache"); a demo or a study trains theirs in train_all's graph instead."""
    shared = prepare_shared(out_dir, size, seed, backend, overrides, on_stage, progress_factory, fusion)
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)
    announce("train teacher" if fusion == "hard" else f"train teacher (fusion {fusion})")
    run = shared["run"]
    p = None if RunDir(run).model("teacher").exists() else bar("train teacher")
    shared["teacher"], shared["cache"] = make_teacher(
        run, shared["teacher_config"], backend, jobs=shared["size"].jobs,
        callback=(lambda step, total, logs: p(total=total, done=None, set_to=step, postfix=logs)) if p else None,
        cache_progress=bar("cache-teacher"))
    return shared


def plan_students(shared: dict, student_seeds, demo_seed: int, arms: dict | None = None) -> tuple[dict, dict]:
    """Per arm (label -> training overrides of its distilled students), the (distilled,
    baseline) pair of each seed, and name -> config of every student run they need (a baseline
    appears once, whatever the arms). Default: one arm, "kl", the configuration as it is."""
    s, base = shared["size"], shared["base"]
    pairs, configs = {}, {}
    for arm, arm_overrides in (arms or {"kl": {}}).items():
        for student_seed in student_seeds:
            cfg = load_config(s.config, {"steps": s.student_steps, "seed": student_seed, **base, **arm_overrides})
            distilled, baseline = student_names(student_seed, demo_seed, arm)
            pairs.setdefault(arm, []).append((distilled, baseline))
            configs.setdefault(distilled, cfg)
            if configs.setdefault(baseline, cfg.no_distill()) != cfg.no_distill():
                changed = sorted(k for k, v in cfg.no_distill().to_dict().items() if configs[baseline].to_dict()[k] != v)
                raise ValueError(f"arm {arm!r} changes what its baseline trains with ({', '.join(changed)}); "
                                 f"an arm may set only distillation settings")
    return pairs, configs


def teachers_to_train(by_fusion: dict) -> list[str]:
    """The fusions of `by_fusion` (fusion -> prepare_shared's dict) whose teacher is missing or stale."""
    return [fusion for fusion, shared in by_fusion.items()
            if not current_model(shared["run"], "teacher", "teacher", shared["teacher_config"])]


def train_all(by_fusion: dict, students: dict, on_stage=None, progress_factory=None, extra: dict | None = None,
              to_train: list[str] | None = None) -> dict:
    """label -> finished checkpoint of every student of `students` (label -> (fusion of the run
    directory it lives in, run name, config)), after each teacher of `by_fusion` (fusion ->
    prepare_shared's dict, given its "teacher" and "cache" here) is trained and cached where
    missing. One graph, size.jobs runs at a time: baselines need no teacher, so they train beside
    the teachers, and a distilled student starts once its own teacher's cache exists. `extra`
    (key -> Task) joins the graph after the trainings; a need naming a run that is already
    finished is met. Each run resumes if it was interrupted. `to_train`: teachers_to_train(by_fusion),
    where the caller has it already (each check reads every teacher's checkpoint).

    Where the students to train are no more than the workers (the demo: one pair), they would
    leave a core idle beside a teacher and then train one at a time after it; the teachers train
    first instead, sharing every core, and the students then side by side. The choice, and with
    it each run's thread count (which changes its bits), follows from the graph alone, never from
    when a run happens to end."""
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)
    s = next(iter(by_fusion.values()))["size"]
    threads = task_threads(s)
    specs, total, trained = {}, 0, {}
    to_train = teachers_to_train(by_fusion) if to_train is None else to_train
    for fusion, shared in by_fusion.items():
        if fusion not in to_train:
            announce("cache-teacher" if fusion == "hard" else f"cache-teacher (fusion {fusion})")
            shared["teacher"], shared["cache"] = make_teacher(shared["run"], shared["teacher_config"], shared["base"]["backend"],
                                                              jobs=s.jobs, cache_progress=bar("cache-teacher"))
    student_specs = {}
    for label, (fusion, name, config) in students.items():
        run = by_fusion[fusion]["run"]
        # a student of a teacher trained now is trained after it: its present model was distilled from another cache
        retrained = config.distill_enabled() and fusion in to_train
        done = None if retrained else current_model(run, name, "student", config)
        if done:
            trained[label] = done
        else:
            student_specs[label] = (fusion, run, name, config)
    teachers_first = bool(to_train) and len(student_specs) <= s.jobs
    teacher_threads = max(1, (os.cpu_count() or 1) // min(s.jobs, len(to_train))) if teachers_first else threads
    for fusion in to_train:
        shared = by_fusion[fusion]
        specs[("teacher", fusion)] = (_teacher_task, (str(shared["run"]), shared["teacher_config"], shared["base"]["backend"],
                                                      teacher_threads), ())
        total += shared["teacher_config"].steps
    for label, (fusion, run, name, config) in student_specs.items():
        needs = tuple(("teacher", f) for f in to_train if teachers_first or (config.distill_enabled() and f == fusion))
        specs[label] = (train_student, (str(run), name, config, threads), needs)
        total += config.steps
    trainings = list(specs)
    for key, task in (extra or {}).items():
        specs[key] = (task.fn, task.arg, tuple(n for n in task.needs if n in trainings))
    if not specs:
        return trained
    labels = [label if isinstance(label, str) else f"teacher ({label[1]})" for label in trainings]
    order = (f"{', '.join(labels[:len(to_train)])} on {teacher_threads} thread{'s' * (teacher_threads > 1)}, then {', '.join(labels[len(to_train):])}"
             if teachers_first and len(labels) > len(to_train) else ", ".join(labels))
    announce(f"train {order}" + (f" and {len(specs) - len(trainings)} evaluations" if extra else "")
             + f" ({s.jobs} at a time)")

    def build(steps):
        return {key: Task(fn, (*arg, steps) if key in trainings else arg, needs) for key, (fn, arg, needs) in specs.items()}

    results = run_reporting_steps(build, total, s.jobs, bar("train"))
    for key in trainings:
        if isinstance(key, tuple):
            by_fusion[key[1]]["teacher"], by_fusion[key[1]]["cache"] = results[key]
        else:
            trained[key] = results[key]
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
    shared = prepare_shared(out_dir, size, seed, backend, overrides, on_stage, progress_factory)
    s, run = shared["size"], shared["run"]
    pairs_by_arm, configs = plan_students(shared, student_seeds, seed)
    (pairs,) = pairs_by_arm.values()
    students = {label: ("hard", label, config) for label, config in configs.items()}
    trained = train_all({"hard": shared}, students, on_stage, progress_factory)
    trained["teacher"] = shared["teacher"]

    announce("eval")
    ordered = [trained[b] for _, b in pairs] + [trained[d] for d, _ in pairs] + [trained["teacher"]]
    report = run_eval(ordered, split="val", data_root=shared["data"], out_dir=RunDir(run).eval, backend=backend, workers=1,
                      max_scans=s.eval_scans, progress=bar("eval"))
    effect = distillation_effect(report["table"], pairs)
    # what the hard-class figures rest on: instances per class with 10+ points in the scans eval saw
    val_instances = run_stats(shared["data"], s.val_sequences, max_scans=s.eval_scans)["all"]["instances"]
    write_json_atomic(RunDir(run).distillation_effect, {"pairs": pairs, **effect})
    announce("show")
    distilled, baseline = pairs[0]
    pictures = run_show(run, checkpoints=[baseline, distilled, "teacher"], backend=backend)
    return {"prepare": shared["prepare"], "cache": shared["cache"], "checkpoints": trained, "table": report["table"],
            "instances": report["instances"], "out_dir": report["out_dir"], "effect": effect,
            "pictures": {view: v["path"] for view, v in pictures.items()}, "size": dataclasses.asdict(s),
            "val_instances": val_instances}
