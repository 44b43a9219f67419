"""`m2skd study`: the distillation effect over paired seeds, with 95% confidence intervals,
for each teacher of the paper's controls.

Teachers (`teachers`): `hard` (the method: hard-class instances fused), `none` (a single-scan
teacher: what plain self-distillation gives) and `all` (whole-scan fusion, the paper's
ablation); only hard - none is the multi-scan contribution. Each teacher has its own prepared
data and cache (OUT/run for hard, OUT/run-<fusion> for the others; the synthetic data is
shared) and its distilled students beside it. The baselines (no teacher) are trained once per
seed, in OUT/run, and paired with every teacher's students: for each seed a distilled student
and its baseline differ only in the distillation. The effect of a metric is distilled -
baseline per seed, reported as its mean, 95% t-interval over seeds and per-seed values, for
hard-class mIoU, mIoU, each class's IoU, each sparse-instance bucket (hit rate, point recall)
and the transfer diagnostic to that teacher (KL(teacher || student) x T^2 and argmax
agreement at val single-scan points: hard-class, all, per instance bucket). With both `hard` and
`none`, rows of teacher `hard-none` hold the paired difference of their students per seed (no
transfer rows: the two students have different teachers). Several arms, each a
label and the distillation settings of its students (a logit form, weights), can be compared
against the same baselines: that is how weights are tuned. Re-running with more seeds, arms or
teachers trains and evaluates only what is missing: a finished student, its evaluation or its
diagnostic is never redone.

Outputs in OUT/run/study/: study.json, study.csv (one row per teacher, arm and metric:
teacher, arm, kd_form, group, metric, hard, mean, ci_low, ci_high, n_seeds, one column per seed),
study.png, per-checkpoint evaluations in eval/<label>/ and diagnostics in transfer/<teacher>/.
A student of a control teacher is labelled <name>@<fusion> (distilled-s1@none).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from m2skd import storage
from m2skd.atomic import read_json, write_json_atomic
from m2skd.errors import StaleInputError
from m2skd.fusion import FUSION_MODES
from m2skd.instances import POINT_BUCKETS
from m2skd.losses import kd_weight_for
from m2skd.plots import effect_plot
from m2skd.rundir import RunDir, model_label
from m2skd.stats import paired_effect

from .demo import SIZES, plan_students, prepare_shared, task_threads, teachers_to_train, train_all
from .evaluate import METRICS_FILE, run_eval, transfer_diagnostic
from .parallel import Task, torch_threads

TEACHERS = ("none", "hard", "all")
SUMMARY_METRICS = (("hard_miou", "hard-class mIoU"), ("miou", "mIoU"))
INSTANCE_RATES = ("hit_rate", "point_recall")
# the transfer diagnostic's paired effects: metric name -> (part of the summary, value)
TRANSFER_METRICS = {"kl_hard": ("hard", "kl"), "kl_all": ("all", "kl"), "agreement_hard": ("hard", "agreement"),
                    "agreement_all": ("all", "agreement")}


def student_label(name: str, teacher: str) -> str:
    """A run's label in the study: its name for the method's teacher, name@fusion for a control's."""
    return name if teacher == "hard" else f"{name}@{teacher}"


def teacher_label(teacher: str) -> str:
    return student_label("teacher", teacher)


def _comparable(config: dict) -> dict:
    """A training config as JSON values, the logit weight made explicit (None = the form's
    default), so a run recorded before kd_form existed compares equal to the same run today."""
    out = json.loads(json.dumps(config))
    form = out.pop("kd_form", "kl")
    out["kd_weight"] = kd_weight_for(form, out.get("kd_weight"))
    out["kd_form"] = form if out["kd_weight"] else None  # no logit term: the form is irrelevant
    return out


def check_existing(run: Path, configs: dict) -> None:
    """Refuse to pair a finished student trained with another configuration than asked for."""
    for name, cfg in configs.items():
        record = RunDir(run).train_record(name)
        if not RunDir(run).model(name).exists() or not record.is_file():
            continue
        have, want = _comparable(read_json(record)["config"]), _comparable(cfg.to_dict())
        diff = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        if diff:
            raise StaleInputError(f"{RunDir(run).model_dir(name)}: trained with other settings ({', '.join(f'{k}={have[k]!r}' for k in diff)} "
                                  f"instead of {', '.join(repr(want[k]) for k in diff)}); use another --out")


