"""eval and demo end to end at a tiny size: reports, .label submissions, comparison table."""
import json

import numpy as np
import pytest
import torch

from m2skd import semantickitti as sk
from m2skd.dataset_spec import load_spec
from m2skd.trainer import load_checkpoint
from m2skd.transforms import voxel_coords
from pipeline.demo import run_demo
from pipeline.evaluate import run_eval

SPEC = load_spec()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, size="tiny", backend="torch")


def test_demo_runs_every_stage_and_prints_a_comparison(demo):
    out, result = demo
    table = result["table"]
    assert list(table["checkpoint"]) == ["baseline", "distilled", "teacher"]
    assert {"miou", "hard_miou", "bicycle", "person", "road"} <= set(table.columns)
    run = out / "run"
    for path in ("prepare/manifest.parquet", "teacher/model.pt", "teacher_cache/cache.json", "distilled/model.pt",
                 "baseline/model.pt", "eval/metrics.json", "eval/metrics.csv", "eval/per_class_iou.png",
                 "eval/confusion_distilled.png"):
        assert (run / path).is_file(), path
    metrics = json.loads((run / "eval/metrics.json").read_text())
    for label, m in metrics.items():
        ious = [pc["iou"] for pc in m["per_class"]]
        assert len(ious) == 19 and m["miou"] == pytest.approx(np.mean(ious))
        hard = [pc["iou"] for pc in m["per_class"] if pc["hard"]]
        assert m["hard_miou"] == pytest.approx(np.mean(hard))
        assert m["points"] == sum(len(sk.read_scan(p)) for p in sorted((out / "data/sequences/08/velodyne").glob("*.bin")))
    effect = json.loads((run / "eval/distillation_effect.json").read_text())
    by_name = table.set_index("checkpoint")
    assert effect["pairs"] == [["distilled", "baseline"]]
    assert effect["hard_miou"]["mean"] == pytest.approx(by_name.loc["distilled", "hard_miou"] - by_name.loc["baseline", "hard_miou"])
    assert result["effect"]["miou"]["per_seed"] == [pytest.approx(by_name.loc["distilled", "miou"] - by_name.loc["baseline", "miou"])]
    distilled = json.loads((run / "distilled/train.json").read_text())
    baseline = json.loads((run / "baseline/train.json").read_text())
    assert distilled["distill"] and not baseline["distill"]
    assert {k: v for k, v in distilled["config"].items() if not k.endswith("_weight")} == \
           {k: v for k, v in baseline["config"].items() if not k.endswith("_weight")}


def test_demo_rerun_resumes_without_retraining(demo):
    out, first = demo
    stamp = (out / "run/teacher/model.pt").stat().st_mtime_ns
    again = run_demo(out, size="tiny", backend="torch")
    assert (out / "run/teacher/model.pt").stat().st_mtime_ns == stamp
    assert again["table"].equals(first["table"])


def test_demo_adds_student_seeds_to_a_finished_run(demo):
    out, first = demo
    stamp = (out / "run/distilled/model.pt").stat().st_mtime_ns
    more = run_demo(out, size="tiny", backend="torch", student_seeds=[0, 1])
    assert (out / "run/distilled/model.pt").stat().st_mtime_ns == stamp
    assert list(more["table"]["checkpoint"]) == ["baseline", "baseline-s1", "distilled", "distilled-s1", "teacher"]
    assert len(more["effect"]["hard_miou"]["per_seed"]) == 2
    assert json.loads((out / "run/distilled-s1/train.json").read_text())["config"]["seed"] == 1
    only_one = run_demo(out, size="tiny", backend="torch", student_seeds=[1])  # never reuses seed 0's runs
    assert list(only_one["table"]["checkpoint"]) == ["baseline-s1", "distilled-s1", "teacher"]
    run_demo(out, size="tiny", backend="torch")  # leave the fixture's eval reports as they were


def test_saved_labels_read_back_as_the_predicted_classes(demo, tmp_path):
    out, _ = demo
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
