"""eval and demo end to end at a tiny size: reports, .label submissions, comparison table."""
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from m2skd import semantickitti as sk
from m2skd.checkpoint import load_checkpoint
from m2skd.instances import instance_key
from m2skd.dataset_spec import load_spec
from m2skd.render import figure_px
from m2skd.transforms import voxel_coords
from m2skd.pipeline.demo import SIZES, run_demo
from m2skd.pipeline.evaluate import run_eval
from m2skd.pipeline.study import run_study

SPEC = load_spec()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny demo, and a copy of the reports it wrote (eval/, show/). Tests that add seeds or run
    a study rewrite the run's reports; the readers look at the copy, so no test depends on the
    order the others ran in."""
    out = tmp_path_factory.mktemp("demo")
    stages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_demo(out, size="tiny", backend="torch", on_stage=stages.append)
    # loky's leak heuristic replaces a student's worker (its memory grows 300 MB): no warning for that
    assert not [w for w in caught if "worker stopped" in str(w.message)]
    reports = tmp_path_factory.mktemp("demo_reports")
    for name in ("eval", "show"):
        shutil.copytree(out / "run" / name, reports / name)
    # when each run started (its TensorBoard file is named by that time) and when the teacher ended, before re-runs add more
    started = {name: min(float(p.name.split(".")[3]) for p in (out / "run" / name / "tensorboard").glob("events.out.tfevents.*"))
               for name in ("teacher", "baseline", "distilled")}
    (reports / "schedule.json").write_text(json.dumps({"stages": stages, "started": started,
                                                       "teacher_ended": (out / "run/teacher/model.pt").stat().st_mtime}))
    return out, result, reports


def test_demo_runs_every_stage_and_prints_a_comparison(demo):
    out, result, reports = demo
    table = result["table"]
    assert list(table["checkpoint"]) == ["baseline", "distilled", "teacher"]
    assert {"miou", "hard_miou", "bicycle", "person", "road"} <= set(table.columns)
    run = out / "run"
    for path in ("prepare/manifest.parquet", "teacher/model.pt", "teacher_cache/cache.json", "distilled/model.pt",
                 "baseline/model.pt"):
        assert (run / path).is_file(), path
    for path in ("eval/metrics.json", "eval/metrics.csv", "eval/per_class_iou.png", "eval/confusion_distilled.png"):
        assert (reports / path).is_file(), path
    metrics = json.loads((reports / "eval/metrics.json").read_text())
    for label, m in metrics.items():
        ious = [pc["iou"] for pc in m["per_class"]]
        assert len(ious) == 19 and m["miou"] == pytest.approx(np.mean(ious))
        hard = [pc["iou"] for pc in m["per_class"] if pc["hard"]]
        assert m["hard_miou"] == pytest.approx(np.mean(hard))
        assert m["points"] == sum(len(sk.read_scan(p)) for p in sorted((out / "data/sequences/08/velodyne").glob("*.bin")))
    effect = json.loads((reports / "eval/distillation_effect.json").read_text())
    by_name = table.set_index("checkpoint")
    assert effect["pairs"] == [["distilled", "baseline"]]
    assert effect["hard_miou"]["mean"] == pytest.approx(by_name.loc["distilled", "hard_miou"] - by_name.loc["baseline", "hard_miou"])
    assert result["effect"]["miou"]["per_seed"] == [pytest.approx(by_name.loc["distilled", "miou"] - by_name.loc["baseline", "miou"])]
    distilled = json.loads((run / "distilled/train.json").read_text())
    baseline = json.loads((run / "baseline/train.json").read_text())
    assert distilled["distill"] and not baseline["distill"]
    assert {k: v for k, v in distilled["config"].items() if not k.endswith("_weight")} == \
           {k: v for k, v in baseline["config"].items() if not k.endswith("_weight")}


def test_demo_trains_its_teacher_first_then_both_students_side_by_side(demo):
    """Two students fill the two workers: the teacher trains alone on every core first (a
    baseline beside it would leave the distilled student alone on one core after it)."""
    _, _, reports = demo
    schedule = json.loads((reports / "schedule.json").read_text())
    (train,) = [s for s in schedule["stages"] if s.startswith("train ")]
    assert train.startswith("train teacher (hard) on ") and train.endswith(", then distilled, baseline (2 at a time)")
    assert schedule["started"]["baseline"] >= int(schedule["teacher_ended"])
    assert schedule["started"]["distilled"] >= int(schedule["teacher_ended"])


def test_demo_rerun_resumes_without_retraining(demo):
    out, first, _ = demo
    stamp = (out / "run/teacher/model.pt").stat().st_mtime_ns
    again = run_demo(out, size="tiny", backend="torch")
    assert (out / "run/teacher/model.pt").stat().st_mtime_ns == stamp
    assert again["table"].equals(first["table"])


def test_demo_adds_student_seeds_to_a_finished_run(demo):
    out, _, _ = demo
    stamp = (out / "run/distilled/model.pt").stat().st_mtime_ns
    more = run_demo(out, size="tiny", backend="torch", student_seeds=[0, 1])
    assert (out / "run/distilled/model.pt").stat().st_mtime_ns == stamp
    assert list(more["table"]["checkpoint"]) == ["baseline", "baseline-s1", "distilled", "distilled-s1", "teacher"]
    assert len(more["effect"]["hard_miou"]["per_seed"]) == 2
    assert json.loads((out / "run/distilled-s1/train.json").read_text())["config"]["seed"] == 1
    only_one = run_demo(out, size="tiny", backend="torch", student_seeds=[1])  # never reuses seed 0's runs
    assert list(only_one["table"]["checkpoint"]) == ["baseline-s1", "distilled-s1", "teacher"]


def test_student_progress_counts_steps_while_the_runs_work(demo):
    """Off a terminal the students' progress must move while they train in their worker
    processes (steps summed over the runs), not only when a run ends."""
    out, _, _ = demo
    seen = {}

    def factory(name):
        seen[name] = calls = []
        return lambda **kwargs: calls.append(kwargs)

    run_demo(out, size="tiny", backend="torch", student_seeds=[2], progress_factory=factory)
    calls, steps = seen["train"], SIZES["tiny"].student_steps
    assert calls[0] == {"total": 2 * steps}
    # each step of either run adds one: 1, 2, ..., 2 * steps whatever the interleaving
    assert [c["set_to"] for c in calls[1:]] == list(range(1, 2 * steps + 1))


def test_saved_labels_read_back_as_the_predicted_classes(demo, tmp_path):
    out, _, _ = demo
    ckpt = out / "run/distilled/model.pt"
    run_eval([ckpt], split="val", data_root=out / "data", out_dir=tmp_path / "eval", save_labels=tmp_path / "sub",
             backend="torch", workers=0)
    model, meta = load_checkpoint(ckpt, backend="torch")
    model.eval()
    seq = sk.Sequence(out / "data", "08")
    for frame in seq.frames[:3]:
        written = tmp_path / "sub/distilled/sequences/08/predictions" / f"{frame}.label"
        raw = sk.read_label(written, learning_lut=SPEC.learning_lut)
        points = sk.read_scan(seq.scan_path(frame))
        assert len(raw) == len(points) and (raw >> 16 == 0).all()
        coords = np.concatenate([np.zeros((len(points), 1), np.int32), voxel_coords(points[:, :3], meta["config"]["voxel_size"])], 1)
        with torch.no_grad():
            pred = model(torch.from_numpy(coords), torch.from_numpy(points.copy())).logits.argmax(1).numpy()
        assert np.array_equal(SPEC.learning_lut[raw & 0xFFFF], pred)
        assert set(np.unique(raw)) <= set(SPEC.learning_map_inv.values())


def test_eval_reports_sparse_instances_of_every_hard_class_instance(demo):
    out, result, reports = demo
    seq = sk.Sequence(out / "data", "08")
    by_scan = []  # distinct hard-class instances per scan, straight from the label files
    for frame in seq.frames:
        raw = sk.read_label(seq.label_path(frame), learning_lut=SPEC.learning_lut)
        keys = instance_key(SPEC.learning_lut[raw & 0xFFFF].astype(np.int64), raw >> 16, SPEC.hard_mask)
        by_scan.append(len(np.unique(keys[keys > 0])))
    metrics = json.loads((reports / "eval/metrics.json").read_text())
    counts = None
    for label, m in metrics.items():
        inst = m["instances"]
        assert [r["bucket"] for r in inst["by_points"]] == ["1-9", "10-29", "30-99", "100+"]
        assert [r["bucket"] for r in inst["by_range"]] == ["0-15", "15-30", "30+"]
        for grouping in ("by_points", "by_range"):
            assert sum(r["count"] for r in inst[grouping]) == sum(by_scan)
            for r in inst[grouping]:
                assert set(r) == {"bucket", "count", "point_recall", "hit_rate"}
                assert (r["hit_rate"] is None) == (r["count"] == 0)
        counts = counts or [r["count"] for r in inst["by_points"]]
        assert [r["count"] for r in inst["by_points"]] == counts  # the same ground truth for every checkpoint
    assert (reports / "eval/instances.png").is_file() and (reports / "eval/instances.csv").is_file()
    assert list(result["instances"]["count"]) == counts + [r["count"] for r in metrics["baseline"]["instances"]["by_range"]]


def test_demo_writes_show_pictures_of_the_expected_size(demo):
    _, _, reports = demo
    show = reports / "show"
    record = json.loads((show / "show.json").read_text())
    assert record["bev"]["checkpoints"] == ["baseline", "distilled", "teacher"]
    assert Image.open(show / "bev.png").size == figure_px(4)  # ground truth + 3 checkpoints
    assert Image.open(show / "fusion.png").size == figure_px(2, 2)
    assert record["fusion"]["fused_points"] > 0
    assert record["cache"]["checkpoints"] == ["teacher cache (argmax)", "baseline", "distilled"]
    assert Image.open(show / "cache.png").size == figure_px(4)


def test_study_resumes_adding_seeds_and_forms_without_retraining(demo):
    out, _, _ = demo
    run = out / "run"
    first = run_study(out, [0, 1], size="tiny", backend="torch")
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/model.pt")}
    evals = {p.parent.name: p.stat().st_mtime_ns for p in (run / "study/eval").glob("*/metrics.json")}
    assert {"distilled", "baseline", "distilled-s1", "baseline-s1", "teacher"} <= set(stamps) and set(evals) >= {"distilled-s1"}
    assert first["pairs"] == {"hard": {"kl": [("distilled", "baseline"), ("distilled-s1", "baseline-s1")]}}

    arms = {"kl": {"kd_form": "kl"}, "release": {"kd_form": "release"}, "kdh4": {"kd_hard_weight": 4.0}}
    second = run_study(out, [0, 1, 2], size="tiny", backend="torch", arms=arms)
    for name, stamp in stamps.items():
        assert (run / name / "model.pt").stat().st_mtime_ns == stamp, f"{name} was retrained"
    for name, stamp in evals.items():
        assert (run / "study/eval" / name / "metrics.json").stat().st_mtime_ns == stamp, f"{name} was re-evaluated"
    for name in ("distilled-s2", "baseline-s2", "distilled-release", "distilled-release-s1", "distilled-release-s2"):
        assert (run / name / "model.pt").is_file(), name
    assert json.loads((run / "distilled-release-s2/train.json").read_text())["config"]["kd_form"] == "release"
    assert json.loads((run / "distilled-kdh4-s1/train.json").read_text())["config"]["kd_hard_weight"] == 4.0

    record = json.loads((run / "study/study.json").read_text())
    assert record["seeds"] == [0, 1, 2] and record["arms"] == arms and record["teachers"] == ["hard"]
    assert record["pairs"]["hard"]["release"] == [["distilled-release", "baseline"], ["distilled-release-s1", "baseline-s1"],
                                                  ["distilled-release-s2", "baseline-s2"]]
    for form, pairs in record["pairs"]["hard"].items():
        metric = lambda name: json.loads((run / "study/eval" / name / "metrics.json").read_text())[name]["hard_miou"]
        deltas = [metric(d) - metric(b) for d, b in pairs]
        e = record["effects"]["hard"][form]["hard_miou"]
        mean = sum(deltas) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in deltas) / 2)
        half = 4.3026527 * sd / math.sqrt(3)  # t_{0.975, 2} from a printed table
        assert e["per_seed"] == pytest.approx(deltas) and e["mean"] == pytest.approx(mean)
        assert e["ci_low"] == pytest.approx(mean - half, abs=1e-7) and e["ci_high"] == pytest.approx(mean + half, abs=1e-7)
        assert set(record["effects"]["hard"][form]["per_class"]) == set(SPEC.class_names[1:])
        assert set(record["effects"]["hard"][form]["instances"]["by_points"]) == {"1-9", "10-29", "30-99", "100+"}
        assert set(record["effects"]["hard"][form]["transfer"]) >= {"kl_hard", "kl_all", "agreement_hard", "agreement_all"}
    table = second["table"]
    assert len(table[(table["group"] == "summary")]) == 6 and {"seed 0", "seed 1", "seed 2"} <= set(table.columns)
    summary = table[table["group"] == "summary"].set_index(["arm", "metric"])
    assert summary.loc[("kdh4", "hard_miou"), "kd_form"] == "kl" and summary.loc[("release", "miou"), "kd_form"] == "release"
    assert (run / "study/study.csv").is_file() and (run / "study/study.png").is_file()