def _stamp(path: Path) -> dict:
    p = storage.path(path)
    if isinstance(p, storage.ObjectPath):  # a checkpoint's pointer: rewritten whenever the checkpoint is
        info = p.info()
        return {"size": int(info["size"]), "stamp": storage.object_stamp(info)}
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _eval_key(ckpt, data, max_scans) -> dict:
    return {"checkpoint": _stamp(ckpt), "max_scans": max_scans, "split": "val", "data": str(storage.path(data).resolve())}


def _evaluated(run: Path, name: str, key: dict) -> bool:
    out = RunDir(run).study_eval(name)
    return (out / "stamp.json").is_file() and (out / METRICS_FILE).is_file() and read_json(out / "stamp.json") == key


def _diagnosis_key(ckpt, teacher_ckpt, max_scans) -> dict:
    return {"checkpoint": _stamp(ckpt), "teacher": _stamp(teacher_ckpt), "max_scans": max_scans, "split": "val"}


def _diagnosed(run: Path, label: str, teacher: str, key: dict) -> bool:
    path = RunDir(run).study_transfer(teacher, label)
    return path.is_file() and read_json(path).get("key") == key


def evaluate_and_diagnose(task) -> None:
    """One checkpoint's evaluation and its transfer diagnostics, as a task of the study's graph
    (each kept where evaluate_each and diagnose_each find it). No loader process: the graph's
    worker is one already, and the cores are shared out between its tasks."""
    run, label, ckpt, data, max_scans, backend, todo, threads = task
    with torch_threads(threads):
        evaluate_each(run, {label: ckpt}, data, max_scans, backend, workers=0)
        diagnose_each(run, todo, max_scans, backend)


def evaluate_each(run: Path, checkpoints: dict[str, str], data, max_scans, backend: str, progress=None, workers: int = 1) -> dict:
    """label -> metrics (as `m2skd eval` writes them) for each checkpoint, evaluated alone into
    RUN/study/eval/<label>/ and reused while the checkpoint file and the settings are unchanged."""
    results = {}
    for name, ckpt in checkpoints.items():
        out = RunDir(run).study_eval(name)
        key = _eval_key(ckpt, data, max_scans)
        stamp = out / "stamp.json"
        if _evaluated(run, name, key):
            results[name] = next(iter(read_json(out / METRICS_FILE).values()))
            continue
        report = run_eval([ckpt], split="val", data_root=data, out_dir=out, backend=backend, workers=workers,
                          max_scans=max_scans, progress=progress)
        results[name] = next(iter(report["results"].values()))
        write_json_atomic(stamp, key)
    return results


def diagnose_each(run: Path, todo: list[tuple[str, str, str, str]], max_scans, backend: str) -> dict:
    """teacher -> label -> transfer diagnostic of checkpoint to that teacher on the val scans,
    for each (label, checkpoint, teacher, teacher checkpoint) of `todo`; kept in
    RUN/study/transfer/<teacher>/<label>.json and reused while both files are unchanged."""
    out: dict[str, dict] = {}
    for label, ckpt, teacher, teacher_ckpt in todo:
        path = RunDir(run).study_transfer(teacher, label)
        key = _diagnosis_key(ckpt, teacher_ckpt, max_scans)
        if _diagnosed(run, label, teacher, key):
            out.setdefault(teacher, {})[label] = read_json(path)["result"]
            continue
        result = transfer_diagnostic(ckpt, teacher_ckpt, "val", max_scans=max_scans, backend=backend)
        write_json_atomic(path, {"key": key, "result": result})
        out.setdefault(teacher, {})[label] = result
    return out


def _instance_rate(metrics: dict, grouping: str, bucket: str, rate: str):
    for row in (metrics.get("instances") or {}).get(grouping, []):
        if row["bucket"] == bucket:
            return row[rate]
    return None


