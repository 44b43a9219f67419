"""Stage integrity: stale inputs refused, nothing lost, bad input named in one line,
frames by number, the moving decision over the window, real-class predictions, same bits."""
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from m2skd import cli
from m2skd import semantickitti as sk
from m2skd.atomic import sweep_temporaries, temp_path
from m2skd.checkpoint import load_checkpoint
from m2skd.dataset_spec import MANIFEST_DIR, load_spec
from m2skd.errors import DataError, StaleInputError
from m2skd.fusion import Frame, FusionConfig, fuse
from m2skd.inference import predict
from m2skd.manifest import read_manifest
from m2skd.ragged import RaggedReader
from m2skd.rundir import RunDir
from m2skd.train_config import TrainConfig
from m2skd.trainer import current_model, train
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache
from m2skd.pipeline.evaluate import run_eval
from m2skd.pipeline.prepare import PrepareConfig, run_prepare

SPEC = load_spec()
TINY = TrainConfig(depth=18, widths=(8, 16, 16, 16, 16, 16, 12, 12), stem_width=8, backend="torch", voxel_size=0.4,
                   steps=2, batch_size=2, lr=0.01, workers=0, checkpoint_every=1, val_every=0, log_every=1)
CACHE = CacheConfig(backend="torch", device="cpu")


def cli_run(*args):
    """(exit code, output) of an in-process CLI call; the output must never hold a traceback."""
    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def one_line_error(args, *must_contain):
    code, out = cli_run(*args)
    assert code != 0, out
    lines = [line for line in out.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, out
    for text in must_contain:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]


def copy_sequences(src, dst, sequences):
    for name in sequences:
        shutil.copytree(src / "sequences" / name, dst / "sequences" / name)
    return dst


@pytest.fixture(scope="module")
def chain(small_dataset, tmp_path_factory):
    """prepare -> teacher -> cache on the train and val sequences."""
    run = tmp_path_factory.mktemp("chain")
    run_prepare(small_dataset, run, PrepareConfig(FusionConfig(), frames_per_shard=4), splits=("train", "val"))
    teacher = train(run, "teacher", TINY, name="teacher")
    run_cache(run, teacher["checkpoint"], CACHE)
    return run


# --- 1. the fingerprint chain --------------------------------------------------------------

# A changed value for every kind of setting; a new text setting must say what else it can be.
OTHER_TEXT = {"mode": "all", "align": "icp", "dataset": str(MANIFEST_DIR / "semantickitti.yaml")}


