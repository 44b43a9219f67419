"""`m2skd study` with the paper's controls at the tiny size: two teachers (none, hard) and two
seeds, shared baselines, transfer diagnostics, and a re-run that adds only what is missing."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from m2skd.dataset_spec import load_spec
from m2skd.pipeline.demo import SIZES, plan_students
from m2skd.pipeline.study import run_study

SPEC = load_spec()
HARD_NAMES = [SPEC.class_names[c] for c in SPEC.hard_classes]
FAST = {"val_every": 0}  # no validation during training: the study evaluates every checkpoint itself


def _mtimes(paths):
    return {str(p): p.stat().st_mtime_ns for p in paths}


def test_study_of_two_teachers_pairs_shared_baselines_and_resumes(tmp_path):
    out = tmp_path / "study"
    run, control = out / "run", out / "run-none"
    first = run_study(out, [0], size="tiny", backend="torch", teachers=("hard",), overrides=FAST)
    assert first["pairs"] == {"hard": {"kl": [("distilled", "baseline")]}}
    assert not control.exists()
    done = _mtimes(list(run.glob("*/model.pt")) + list((run / "study").rglob("*.json")))
    assert {p.split("/")[-2] for p in done if p.endswith("model.pt")} == {"teacher", "distilled", "baseline"}

    second = run_study(out, [0, 1], size="tiny", backend="torch", teachers=("none", "hard"), overrides=FAST)
    # what existed was neither retrained, re-evaluated nor re-diagnosed
    for path, stamp in done.items():
        if not path.endswith("study.json"):
            assert os.stat(path).st_mtime_ns == stamp, path
    # the control teacher has its own prepared data, teacher and cache; its students live beside it,
    # the baselines only in run/ (trained once per seed, shared by both teachers)
    assert (control / "prepare" / "manifest.parquet").is_file() and (control / "teacher_cache" / "cache.json").is_file()
    assert json.loads((control / "prepare" / "config.json").read_text())["config"]["fusion"]["mode"] == "none"
    assert {p.parent.name for p in control.glob("*/model.pt")} == {"teacher", "distilled", "distilled-s1"}
    assert {p.parent.name for p in run.glob("*/model.pt")} == {"teacher", "distilled", "distilled-s1", "baseline", "baseline-s1"}
    record = json.loads((run / "study" / "study.json").read_text())
    assert record["teachers"] == ["none", "hard"] and record["seeds"] == [0, 1]
    assert record["pairs"] == {"none": {"kl": [["distilled@none", "baseline"], ["distilled-s1@none", "baseline-s1"]]},
                               "hard": {"kl": [["distilled", "baseline"], ["distilled-s1", "baseline-s1"]]}}

    # the transfer effects are paired differences of the diagnostics to each pair's own teacher
    for teacher, tag in (("none", "@none"), ("hard", "")):
        diag = lambda label: json.loads((run / "study" / "transfer" / teacher / f"{label}.json").read_text())["result"]
        deltas = [diag(f"distilled{s}{tag}")["hard"]["kl"] - diag(f"baseline{s}")["hard"]["kl"] for s in ("", "-s1")]
        e = record["effects"][teacher]["kl"]["transfer"]["kl_hard"]
        assert e["per_seed"] == pytest.approx(deltas) and e["mean"] == pytest.approx(sum(deltas) / 2) and e["n"] == 2
        assert diag("baseline")["source"] == "cache"  # the study caches the teachers' val targets
        assert diag("baseline")["teacher"].endswith(f"{'run-none' if teacher == 'none' else 'run'}/teacher/model.pt")
    # a baseline is diagnosed against each teacher: different targets, different KL
    kl_to = {t: json.loads((run / "study" / "transfer" / t / "baseline.json").read_text())["result"]["all"]["kl"]
             for t in ("none", "hard")}
    assert kl_to["none"] != kl_to["hard"]

    table = pd.read_csv(run / "study" / "study.csv")
    assert {"teacher", "kd_form", "metric", "mean", "ci_low", "ci_high", "n_seeds", "seed 0", "seed 1"} <= set(table.columns)
    for teacher in ("none", "hard"):
        metrics = set(table[table["teacher"] == teacher]["metric"])
        assert {"hard_miou", "miou", "kl_hard", "kl_all", "agreement_hard", *HARD_NAMES} <= metrics
    # the multi-scan contribution: each seed's student of the hard teacher less that of the single-scan one
    contrast = table[(table["teacher"] == "hard-none") & (table["metric"] == "hard_miou")].iloc[0]
    got = record["checkpoints"]
    expected = [got[f"distilled{s}"]["hard_miou"] - got[f"distilled{s}@none"]["hard_miou"] for s in ("", "-s1")]
    assert [contrast["seed 0"], contrast["seed 1"]] == pytest.approx(expected)
    assert record["effects"]["hard-none"]["kl"]["hard_miou"]["per_seed"] == pytest.approx(expected)
    assert not set(table[table["teacher"] == "hard-none"]["group"]) & {"transfer"}
    # each teacher's standing: its own figures, its cache's per-split targets, its students and the baselines
    for teacher, tag, where in (("none", "@none", control), ("hard", "", run)):
        st = record["standing"][teacher]
        assert st["teacher_single_scan"] == got[f"teacher{tag}"]["hard_miou"]
        cached = json.loads((where / "teacher_cache" / "cache.json").read_text())["target_quality_by_split"]
        assert st["targets"] == {split: q["hard_miou"] for split, q in cached.items()} and "train" in st["targets"]
        students = [got[f"distilled{s}{tag}"]["hard_miou"] for s in ("", "-s1")]
        assert st["students"] == pytest.approx({"mean": sum(students) / 2, "min": min(students), "max": max(students)})
    row = table[(table["teacher"] == "none") & (table["metric"] == "hard_miou")].iloc[0]
    assert row["n_seeds"] == 2 and row["kd_form"] == "kl"
    assert row["mean"] == pytest.approx((row["seed 0"] + row["seed 1"]) / 2)
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    assert second["table"].shape == table.shape

    # a third run with nothing missing trains, evaluates and diagnoses nothing
    everything = _mtimes([p for p in out.rglob("*") if p.is_file() and p.suffix in (".pt", ".json") and p.name != "study.json"])
    run_study(out, [0, 1], size="tiny", backend="torch", teachers=("hard", "none"), overrides=FAST)
    changed = [p for p, stamp in _mtimes(map(Path, everything)).items() if everything[p] != stamp]
    # only the records prepare and cache-teacher rewrite after checking their outputs
    assert not [p for p in changed if not p.endswith(("teacher_cache/cache.json", "prepare/config.json"))], changed


def test_arms_share_one_baseline_and_may_not_change_it():
    shared = {"size": SIZES["tiny"], "base": {"backend": "torch"}}
    pairs, configs = plan_students(shared, [0, 3], 0, {"kl": {}, "kdh4": {"kd_hard_weight": 4.0, "affinity_weight": 0.0}})
    assert pairs == {"kl": [("distilled", "baseline"), ("distilled-s3", "baseline-s3")],
                     "kdh4": [("distilled-kdh4", "baseline"), ("distilled-kdh4-s3", "baseline-s3")]}
    assert configs["distilled-kdh4-s3"].kd_hard_weight == 4.0 and configs["distilled-kdh4-s3"].affinity_weight == 0.0
    assert configs["distilled-kdh4-s3"].seed == configs["baseline-s3"].seed == 3
    assert configs["distilled"].kd_hard_weight == 5.0 and configs["baseline"].kd_hard_weight == 1.0
    with pytest.raises(ValueError, match="lr"):
        plan_students(shared, [0], 0, {"kl": {}, "fast": {"lr": 0.05}})


def test_every_size_is_offered_by_the_cli():
    from m2skd import cli

    sizes = next(p for p in cli.main.commands["study"].params if p.name == "size").type.choices
    assert set(sizes) == set(SIZES)