def effects(metrics: dict[str, dict], pairs: list[tuple[str, str]]) -> dict:
    """Paired effects of one teacher and arm: summary metrics, per class, per instance bucket,
    and, where every checkpoint has a "transfer" diagnostic (to this teacher), its metrics."""

    def delta(get):
        out = []
        for d, b in pairs:
            vd, vb = get(metrics[d]), get(metrics[b])
            out.append(None if vd is None or vb is None else vd - vb)
        return out

    first = metrics[pairs[0][0]]
    result = {key: paired_effect(delta(lambda m, k=key: m[k])) for key, _ in SUMMARY_METRICS}
    if all("transfer" in metrics[name] for pair in pairs for name in pair):
        result["transfer"] = {key: paired_effect(delta(lambda m, p=part, v=value: m["transfer"][p][v]))
                              for key, (part, value) in TRANSFER_METRICS.items()}
        for j, (bucket, _) in enumerate(POINT_BUCKETS):
            for value in ("kl", "agreement"):
                result["transfer"][f"{value} {bucket}"] = paired_effect(
                    delta(lambda m, j=j, v=value: m["transfer"]["by_points"][j][v]))
    result["per_class"] = {}
    for j, pc in enumerate(first["per_class"]):
        result["per_class"][pc["name"]] = {"hard": pc["hard"],
                                           **paired_effect(delta(lambda m, j=j: m["per_class"][j]["iou"]))}
    result["instances"] = {}
    for grouping in ("by_points", "by_range"):
        result["instances"][grouping] = {
            row["bucket"]: {rate: paired_effect(delta(lambda m, g=grouping, b=row["bucket"], r=rate: _instance_rate(m, g, b, r)))
                            for rate in INSTANCE_RATES}
            for row in (first.get("instances") or {}).get(grouping, [])}
    return result


CONTRAST = "hard-none"  # the rows of the hard-fused teacher's students against the single-scan teacher's


def contrast_pairs(pairs: dict[str, dict], arm: str) -> list[tuple[str, str]]:
    """(student of the hard teacher, student of the single-scan teacher) per seed, for one arm:
    their paired difference is what fusing hard instances adds over plain self-distillation."""
    return [(hard, none) for (hard, _), (none, _) in zip(pairs["hard"][arm], pairs["none"][arm])]


def effect_rows(teacher: str, arm: str, form: str, seeds, eff: dict) -> list[dict]:
    """Flat rows for the CSV and the terminal: teacher, arm, its logit form, group, metric, hard,
    mean, CI, n_seeds, per seed."""
    rows = []

    def add(group, metric, hard, e):
        row = {"teacher": teacher, "arm": arm, "kd_form": form, "group": group, "metric": metric, "hard": hard, "mean": e["mean"],
               "ci_low": e["ci_low"], "ci_high": e["ci_high"], "n_seeds": e["n"]}
        row.update({f"seed {s}": v for s, v in zip(seeds, e["per_seed"])})
        rows.append(row)

    for key, _ in SUMMARY_METRICS:
        add("summary", key, key == "hard_miou", eff[key])
    for key, e in eff.get("transfer", {}).items():
        add("transfer", key, not key.endswith("_all"), e)
    for name, e in eff["per_class"].items():
        add("class IoU", name, e["hard"], e)
    for grouping, buckets in eff["instances"].items():
        for bucket, rates in buckets.items():
            for rate, e in rates.items():
                add(f"instances {grouping.replace('by_', 'by ')}", f"{bucket} {rate.replace('_', ' ')}", True, e)
    return rows