def changed_settings(cfg):
    """(path, config with that one setting changed) for every leaf setting of a PrepareConfig,
    nested ones (the fusion settings) included, found from the dataclass fields."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for path, inner in changed_settings(value):
                yield f"{f.name}.{path}", dataclasses.replace(cfg, **{f.name: inner})
            continue
        if isinstance(value, bool):
            other = not value
        elif isinstance(value, int):
            other = value + 1
        elif isinstance(value, float):
            other = value * 1.5
        elif isinstance(value, tuple) or value is None:  # hard classes: None is the description's set
            other = (2, 6)
        elif isinstance(value, str):
            assert f.name in OTHER_TEXT, f"{f.name}: add another valid value to OTHER_TEXT"
            other = OTHER_TEXT[f.name]
        else:
            raise AssertionError(f"{f.name}: no changed value for a {type(value).__name__}")
        yield f.name, dataclasses.replace(cfg, **{f.name: other})


def test_prepare_fingerprint_covers_its_settings(small_dataset, tmp_path):
    """Every setting of prepare's configuration changes its fingerprint, and a re-prepare with any
    one of them changed finds the existing shards stale instead of reusing them."""
    base = PrepareConfig(FusionConfig(), frames_per_shard=8)
    run_prepare(small_dataset, tmp_path, base, sequences=("00",))
    again = run_prepare(small_dataset, tmp_path, base, sequences=("00",))
    assert again["shards_written"] == 0  # same settings: reused
    seen = set()
    for path, cfg in changed_settings(base):
        seen.add(path)
        assert cfg.fingerprint() != base.fingerprint(), path
        with pytest.raises(StaleInputError, match="prepared with another configuration"):
            run_prepare(small_dataset, tmp_path, cfg, sequences=("00",))
    fusion = {f"fusion.{f.name}" for f in dataclasses.fields(FusionConfig)}
    assert seen >= fusion | {"frames_per_shard", "dataset", "hard_classes"}, seen  # the walk reaches them all


def test_changed_prepare_is_refused_downstream(chain, small_dataset, tmp_path):
    """A re-prepare with other alignment: the teacher (and so its cache) no longer fits."""
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    run_prepare(small_dataset, run, PrepareConfig(FusionConfig(align="icp"), frames_per_shard=4), splits=("train", "val"),
                overwrite=True)
    with pytest.raises(StaleInputError, match=r"trained on other prepared shards \(manifest \w+ != \w+.*train-teacher"):
        run_cache(run, None, CACHE)
    with pytest.raises(StaleInputError, match=r"cache.json: made from other prepared shards .*cache-teacher"):
        train(run, "student", TINY, name="student")


def test_retrained_teacher_makes_the_cache_stale(chain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    train(run, "teacher", dataclasses.replace(TINY, seed=5), name="teacher", overwrite=True)
    with pytest.raises(StaleInputError, match=r"made by another teacher .*\(teacher \w+ != \w+\).*cache-teacher"):
        train(run, "student", TINY, name="student")
    run_cache(run, None, CACHE)  # the re-run the message asks for
    assert train(run, "student", TINY, name="student")["checkpoint"]


def test_distillation_settings_never_make_a_teacher_stale(chain):
    """Tuning the distillation changes what a distilled student computes, not what the teacher
    computed: the teacher stays current; a setting it trains with makes it stale."""
    tuned = dataclasses.replace(TINY, kd_form="release", kd_weight=0.3, kd_hard_weight=5.0, affinity_weight=2.0,
                                affinity_form="class", affinity_max_points=8, feature_layer="dec4")
    assert current_model(chain, "teacher", "teacher", TINY)
    assert current_model(chain, "teacher", "teacher", tuned)
    assert current_model(chain, "teacher", "teacher", dataclasses.replace(TINY, lr=TINY.lr * 2)) is None


def test_cache_feature_layer_must_match_the_student(chain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    student = dataclasses.replace(TINY, feature_layer="dec3")
    with pytest.raises(StaleInputError, match="holds dec4_preact features but the student distils feature_layer=dec3"):
        train(run, "student", student, name="student")
    run_cache(run, None, dataclasses.replace(CACHE, feature_layer="dec3"))
    assert json.loads((RunDir(run).teacher_cache / "cache.json").read_text())["feature_layer"] == "dec3"
    assert train(run, "student", student, name="student")["checkpoint"]


def stored_vs_exact_kl(run, teacher_path) -> np.ndarray:
    """KL at T, per single-scan point of every cached scan, of the stored targets against the
    teacher's fp32 outputs recomputed now."""
    from m2skd.teacher_cache import kl_per_point, stored_logits
    from m2skd.pipeline.cache_teacher import teacher_outputs

    model, ckpt = load_checkpoint(teacher_path, "torch", "cpu")
    model.eval()
    df, _ = read_manifest(RunDir(run).manifest)
    out = []
    for _, row in df[df["split"] == "train"].iterrows():
        data = RaggedReader(RunDir(run).prepare / row["shard"]).read(int(row["shard_index"]))
        logits, _ = teacher_outputs(model, data["points"], ckpt["config"]["voxel_size"], "dec4", "cpu")
        cache = RaggedReader(RunDir(run).teacher_cache / row["shard"])
        stored = stored_logits(cache, int(row["shard_index"]), SPEC.num_classes)
        out.append(kl_per_point(logits[: int(row["n_single"])], stored, TINY.temperature))
    return np.concatenate(out)


