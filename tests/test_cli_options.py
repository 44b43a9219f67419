"""One line for every bad option: every sub-command, with an invalid value for each of its
options, with a missing run directory and with a run directory of the wrong stage, exits non-zero
in at most 3 lines, without a traceback, and says what was wrong.

The cases come from the click command tree, so a new option is covered as soon as it exists:
typed options get an invalid value from their type, and a free-text option must be listed in
BAD_TEXT (or in ANY_TEXT, if every text is valid) or the test fails."""
import dataclasses

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from m2skd import cli
from m2skd.fusion import FusionConfig
from m2skd.synth import SynthConfig, generate_dataset
from m2skd.train_config import TrainConfig
from m2skd.trainer import train
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache
from m2skd.pipeline.prepare import PrepareConfig, run_prepare

TINY = TrainConfig(depth=18, widths=(8, 8, 8, 8, 8, 8, 8, 8), stem_width=8, backend="torch", voxel_size=0.5, steps=1,
                   batch_size=1, workers=0, checkpoint_every=1, val_every=0, log_every=1)

# free-text options: an invalid value each ("{file}" is an existing plain file, "{missing}" a path that does not exist)
BAD_TEXT = {
    ("synth", "--sequences"): "00,zz",
    ("prepare", "--hard-classes"): "2,x",
    ("prepare", "--splits"): "train,bogus",
    ("prepare", "--sequences"): "zz",
    ("prepare", "--dataset"): "no-such-dataset",
    ("prepare", "--dask-scheduler"): "no scheduler here",
    ("train-*", "--config"): "no-such-config",
    ("train-*", "--set"): "no_such_key=1",
    ("train-*", "--name"): "../outside",
    ("train-*", "--device"): "tpu",
    ("cache-teacher", "--teacher"): "{missing}",
    ("cache-teacher", "--splits"): "bogus",
    ("cache-teacher", "--device"): "tpu",
    ("cache-teacher", "--dask-scheduler"): "no scheduler here",
    ("eval", "--split"): "bogus",
    ("eval", "--sequences"): "zz",
    ("eval", "--out"): "{file}",
    ("eval", "--device"): "tpu",
    ("demo", "--out"): "{file}",
    ("demo", "--student-seeds"): "1,a",
    ("demo", "--set"): "no_such_key=1",
    ("bench", "--out"): "{file}",
    ("show", "--out"): "{file}",
    ("show", "--views"): "bevv",
    ("show", "--checkpoint"): "no-such-run",
    ("show", "--scan"): "08/x",
    ("show", "--cache-scan"): "08/x",
    ("show", "--device"): "tpu",
    ("study", "--out"): "{file}",
    ("study", "--seeds"): "1,a",
    ("study", "--kd-forms"): "bogus",
    ("study", "--arm"): "fast:lr=0.1",
    ("study", "--set"): "no_such_key=1",
    ("study", "--teachers"): "hard,bogus",
    ("stats", "--sequences"): "zz",
}
ANY_TEXT: set = set()
# the whole method: they must refuse a bad option before any work starts
LONG_STAGES = {"demo": "m2skd.pipeline.demo.run_demo", "study": "m2skd.pipeline.study.run_study",
               "bench": "m2skd.pipeline.bench.run_bench"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, a prepared run with teacher and cache, and paths that are wrong on purpose."""
    root = tmp_path_factory.mktemp("options")
    data = root / "data"
    generate_dataset(data, sequences=("00", "08"), frames=2, seed=0, config=SynthConfig(beams=8, azimuth_steps=128))
    run = root / "run"
    run_prepare(data, run, PrepareConfig(FusionConfig()))
    teacher = train(run, "teacher", TINY)["checkpoint"]
    run_cache(run, teacher, CacheConfig(backend="torch", device="cpu"))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(TINY).items()}))
    (root / "plain.txt").write_text("not a directory\n")
    (root / "empty").mkdir()
    prepared_only = root / "prepared_only"
    run_prepare(data, prepared_only, PrepareConfig(FusionConfig()))
    return {"root": root, "data": data, "run": run, "teacher": teacher, "config": config, "file": root / "plain.txt",
            "missing": root / "missing", "empty": root / "empty", "prepared_only": prepared_only}


def base_args(command: str, w: dict, out) -> list:
    """Valid arguments that do little work, so a case fails on its bad option alone."""
    train = [w["run"], "--config", w["config"], "--device", "cpu", "--overwrite", "--name", "fuzz"]
    return {
        "synth": [out, "--sequences", "00", "--frames", "1", "--beams", "8", "--azimuth-steps", "64"],
        "prepare": [w["data"], out],
        "train-teacher": train,
        "train-student": train,
        "cache-teacher": [w["run"], "--backend", "torch", "--device", "cpu", "--overwrite"],
        "eval": [w["teacher"], "--backend", "torch", "--device", "cpu", "--max-scans", "1", "--out", out],
        "demo": ["--out", out, "--size", "tiny"],
        "study": ["--out", out, "--size", "tiny", "--seeds", "1"],
        "bench": ["--out", out, "--quick"],
        "show": [w["run"], "--checkpoint", "teacher", "--views", "bev", "--out", out],
        "stats": [w["data"]],
    }[command]


def bad_values(command: str, param: click.Parameter, w: dict) -> list[str]:
    """Invalid values for one parameter, from its type (and BAD_TEXT for free text)."""
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag:
        return ["=1"]  # a flag given a value
    if isinstance(kind, click.Choice):
        return ["bogus"]
    if isinstance(kind, (click.IntRange, click.FloatRange)):
        values = ["x"]
        if kind.min is not None:
            values.append(str(kind.min if kind.min_open else (kind.min - 1 if isinstance(kind, click.IntRange) else kind.min - 0.5)))
        if kind.max is not None:
            values.append(str(kind.max if kind.max_open else kind.max + 1))
        return values
    if kind in (click.INT, click.FLOAT):
        return ["x"]
    if isinstance(kind, click.Path):
        if kind.exists:
            return [str(w["missing"])]
        if not kind.file_okay:
            return [str(w["file"])]
        if not kind.dir_okay:
            return [str(w["empty"])]
    key = ("train-*" if command.startswith("train-") else command, param.opts[-1])
    if key in BAD_TEXT:
        return [BAD_TEXT[key].format(file=w["file"], missing=w["missing"])]
    if key in ANY_TEXT:
        return []
    raise AssertionError(f"{command} {param.opts[-1]}: add an invalid value to BAD_TEXT (or the option to ANY_TEXT)")


def cases(w: dict) -> list[tuple]:
    out = []
    for command_name, command in sorted(cli.main.commands.items()):
        for param in command.params:
            for value in bad_values(command_name, param, w):
                out.append((command_name, param, value))
    return out


def replace_argument(args: list, command: click.Command, param: click.Argument, value: str) -> list:
    index = [p for p in command.params if isinstance(p, click.Argument)].index(param)
    args = list(args)
    args[index] = value
    return args


def invoke(args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=True)


def check_one_line(result, args, *expected):
    text = result.output
    where = f"m2skd {' '.join(map(str, args))}\n{text}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}\n{where}")
    assert result.exit_code != 0, where
    assert "Traceback" not in text, where
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 3, where
    if expected:
        assert any(e.lower() in text.lower() for e in expected), (expected, where)


def test_every_option_with_a_bad_value(world, tmp_path, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the stage started work despite a bad option")

    for target in LONG_STAGES.values():
        monkeypatch.setattr(target, started)
    failures, done = [], 0
    for i, (command_name, param, value) in enumerate(cases(world)):
        command = cli.main.commands[command_name]
        out = tmp_path / f"out{i}"
        base = base_args(command_name, world, out)
        if isinstance(param, click.Argument):
            args = [command_name, *replace_argument(base, command, param, value)]
            named = (value,)
        elif value.startswith("="):
            args = [command_name, *base, param.opts[-1] + value]
            named = (param.opts[-1],)
        else:
            args = [command_name, *base, param.opts[-1], value]
            named = (param.opts[-1], param.opts[-1].lstrip("-").replace("-", "_"), value, value.split("=")[0], value.split(",")[-1])
        try:
            check_one_line(invoke(args), args, *named)
        except AssertionError as exc:
            failures.append(str(exc))
        done += 1
    assert not failures, f"{len(failures)} of {done} cases:\n" + "\n\n".join(failures)
    assert done >= 100, done  # 109 cases when written: every option of every sub-command


def test_missing_and_wrong_stage_run_directories(world, tmp_path):
    w = world
    missing, empty, prepared_only = w["missing"], w["empty"], w["prepared_only"]
    config = ["--config", w["config"], "--device", "cpu", "--name", "fuzz"]
    calls = [
        (["prepare", missing, tmp_path / "r"], str(missing)),
        (["prepare", empty, tmp_path / "r"], str(empty)),  # not a dataset
        (["train-teacher", missing, *config], str(missing)),
        (["train-teacher", empty, *config], str(empty)),  # not prepared
        (["train-student", missing, *config], str(missing)),
        (["train-student", prepared_only, *config], "cache-teacher"),  # no teacher cache
        (["cache-teacher", missing], str(missing)),
        (["cache-teacher", empty], str(empty)),
        (["cache-teacher", prepared_only, "--backend", "torch", "--device", "cpu"], "train-teacher"),  # no teacher
        (["eval", missing], str(missing)),
        (["eval", w["file"], "--out", tmp_path / "e"], str(w["file"])),  # not a checkpoint
        (["show", missing], str(missing)),
        (["show", empty, "--out", tmp_path / "s"], str(empty)),
        (["show", prepared_only, "--checkpoint", "teacher", "--out", tmp_path / "s"], "teacher"),  # nothing trained
    ]
    if not torch.cuda.is_available():
        calls.append((["bench", "--gpu", "--out", tmp_path / "b"], "--gpu"))
        calls.append((["train-teacher", w["run"], *config, "--device", "cuda"], "--device cuda"))
    failures = []
    for args, expected in calls:
        try:
            check_one_line(invoke(args), args, expected)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(calls)} cases:\n" + "\n\n".join(failures)