def run_study(out_dir, seeds, size: str = "default", seed: int = 0, backend: str = "auto", arms: dict | None = None,
              overrides: dict | None = None, on_stage=None, progress_factory=None, teachers=("hard",)) -> dict:
    """Train (what is missing), evaluate (what is missing) and report the paired effects.

    `seed` fixes the data and teachers (the demo's `--seed`), `seeds` the student pairs;
    `arms` (label -> distillation overrides; default {"kl": {}}) and `teachers` (fusion modes of
    the teachers' input) what is compared, each against the same baselines (which live in OUT/run,
    so its data and teacher are always made).
    """
    t0 = time.perf_counter()
    seeds = sorted({int(s) for s in seeds})
    if not seeds:
        raise ValueError("a study needs at least one seed")
    arms = dict(arms or {"kl": {}})
    bad = [t for t in teachers if t not in FUSION_MODES]
    if bad or not teachers:
        raise ValueError(f"teachers must be among {FUSION_MODES}, got {list(teachers)}")
    teachers = tuple(t for t in TEACHERS if t in teachers)
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)
    shared = prepare_shared(out_dir, size, seed, backend, overrides, on_stage, progress_factory)
    run = shared["run"]
    by_teacher = {t: shared if t == "hard" else prepare_shared(out_dir, size, seed, backend, overrides, on_stage,
                                                                progress_factory, fusion=t)
                  for t in teachers}

    pairs: dict[str, dict] = {}
    students, arm_forms = {}, {}
    for t, t_shared in by_teacher.items():
        t_pairs, t_configs = plan_students(t_shared, seeds, seed, arms)
        pairs[t] = {arm: [(student_label(d, t), b) for d, b in arm_pairs] for arm, arm_pairs in t_pairs.items()}
        arm_forms = {arm: t_configs[arm_pairs[0][0]].kd_form for arm, arm_pairs in t_pairs.items()}
        distilled = {name: cfg for name, cfg in t_configs.items() if cfg.distill_enabled()}
        baselines = {name: cfg for name, cfg in t_configs.items() if not cfg.distill_enabled()}
        check_existing(t_shared["run"], distilled)
        check_existing(run, baselines)
        students |= {student_label(name, t): (t, name, cfg) for name, cfg in distilled.items()}
        students |= {name: ("hard", name, cfg) for name, cfg in baselines.items()}
    # the baselines live in OUT/run beside the method's teacher, which is always made
    fusions = {"hard": shared, **by_teacher}
    max_scans = SIZES[size].eval_scans
    checkpoints = {label: str(RunDir(fusions[t]["run"]).model(name)) for label, (t, name, _) in students.items()}
    checkpoints |= {teacher_label(t): str(RunDir(t_shared["run"]).model("teacher")) for t, t_shared in by_teacher.items()}
    # every student paired with a teacher, and the teacher itself on single scans (what fusion changes in its outputs)
    todo = [(label, checkpoints[label], t, checkpoints[teacher_label(t)]) for t in teachers
            for label in dict.fromkeys([n for arm_pairs in pairs[t].values() for pair in arm_pairs for n in pair]
                                       + [teacher_label(t)])]
    retrained = teachers_to_train(fusions)
    evaluations = _evaluation_tasks(run, checkpoints, todo, students, set(retrained), shared["data"], max_scans, backend,
                                    task_threads(shared["size"]))
    checkpoints |= train_all(fusions, students, on_stage, progress_factory, extra=evaluations, to_train=retrained)
    checkpoints |= {teacher_label(t): t_shared["teacher"] for t, t_shared in by_teacher.items()}

    announce("eval")
    metrics = evaluate_each(run, checkpoints, shared["data"], max_scans, backend, progress=bar("eval"))
    announce("transfer diagnostic")
    diagnostics = diagnose_each(run, todo, max_scans, backend)

    by_teacher_arm: dict[str, dict] = {}
    rows = []
    for t in teachers:
        with_transfer = {label: {**m, "transfer": diagnostics[t][label]} if label in diagnostics[t] else m
                         for label, m in metrics.items()}
        by_teacher_arm[t] = {arm: effects(with_transfer, arm_pairs) for arm, arm_pairs in pairs[t].items()}
        rows += [row for arm, eff in by_teacher_arm[t].items() for row in effect_rows(t, arm, arm_forms[arm], seeds, eff)]
    if "hard" in teachers and "none" in teachers:
        # the multi-scan contribution (DESIGN 3, controls): each seed's student of the hard-fused
        # teacher against the same seed's student of the single-scan teacher
        by_teacher_arm[CONTRAST] = {arm: effects(metrics, contrast_pairs(pairs, arm)) for arm in pairs["hard"]}
        rows += [row for arm, eff in by_teacher_arm[CONTRAST].items() for row in effect_rows(CONTRAST, arm, arm_forms[arm], seeds, eff)]
    table = pd.DataFrame(rows)
    out = RunDir(run).study
    out.mkdir(parents=True, exist_ok=True)
    storage.write_csv(table, out / "study.csv")
    effect_plot({f"teacher {t}, {arm}": eff for t, by_arm in by_teacher_arm.items() for arm, eff in by_arm.items()},
                out / "study.png", title=f"Distillation effect over {len(seeds)} paired seeds "
                                         f"(dot: mean, bar: 95% t-interval, ticks: seeds)")
    record = {
        "seeds": seeds, "data_seed": seed, "size": size, "teachers": list(teachers), "arms": arms,
        "pairs": pairs, "effects": by_teacher_arm,
        "standing": {t: teacher_standing(metrics, pairs[t], teacher_label(t), by_teacher[t]["run"]) for t in teachers},
        "checkpoints": {name: {"hard_miou": m["hard_miou"], "miou": m["miou"], "instances": m.get("instances"),
                               "transfer": {t: d[name] for t, d in diagnostics.items() if name in d}}
                        for name, m in metrics.items()},
        "seconds": time.perf_counter() - t0,
        "train_seconds": {label: _train_seconds(ckpt) for label, ckpt in checkpoints.items()},
    }
    write_json_atomic(out / "study.json", record)
    return {**record, "table": table, "out_dir": str(out)}