def test_short_trained_teacher_caches_with_the_default_encoding(chain, tmp_path):
    """A few-step teacher (batch-norm statistics at their start) gives logits far beyond fp16;
    a softmax needs only their differences, and the default encoding stores those: the stored
    targets give the teacher's softmax at T within sq6's bound (max 4 C h^2, h = 1/126)."""
    from m2skd.teacher_cache import DEFAULT_LOGIT_ENCODING

    assert DEFAULT_LOGIT_ENCODING == "sq6"
    bound = 4 * SPEC.num_classes * (0.5 / 63) ** 2
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    path = run / "teacher" / "model.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["classifier.weight"] *= 1e7  # logits ~1e5-1e7, as a 3-step teacher's can be
    torch.save(ckpt, path)
    summary = run_cache(run, None, CACHE)
    record = json.loads((RunDir(run).teacher_cache / "cache.json").read_text())
    assert record["logit_encoding"] == "sq6" and record["cache_format"] == 2, summary
    kl = stored_vs_exact_kl(run, path)
    assert kl.size == summary["points"] and kl.max() <= bound and record["kl_max"] <= bound, (kl.max(), record["kl_max"])
    assert abs(record["kl_stored_vs_exact"] - kl.mean()) < 1e-6
    assert train(run, "student", TINY, name="student")["checkpoint"]


def test_chain_cache_matches_the_teacher_within_the_bound(chain):
    """The 2-step teacher of the chain fixture, cached with the defaults."""
    kl = stored_vs_exact_kl(chain, chain / "teacher" / "model.pt")
    assert kl.max() <= 4 * SPEC.num_classes * (0.5 / 63) ** 2


def test_nan_teacher_is_refused_in_one_line(chain, tmp_path):
    """NaN is the one output no encoding can store: one line naming the teacher and the scan,
    from a worker process too; the previous cache stays as it was."""
    assert pickle.loads(pickle.dumps(DataError("f.pt", "why"))).path == "f.pt"  # crosses joblib
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    path = run / "teacher" / "model.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["classifier.weight"][:] = float("nan")
    torch.save(ckpt, path)
    before = (RunDir(run).teacher_cache / "cache.json").read_bytes()
    line = one_line_error(["cache-teacher", run, "--overwrite", "--jobs", "2"], f"{path}: scan ", "NaN")
    assert re.search(r"scan \d\d/\d{6}: ", line), line
    assert (RunDir(run).teacher_cache / "cache.json").read_bytes() == before


