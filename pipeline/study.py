"""`m2skd study`: the distillation effect over paired seeds, with 95% confidence intervals.

For each seed a distilled student and its baseline are trained on the same data, teacher and
cache (the demo's: `pipeline.demo` builds or reuses them), and evaluated on the same val scans;
the effect of a metric is distilled - baseline per seed, reported as its mean, 95% t-interval
over seeds and per-seed values, for hard-class mIoU, mIoU, each class's IoU and each
sparse-instance bucket (hit rate, point recall). Several logit forms (`kd_form`) can be
compared against the same baselines. Re-running with more seeds trains and evaluates only
what is missing: a finished student, or its evaluation, is never redone.

Outputs in RUN/study/: study.json, study.csv (one row per form and metric), study.png, and
per-checkpoint evaluations in eval/<name>/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from m2skd.atomic import read_json, write_json_atomic
from m2skd.errors import StaleInputError
from m2skd.losses import kd_weight_for
from m2skd.plots import effect_plot
from m2skd.stats import paired_effect

from .demo import SIZES, build_shared, final_model, plan_students, train_students
from .evaluate import run_eval

SUMMARY_METRICS = (("hard_miou", "hard-class mIoU"), ("miou", "mIoU"))
INSTANCE_RATES = ("hit_rate", "point_recall")


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
        record = run / name / "train.json"
        if not final_model(run, name).exists() or not record.is_file():
            continue
        have, want = _comparable(read_json(record)["config"]), _comparable(cfg.to_dict())
        diff = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        if diff:
            raise StaleInputError(f"{run / name}: trained with other settings ({', '.join(f'{k}={have[k]!r}' for k in diff)} "
                                  f"instead of {', '.join(repr(want[k]) for k in diff)}); use another --out")


def _stamp(path: Path) -> dict:
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def evaluate_each(run: Path, checkpoints: dict[str, str], data, max_scans, backend: str, progress=None) -> dict:
    """name -> metrics (as `m2skd eval` writes them) for each checkpoint, evaluated alone into
    RUN/study/eval/<name>/ and reused while the checkpoint file and the settings are unchanged."""
    results = {}
    for name, ckpt in checkpoints.items():
        out = run / "study" / "eval" / name
        key = {"checkpoint": _stamp(ckpt), "max_scans": max_scans, "split": "val", "data": str(Path(data).resolve())}
        stamp = out / "stamp.json"
        if stamp.is_file() and (out / "metrics.json").is_file() and read_json(stamp) == key:
            results[name] = read_json(out / "metrics.json")[name]
            continue
        report = run_eval([ckpt], split="val", data_root=data, out_dir=out, backend=backend, workers=1,
                          max_scans=max_scans, progress=progress)
        results[name] = report["results"][name]
        write_json_atomic(stamp, key)
    return results


def _instance_rate(metrics: dict, grouping: str, bucket: str, rate: str):
    for row in (metrics.get("instances") or {}).get(grouping, []):
        if row["bucket"] == bucket:
            return row[rate]
    return None


def effects(metrics: dict[str, dict], pairs: list[tuple[str, str]]) -> dict:
    """Paired effects of one form: summary metrics, per class, per instance bucket."""

    def delta(get):
        out = []
        for d, b in pairs:
            vd, vb = get(metrics[d]), get(metrics[b])
            out.append(None if vd is None or vb is None else vd - vb)
        return out

    first = metrics[pairs[0][0]]
    result = {key: paired_effect(delta(lambda m, k=key: m[k])) for key, _ in SUMMARY_METRICS}
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


def effect_rows(form: str, seeds, eff: dict) -> list[dict]:
    """Flat rows for the CSV and the terminal: form, group, metric, hard, n, mean, CI, per seed."""
    rows = []

    def add(group, metric, hard, e):
        row = {"kd_form": form, "group": group, "metric": metric, "hard": hard, "n": e["n"], "mean": e["mean"],
               "ci_low": e["ci_low"], "ci_high": e["ci_high"]}
        row.update({f"seed {s}": v for s, v in zip(seeds, e["per_seed"])})
        rows.append(row)

    for key, label in SUMMARY_METRICS:
        add("summary", label, key == "hard_miou", eff[key])
    for name, e in eff["per_class"].items():
        add("class IoU", name, e["hard"], e)
    for grouping, buckets in eff["instances"].items():
        for bucket, rates in buckets.items():
            for rate, e in rates.items():
                add(f"instances {grouping.replace('by_', 'by ')}", f"{bucket} {rate.replace('_', ' ')}", True, e)
    return rows


def run_study(out_dir, seeds, size: str = "default", seed: int = 0, backend: str = "auto", kd_forms=("kl",),
              overrides: dict | None = None, on_stage=None, progress_factory=None) -> dict:
    """Train (what is missing), evaluate (what is missing) and report the paired effects.

    `seed` fixes the data and teacher (the demo's `--seed`), `seeds` the student pairs;
    `kd_forms` the logit forms compared, each against the same baselines.
    """
    t0 = time.perf_counter()
    seeds = sorted({int(s) for s in seeds})
    if not seeds:
        raise ValueError("a study needs at least one seed")
    kd_forms = tuple(dict.fromkeys(kd_forms))
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)
    shared = build_shared(out_dir, size, seed, backend, overrides, on_stage, progress_factory)
    run = shared["run"]
    pairs, configs = plan_students(shared, seeds, seed, kd_forms)
    check_existing(run, configs)
    trained = train_students(shared, configs, on_stage, progress_factory)
    trained["teacher"] = shared["teacher"]

    announce("eval")
    metrics = evaluate_each(run, trained, shared["data"], SIZES[size].eval_scans, backend, progress=bar("eval"))
    by_form = {form: effects(metrics, form_pairs) for form, form_pairs in pairs.items()}
    rows = [row for form, eff in by_form.items() for row in effect_rows(form, seeds, eff)]
    table = pd.DataFrame(rows)
    out = run / "study"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "study.csv", index=False)
    effect_plot(by_form, out / "study.png", title=f"Distillation effect over {len(seeds)} paired seeds "
                                                 f"(dot: mean, bar: 95% t-interval, ticks: seeds)")
    record = {
        "seeds": seeds, "data_seed": seed, "size": size, "kd_forms": list(pairs), "pairs": pairs,
        "effects": by_form,
        "checkpoints": {name: {"hard_miou": m["hard_miou"], "miou": m["miou"], "instances": m.get("instances")}
                        for name, m in metrics.items()},
        "seconds": time.perf_counter() - t0,
        "train_seconds": {name: _train_seconds(run, name) for name in trained},
    }
    write_json_atomic(out / "study.json", record)
    return {**record, "table": table, "out_dir": str(out)}


def _train_seconds(run: Path, name: str):
    record = run / name / "train.json"
    return read_json(record).get("seconds") if record.is_file() else None