def _evaluation_tasks(run: Path, checkpoints: dict, todo: list, students: dict, retrained: set, data, max_scans,
                      backend: str, threads: int) -> dict:
    """("eval", label) -> Task for each checkpoint whose evaluation or a diagnostic is missing,
    or that a teacher trained now makes stale (its own, or one it is diagnosed against): in the
    training graph they run beside the trainings still under way, not one by one after the last.
    `retrained`: the fusions whose teachers are trained now."""
    teacher_of = {teacher_label(t): t for t in TEACHERS}
    own = {label: students[label][0] if label in students else teacher_of[label] for label in checkpoints}
    tasks = {}
    for label, ckpt in checkpoints.items():
        items = [item for item in todo if item[0] == label]
        teachers = {item[2] for item in items}
        needs = (label if label in students else ("teacher", own[label]), *sorted(("teacher", t) for t in teachers))
        exists = storage.path(ckpt).exists() and all(storage.path(item[3]).exists() for item in items)
        if (exists and not (teachers | {own[label]}) & retrained
                and _evaluated(run, label, _eval_key(ckpt, data, max_scans))
                and all(_diagnosed(run, label, t, _diagnosis_key(ckpt, t_ckpt, max_scans)) for _, _, t, t_ckpt in items)):
            continue
        tasks[("eval", label)] = Task(evaluate_and_diagnose, (run, label, ckpt, data, max_scans, backend, items, threads), needs)
    return tasks


def teacher_standing(metrics: dict, arm_pairs: dict, teacher: str, run) -> dict:
    """What a teacher could pass on, in absolute values (hard-class mIoU on val): the teacher on
    single scans, its cached targets (its argmax on its own input at single-scan points) per
    split, and the range of its students and of the baselines. Targets far better on train than
    on val are a teacher that has learnt its train scans by heart: they add little to the labels."""
    students = sorted({d for pairs in arm_pairs.values() for d, _ in pairs})
    baselines = sorted({b for pairs in arm_pairs.values() for _, b in pairs})
    cache = RunDir(run).cache_record
    targets = read_json(cache).get("target_quality_by_split", {}) if storage.path(cache).exists() else {}

    def spread(labels):
        values = [metrics[label]["hard_miou"] for label in labels]
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    return {"teacher_single_scan": metrics[teacher]["hard_miou"],
            "targets": {split: q["hard_miou"] for split, q in targets.items()},
            "students": spread(students), "baselines": spread(baselines)}


def _train_seconds(model_path):
    record = RunDir.of_model(model_path).train_record(model_label(model_path))
    return read_json(record).get("seconds") if record.is_file() else None