def test_old_cache_format_is_refused_by_the_student(chain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    record_path = RunDir(run).teacher_cache / "cache.json"
    record = json.loads(record_path.read_text())
    record.pop("cache_format")
    record_path.write_text(json.dumps(record))
    with pytest.raises(StaleInputError, match=r"cache.json: stored in cache format None, this version reads 2; re-run"):
        train(run, "student", TINY, name="student")


# --- 2. a partial prepare adds ---------------------------------------------------------------

def test_prepare_of_another_split_adds_to_the_manifest(small_dataset, tmp_path):
    cfg = PrepareConfig(FusionConfig(), frames_per_shard=4)
    run_prepare(small_dataset, tmp_path, cfg, splits=("train", "val"))
    summary = run_prepare(small_dataset, tmp_path, cfg, splits=("test",))
    df, _ = read_manifest(RunDir(tmp_path).manifest)
    assert sorted(df["split"].unique()) == ["test", "train", "val"] and len(df) == summary["scans"] == 24
    assert summary["shards_written"] == 2  # only the test sequence's shards


# --- 3. frames by number -------------------------------------------------------------------

def test_missing_frame_shifts_no_pose(small_dataset, tmp_path):
    """Without 000005, scan 000006 fuses 000004..000002 exactly as in the full sequence."""
    full_run, gap_run = tmp_path / "full", tmp_path / "gap"
    data = copy_sequences(small_dataset, tmp_path / "data", ["00"])
    cfg = PrepareConfig(FusionConfig(k=4), frames_per_shard=8)
    run_prepare(data, full_run, cfg)
    for sub, ext in (("velodyne", "bin"), ("labels", "label")):
        (data / "sequences/00" / sub / f"000005.{ext}").unlink()
    run_prepare(data, gap_run, cfg)
    full, _ = read_manifest(RunDir(full_run).manifest)
    gap, _ = read_manifest(RunDir(gap_run).manifest)
    assert list(gap["frame"]) == [0, 1, 2, 3, 4, 6, 7]

    def scan(run, df, frame):
        row = df[df["frame"] == frame].iloc[0]
        return RaggedReader(RunDir(run).prepare / row["shard"]).read(int(row["shard_index"]))

    a, b = scan(full_run, full, 6), scan(gap_run, gap, 6)
    assert (a["source"] == 1).any() and not (b["source"] == 1).any()  # frame 5 was t-1
    for source in (2, 3, 4):
        pa, pb = a["points"][a["source"] == source], b["points"][b["source"] == source]
        assert len(pa) > 0 or source == 4
        np.testing.assert_allclose(pb, pa, atol=1e-5)


def test_non_numeric_scan_name_is_named(small_dataset, tmp_path):
    data = copy_sequences(small_dataset, tmp_path / "data", ["08"])
    os.rename(data / "sequences/08/velodyne/000003.bin", data / "sequences/08/velodyne/scan.bin")
    one_line_error(["prepare", data, tmp_path / "run"], "scan.bin", "not a frame number")
    assert not (tmp_path / "run" / "prepare" / "config.json").exists()


# --- 4. moving instances decided over the window -------------------------------------------

def _instance_frame(center, semantic, pose=np.eye(4), n=40, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(0, 0.2, (n, 3)) + center
    points = np.concatenate([xyz, np.zeros((n, 1))], 1).astype(np.float32)
    raw = np.full(n, semantic | (7 << 16), np.uint32)
    return Frame(points, raw, SPEC.learning_lut[raw & 0xFFFF].astype(np.uint8), pose)


@pytest.mark.parametrize("previous_label,moves", [(254, 1.0), (30, 1.0), (30, 0.05)])
def test_moving_decided_over_the_window(previous_label, moves):
    """Scan t labels the person static (30); whether the fused points are moved onto it depends on
    the window: a moving-person (254) label in scan t-1, or a world-frame centroid travelling
    further than the threshold. A small drift is kept as it is (a static instance)."""
    current = _instance_frame(np.array([10.0, 0, 0]), 30)
    previous = _instance_frame(np.array([10.0 - moves, 0, 0]), previous_label, seed=1)
    fused = fuse(current, [(1, previous)], SPEC.hard_mask, SPEC.moving_lut, FusionConfig(k=1, moving_threshold_m=0.5))
    gap = np.linalg.norm(fused.points[:, :3].mean(0) - current.points[:, :3].mean(0))
    if previous_label == 254 or moves > 0.5:
        assert gap < 1e-5  # aligned onto the instance in scan t
    else:
        assert gap == pytest.approx(np.linalg.norm(previous.points[:, :3].mean(0) - current.points[:, :3].mean(0)), abs=1e-5)


# --- 5. bad input: one line naming the file -------------------------------------------------

@pytest.fixture(scope="module")
def empty_scan_run(small_dataset, tmp_path_factory):
    """A dataset whose val scan 000002 is an empty (0-byte) file, prepared, trained, cached."""
    root = tmp_path_factory.mktemp("empty")
    data = copy_sequences(small_dataset, root / "data", ["00", "08"])
    for seq in ("00", "08"):
        (data / f"sequences/{seq}/velodyne/000002.bin").write_bytes(b"")
        (data / f"sequences/{seq}/labels/000002.label").write_bytes(b"")
    run = root / "run"
    run_prepare(data, run, PrepareConfig(FusionConfig(), frames_per_shard=4))
    teacher = train(run, "teacher", TINY, name="teacher")
    run_cache(run, teacher["checkpoint"], CACHE)
    return data, run, teacher["checkpoint"]


def test_empty_scan_has_no_points_and_no_predictions(empty_scan_run, tmp_path):
    data, run, teacher = empty_scan_run
    df, _ = read_manifest(RunDir(run).manifest)
    assert (df[df["frame"] == 2]["n_single"] == 0).all()
    cache = RaggedReader(RunDir(run).teacher_cache / df[(df["sequence"] == "00") & (df["frame"] == 2)].iloc[0]["shard"])
    assert cache.offsets[3] - cache.offsets[2] == 0  # no targets for the empty scan
    assert train(run, "student", TINY, name="student")["checkpoint"]
    report = run_eval([teacher], split="val", data_root=data, out_dir=tmp_path / "eval", save_labels=tmp_path / "labels",
                      backend="torch", device="cpu", workers=0)
    assert report["results"]["teacher"]["scans"] == 8
    assert (tmp_path / "labels/teacher/sequences/08/predictions/000002.label").stat().st_size == 0


def test_truncated_chunk_is_named_and_repaired_by_a_rerun(chain, small_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    shard = RunDir(run).shards / "00" / "000000-000003.zarr"
    chunk = max((p for p in (shard / "points").rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(DataError, match=r"000000-000003\.zarr: chunk points/.* has 100 bytes.*re-run"):
        train(run, "student", TINY, name="student")
    summary = run_prepare(small_dataset, run, PrepareConfig(FusionConfig(), frames_per_shard=4), splits=("train", "val"))
    assert summary["shards_written"] == 1
    ref = RaggedReader(RunDir(chain).shards / "00" / "000000-000003.zarr")
    got = RaggedReader(shard, verify_hashes=True)
    for i in range(len(ref)):
        for field, values in ref.read(i).items():
            assert np.array_equal(values, got.read(i)[field])


def test_damaged_cache_chunk_is_rewritten_by_a_rerun(chain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    chunk = next(p for p in (RunDir(run).teacher_cache / "shards/00/000004-000007.zarr/logit_codes").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    chunk.write_bytes(bytes(data))
    assert run_cache(run, None, CACHE)["shards_written"] == 1


class ChunkReads:
    """Counts the bytes of chunk files (not Zarr metadata) opened for reading under `root`,
    through every path Python code opens files by (open, io.open, Path.open, Path.read_bytes)."""

    def __init__(self, root, monkeypatch):
        import builtins
        import io

        self.root, self.files = str(root), []
        real = io.open

        def counting(file, mode="r", *args, **kwargs):
            name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
            metadata = os.path.basename(name) in ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")
            if "r" in mode and name.startswith(self.root) and ".zarr/" in name and not metadata:
                self.files.append(name)
            return real(file, mode, *args, **kwargs)

        monkeypatch.setattr(io, "open", counting)
        monkeypatch.setattr(builtins, "open", counting)

    @property
    def bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files if os.path.exists(f))


def test_finished_prepare_is_recognised_without_reading_chunk_data(small_dataset, tmp_path, monkeypatch):
    """A re-run on finished output compares sizes and stamps only; a truncated chunk, or (with
    --verify) a same-size edit whose stamp was put back, is still found and rewritten."""
    cfg = PrepareConfig(FusionConfig(), frames_per_shard=4)
    run = tmp_path / "run"
    run_prepare(small_dataset, run, cfg, sequences=("00",))
    shard = RunDir(run).shards / "00" / "000000-000003.zarr"
    assert ChunkReads(tmp_path, monkeypatch).bytes == 0  # the counter itself sees reads:
    reads = ChunkReads(run, monkeypatch)
    RaggedReader(shard).read(0)
    assert reads.bytes > 0
    reads.files.clear()
    assert run_prepare(small_dataset, run, cfg, sequences=("00",))["shards_written"] == 0
    assert reads.files == [] and reads.bytes == 0
    cache = RaggedReader(shard)  # same-size damage, modification time put back: only --verify sees it
    chunk = shard / max(cache.attrs["chunk_files"], key=lambda rel: cache.attrs["chunk_files"][rel][0])
    st = chunk.stat()
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_prepare(small_dataset, run, cfg, sequences=("00",))["shards_written"] == 0
    assert run_prepare(small_dataset, run, cfg, sequences=("00",), verify=True)["shards_written"] == 1
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated: its size differs
    reads.files.clear()
    assert run_prepare(small_dataset, run, cfg, sequences=("00",))["shards_written"] == 1
    assert RaggedReader(shard, verify_hashes=True).read(0)["points"].shape[1] == 4


def test_scan_edited_in_place_is_reprepared(small_dataset, tmp_path):
    """A scan rewritten in place (same path, other bytes) is noticed from its size/stamp: the
    shards that read it are rewritten, and the manifest's fingerprint changes downstream."""
    data = copy_sequences(small_dataset, tmp_path / "data", ["00"])
    cfg = PrepareConfig(FusionConfig(), frames_per_shard=4)
    first = run_prepare(data, tmp_path / "run", cfg)
    scan = data / "sequences/00/velodyne/000006.bin"
    points = np.fromfile(scan, np.float32).reshape(-1, 4)
    points[:, 3] = 0.5
    points.tofile(scan)  # same size
    again = run_prepare(data, tmp_path / "run", cfg)
    assert again["shards_written"] == 1  # only 000004-000007 read frame 6
    assert again["manifest_fingerprint"] != first["manifest_fingerprint"]
    df, _ = read_manifest(RunDir(tmp_path / "run").manifest)
    shard = RaggedReader(RunDir(tmp_path / "run").prepare / df[df["frame"] == 6].iloc[0]["shard"])
    got = shard.read(int(df[df["frame"] == 6].iloc[0]["shard_index"]))["points"]
    assert np.array_equal(got[: len(points)], points)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 100])
def test_random_file_as_checkpoint(chain, small_dataset, tmp_path, content):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    one_line_error(["eval", bad, "--data", small_dataset, "--split", "val"], str(bad), "checkpoint")
    one_line_error(["cache-teacher", chain, "--teacher", bad], str(bad))


def test_checkpoint_with_another_class_count(chain, small_dataset, tmp_path):
    ckpt = torch.load(chain / "teacher/model.pt", weights_only=False)
    ckpt["num_classes"] = 7
    ckpt["model"]["classifier.weight"] = ckpt["model"]["classifier.weight"][:7]
    ckpt["model"]["classifier.bias"] = ckpt["model"]["classifier.bias"][:7]
    bad = tmp_path / "other.pt"
    torch.save(ckpt, bad)
    one_line_error(["eval", bad, "--data", small_dataset, "--split", "val"], str(bad), "7 classes", "20")
    with pytest.raises(DataError, match="predicts 7 classes"):
        run_cache(chain, bad, CACHE)


def test_read_only_output_directory(small_dataset, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")  # pragma: no cover
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        one_line_error(["prepare", small_dataset, out / "run"], str(out))
    finally:
        out.chmod(0o700)


def test_unwritable_output_is_one_line(small_dataset, tmp_path):
    """Runs as root too: a file where the run directory must be is refused by the OS alike."""
    blocker = tmp_path / "run"
    blocker.mkdir()
    (blocker / "prepare").write_text("a file, not a directory")
    one_line_error(["prepare", small_dataset, blocker, "--sequences", "08"], "prepare")


@pytest.mark.parametrize("args", [["--k", "0"], ["--k", "-1"], ["--jobs", "0"], ["--frames-per-shard", "0"],
                                  ["--frames-per-shard", "-3"]])
def test_nonpositive_prepare_options(small_dataset, tmp_path, args):
    code, out = cli_run("prepare", small_dataset, tmp_path / "run", *args)
    assert code == 2 and args[0] in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["steps=0", "batch_size=-1", "checkpoint_every=0", "voxel_size=0", "voxel_size=-0.1"])
def test_nonpositive_training_settings(chain, setting):
    key = setting.split("=")[0]
    one_line_error(["train-teacher", chain, "--config", "demo", "--set", setting, "--name", "never"], key, "must be > 0")
    assert not (chain / "never").exists()


def test_failed_prepare_leaves_nothing_that_refuses(small_dataset, tmp_path):
    data = copy_sequences(small_dataset, tmp_path / "data", ["08"])
    (data / "sequences/08/velodyne/000004.bin").write_bytes(b"\0" * 17)  # not a multiple of 16 bytes
    one_line_error(["prepare", data, tmp_path / "run", "--k", "2"], "000004.bin")
    assert not (tmp_path / "run/prepare/config.json").exists() and not (tmp_path / "run/prepare/manifest.parquet").exists()
    (data / "sequences/08/velodyne/000004.bin").unlink()
    (data / "sequences/08/labels/000004.label").unlink()
    code, out = cli_run("prepare", data, tmp_path / "run", "--k", "3")  # other settings: not refused
    assert code == 0, out


# --- 6. temporaries ------------------------------------------------------------------------

def test_only_abandoned_temporaries_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = temp_path(tmp_path / "last.pt")
        theirs_dead = mine.with_name(mine.name.rsplit("-", 1)[0] + f"-{dead_pid}")
        theirs_live = mine.with_name(mine.name.rsplit("-", 1)[0] + f"-{live.pid}")
        other_host = tmp_path / "last.pt.tmp-otherhost-1"
        group_dead = tmp_path / "shards" / f"{theirs_dead.name.replace('last.pt', 'a.zarr')}"
        for f in (theirs_dead, theirs_live, other_host):
            f.write_bytes(b"x")
        group_dead.mkdir(parents=True)
        (group_dead / "zarr.json").write_text("{}")
        assert sweep_temporaries(tmp_path) == 2
        assert not theirs_dead.exists() and not group_dead.exists()
        assert theirs_live.exists() and other_host.exists()
    finally:
        live.kill()


# --- 7. predictions are real classes --------------------------------------------------------

def test_predictions_never_the_ignore_class():
    logits = torch.zeros(5, 20)
    logits[:, 0] = 10.0  # the ignore class would win an argmax
    logits[torch.arange(5), torch.tensor([3, 1, 19, 8, 2])] = 1.0
    assert predict(logits).tolist() == [3, 1, 19, 8, 2]
    assert predict(logits.numpy()).tolist() == [3, 1, 19, 8, 2]


def test_saved_labels_hold_no_raw_zero(chain, small_dataset, tmp_path):
    model_path = chain / "teacher/model.pt"
    ckpt = torch.load(model_path, weights_only=False)
    ckpt["model"]["classifier.bias"][0] = 1e4  # a model that would answer "unlabelled" everywhere
    biased = tmp_path / "biased" / "model.pt"
    biased.parent.mkdir()
    torch.save(ckpt, biased)
    report = run_eval([biased], split="val", data_root=small_dataset, out_dir=tmp_path / "eval",
                      save_labels=tmp_path / "labels", backend="torch", device="cpu", workers=0)
    for f in (tmp_path / "labels/biased/sequences/08/predictions").glob("*.label"):
        assert (np.fromfile(f, np.uint32) & 0xFFFF).min() > 0
    conf = np.array(report["results"]["biased"]["confusion"])
    assert conf[:, 0].sum() == 0 if conf.shape[0] == 20 else True


# --- 8. same seed, same bits with the default settings ---------------------------------------

def test_default_backend_is_bit_reproducible(chain):
    """Two student runs at the default backend (auto) and 2 threads give identical weights."""
    cfg = dataclasses.replace(TINY, backend=TrainConfig().backend, steps=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = train(chain, "student", cfg, name="bits-a", overwrite=True)
        b = train(chain, "student", cfg, name="bits-b", overwrite=True)
    finally:
        torch.set_num_threads(threads)
    assert a["backend"] == b["backend"] == "torch"
    sa = torch.load(a["checkpoint"], weights_only=False)["model"]
    sb = torch.load(b["checkpoint"], weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- 9. resume as training practice needs -----------------------------------------------------

def test_resume_extends_and_refuses_what_changes_the_mathematics(chain):
    cfg = dataclasses.replace(TINY, steps=2)
    train(chain, "student", cfg, name="extend", overwrite=True)
    longer = train(chain, "student", dataclasses.replace(cfg, steps=4, workers=1, log_every=2, checkpoint_every=2),
                   name="extend", resume=True)
    assert longer["steps_done"] == 4 and longer["checkpoint"]
    with pytest.raises(StaleInputError, match="cannot resume.*mathematics"):
        train(chain, "student", dataclasses.replace(cfg, steps=6, lr=0.5), name="extend", resume=True)
    from m2skd.trainer import check_resumable

    old = {"config_fingerprint": "a", "manifest_fingerprint": "b", "cache_fingerprint": "c", "world_size": 1}
    with pytest.raises(StaleInputError, match="trained on 1 processes, resumed on 2.*--allow-world-size-change"):
        check_resumable("last.pt", old, {**old, "world_size": 2}, allow_world_size_change=False)
    check_resumable("last.pt", old, {**old, "world_size": 2}, allow_world_size_change=True)


def test_auto_backend_fits_the_device():
    """auto is the torch backend on every device; MinkowskiEngine asked for on a device its
    build has no kernels for is one line, not a crash at the first forward."""
    from m2skd.models import resolve_backend
    from m2skd.models.me_compat import minkowski_available, minkowski_runs_on
    from m2skd.models.minkunet import BackendError

    assert resolve_backend("auto", "cpu") == resolve_backend("auto", "cuda") == "torch"
    if not minkowski_available():
        pytest.skip("MinkowskiEngine is not installed")
    assert resolve_backend("minkowski", "cpu") == "minkowski"
    if minkowski_runs_on("cuda"):
        pytest.skip("this MinkowskiEngine build has CUDA kernels")
    with pytest.raises(BackendError, match="no cuda kernels"):
        resolve_backend("minkowski", "cuda")
