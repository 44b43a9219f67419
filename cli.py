"""m2skd command line: a thin click layer over pipeline/ (parsing, progress bars, printing)."""
from __future__ import annotations

import functools
import os
import re

import click

from m2skd.errors import M2SKDError
from m2skd.teacher_cache import DEFAULT_FEATURE_ENCODING, DEFAULT_LOGIT_ENCODING, FEATURE_ENCODINGS, LOGIT_ENCODINGS
from m2skd.pipeline.progress import Progress, StageBars, stop_all


def friendly_errors(fn):
    """Report our own errors, bad settings and file-system refusals (a read-only or full output
    directory) as one clear line naming the file, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except M2SKDError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = exc.filename or ""
            raise click.ClickException(f"{where}: {exc.strerror or exc}" if where else str(exc)) from None
        finally:
            stop_all()

    return wrapper


def echo_summary(title: str, summary: dict) -> None:
    click.echo(f"{title}:")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        click.echo(f"  {key}: {value}")


def announce_backend(name: str) -> None:
    if name == "auto":
        from m2skd.models.minkunet import AUTO_BACKEND_REASON

        click.echo(f"backend {AUTO_BACKEND_REASON}", err=True)


def csv_list(value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


# Checks of option values that click's types cannot express, so a bad value is one line naming the
# option before any work starts.

def int_list(ctx, param, value):
    try:
        return tuple(int(v) for v in csv_list(value)) if value else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def sequence_names(ctx, param, value):
    names = csv_list(value)
    bad = [n for n in names or () if not n.isdigit()]
    if bad:
        raise click.BadParameter(f"sequences are numbered folders (00, 08, ...), got {', '.join(bad)}")
    return value


def folder_name(ctx, param, value):
    if value is not None and (not value or value in (".", "..") or "/" in value or "\\" in value):
        raise click.BadParameter(f"a folder name under RUN_DIR, got {value!r}")
    return value


def scan_id(ctx, param, value):
    seq, _, frame = (value or "").partition("/")
    if value is not None and not (seq.isdigit() and frame.isdigit()):
        raise click.BadParameter(f"expected SEQ/FRAME such as 08/000123, got {value!r}")
    return value


class Device(click.ParamType):
    """cpu, cuda, cuda:1, ...: whatever torch.device accepts."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        try:
            torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            self.fail(f"{value!r} is not a device (cpu, cuda, cuda:1, ...)", param, ctx)
        return value


DEVICE = Device()


class Location(click.Path):
    """A local path (checked as click.Path checks it) or an fsspec URL (s3://, gs://, ...)."""

    def convert(self, value, param, ctx):
        from m2skd import storage

        if not storage.is_url(value):
            return super().convert(value, param, ctx)
        try:
            storage.filesystem(value)  # a missing client or unknown protocol, named by this URL
            location = storage.path(value)
            container = storage.path(f"{location.protocol}://{location.key.split('/')[0]}")
            if not container.exists():  # the bucket: a store's own error would not name the URL
                self.fail(f"{value}: {container} not found or not accessible with these credentials", param, ctx)
            if self.exists and not location.exists():
                self.fail(f"{value}: not found", param, ctx)
        except M2SKDError as exc:
            self.fail(str(exc), param, ctx)
        except OSError as exc:  # credentials, endpoint, permissions: the client's own words
            self.fail(f"{value}: {exc.strerror or exc}", param, ctx)
        return value


OUT_DIR = Location(file_okay=False)


# Options several commands share, each declared once; a command passes its own default and help.
# A default of None is not shown in --help.

def _shown(default) -> bool | None:
    return None if default is None else True


def backend_option(default: str | None = "auto", help: str | None = None):
    """None: the training config's backend."""
    return click.option("--backend", type=click.Choice(["auto", "minkowski", "torch"]), default=default,
                        show_default=_shown(default), help=help)


def device_option(default: str | None = None, help: str | None = None):
    return click.option("--device", type=DEVICE, default=default, show_default=_shown(default), help=help)


def jobs_option(help: str | None = None):
    return click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), help=help)


def seed_option(help: str | None = None):
    return click.option("--seed", default=0, show_default=True, help=help)


def set_option(help: str):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help)


def out_option(default: str | None, help: str):
    return click.option("--out", "out_dir", default=default, show_default=_shown(default), type=OUT_DIR, help=help)


def size_option():
    return click.option("--size", type=click.Choice(["default", "study", "study-wide", "study-matched", "tiny"]),
                        default="default", show_default=True)


def dask_scheduler_option(help: str | None = None):
    return click.option("--dask-scheduler", default=None, help=help)


def verify_option():
    return click.option("--verify", is_flag=True,
                        help="Hash every chunk of the existing output (else only where a size or stamp differs).")


def stage_announcer(progress_factory: StageBars):
    """on_stage for demo and study: closes the finished stage's progress, then names the next."""

    def announce(name: str) -> None:
        progress_factory.close()
        click.echo(f"== {name}", err=True)

    return announce


def check_overrides(size: str, overrides) -> dict:
    """The demo's and the study's --set values, checked against their config before any work."""
    from m2skd.pipeline.demo import SIZES
    from m2skd.train_config import load_config, parse_overrides

    values = parse_overrides(overrides)
    load_config(SIZES[size].config, values)
    return values


def check_arms(size: str, base: dict, specs, taken) -> dict:
    """The study's --arm values (LABEL:KEY=VALUE,...) as label -> overrides, each checked
    against the config (with the --set values) before any work; an arm may change only what
    its distilled students do, never what their shared baseline trains with."""
    from m2skd.pipeline.demo import SIZES
    from m2skd.train_config import load_config, parse_overrides

    arms = {}
    for spec in specs:
        label, _, settings = spec.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9_.]+", label) or label in taken or label in arms or not settings:
            raise click.BadParameter(f"expected LABEL:KEY=VALUE[,KEY=VALUE] with a new label of letters, digits, "
                                     f"'_' or '.', got {spec!r}", param_hint="--arm")
        try:
            values = parse_overrides(settings.split(","))
            arm_config = load_config(SIZES[size].config, {**base, **values})
            base_config = load_config(SIZES[size].config, base)
        except (ValueError, TypeError) as error:
            raise click.BadParameter(f"{spec!r}: {error}", param_hint="--arm") from None
        if arm_config.no_distill() != base_config.no_distill():
            raise click.BadParameter(f"{spec!r}: an arm may set only distillation settings (its baseline is shared)",
                                     param_hint="--arm")
        arms[label] = values
    return arms


@click.group()
@click.version_option(package_name="m2skd")
def main():
    """Multi-to-Single Knowledge Distillation for LiDAR semantic segmentation."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--sequences", default="00,08", show_default=True, callback=sequence_names,
              help="Comma-separated sequence names (their split follows SemanticKITTI).")
@click.option("--frames", default=20, show_default=True, type=click.IntRange(min=1), help="Scans per sequence.")
@seed_option()
@click.option("--beams", default=64, show_default=True, type=click.IntRange(min=2), help="Laser beams (size knob).")
@click.option("--azimuth-steps", default=2048, show_default=True, type=click.IntRange(min=8), help="Columns per revolution (size knob).")
@click.option("--min-hard-per-100m", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Each hard class at least this often per 100 m near the drive (0: SemanticKITTI's shares; "
                   "the demo's val drive uses 2.5).")
@jobs_option()
@friendly_errors
def synth(out, sequences, frames, seed, beams, azimuth_steps, min_hard_per_100m, jobs):
    """Write a synthetic SemanticKITTI-layout dataset from a simulated spinning LiDAR."""
    from m2skd.synth import SynthConfig, generate_dataset

    progress = Progress("synth")
    progress(total=frames * len(csv_list(sequences)))
    summary = generate_dataset(out, sequences=csv_list(sequences), frames=frames, seed=seed,
                               config=SynthConfig(beams=beams, azimuth_steps=azimuth_steps,
                                                  min_hard_per_100m=min_hard_per_100m), jobs=jobs,
                               progress=lambda n=1: progress(advance=n))
    progress.close()
    echo_summary(f"wrote {out}", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--sequences", default=None, help="Comma-separated sequences (default: every labelled one).")
@jobs_option()
@click.option("--shapes", is_flag=True, help="Also print the simulator's median points per hard-class object at 10 and 25 m.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
@friendly_errors
def stats(data, sequences, jobs, shapes, json_out):
    """Class shares against SemanticKITTI's and hard-class instances by points and range, per split."""
    from m2skd.atomic import write_json_atomic
    from m2skd.dataset_stats import format_instances, format_shares
    from m2skd.pipeline.stats import run_stats

    if data is None and not shapes:
        raise click.UsageError("give a dataset directory DATA, or --shapes")
    result = {}
    if data is not None:
        progress = Progress("stats")
        result = run_stats(data, csv_list(sequences), jobs=jobs, progress=progress)
        progress.close()
    for group, figures in result.items():
        click.echo(f"\n## {group}: {figures['scans']} scans of sequences {', '.join(figures['sequences'])}\n")
        click.echo("\n".join(format_shares(figures["shares"])))
        click.echo("\nhard-class instances (one per scan it appears in), by points in the scan and centroid range:\n")
        click.echo("\n".join(format_instances(figures["instances"])))
    if shapes:
        from m2skd.dataset_spec import load_spec
        from m2skd.synth.probe import median_points_table

        spec = load_spec()
        table = median_points_table()
        result["median_points_single_object"] = {spec.labels[raw]: by_range for raw, by_range in table.items()}
        click.echo("\nmedian points of one unoccluded object in a 64-beam scan (24 objects, random headings):\n")
        click.echo("| class | 10 m | 25 m |\n|---|---|---|")
        for raw, by_range in table.items():
            click.echo(f"| {spec.labels[raw]} | {by_range[10.0]:g} | {by_range[25.0]:g} |")
    if json_out:
        write_json_atomic(json_out, result)


@main.command()
@click.argument("data", type=Location(exists=True, file_okay=False))
@click.argument("run_dir", type=Location(file_okay=False))
@click.option("--fusion", type=click.Choice(["hard", "all", "none"]), default="hard", show_default=True,
              help="hard: fuse hard-class instances only (the method); all: whole previous scans (ablation).")
@click.option("-k", "--k", "k", default=4, show_default=True, type=click.IntRange(min=1), help="Previous scans fused into each scan.")
@click.option("--align", type=click.Choice(["centroid", "icp"]), default="centroid", show_default=True,
              help="Moving instances: centroid offset; icp adds a rigid refinement with a rejection test.")
@click.option("--hard-classes", default=None, callback=int_list, help="Comma-separated training ids (default: the dataset description's set).")
@click.option("--splits", default=None, help="Comma-separated splits to prepare (train,val,test).")
@click.option("--sequences", default=None, callback=sequence_names, help="Comma-separated sequences to prepare.")
@click.option("--frames-per-shard", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--moving-threshold", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="World-frame centroid travel (m) over the window that marks an instance as moving.")
@click.option("--dataset", default="semantickitti", show_default=True, help="Name or path of a data_manifests/ description.")
@jobs_option(help="Parallel workers (joblib/loky).")
@dask_scheduler_option(help="Run shard jobs on this Dask cluster instead.")
@click.option("--overwrite", is_flag=True, help="Rewrite every shard even if done.")
@verify_option()
@click.option("--voxel-size", default=None, type=click.FloatRange(min=0, min_open=True), metavar="METRES",
              help="Also report what fusion adds to hard instances at this voxel size (the training one): points and "
                   "occupied voxels, fused vs single.")
@friendly_errors
def prepare(data, run_dir, fusion, k, align, hard_classes, splits, sequences, frames_per_shard, moving_threshold, dataset, jobs, dask_scheduler, overwrite,
            verify, voxel_size):
    """Align poses and fuse hard-class instances into Zarr shards + a Parquet manifest."""
    import time

    from m2skd.dataset_spec import load_spec
    from m2skd.fusion import FusionConfig
    from m2skd.pipeline.prepare import PrepareConfig, run_prepare

    load_spec(dataset).check_splits(csv_list(splits))
    cfg = PrepareConfig(FusionConfig(mode=fusion, k=k, align=align, moving_threshold_m=moving_threshold), frames_per_shard, dataset, hard_classes)
    progress = Progress("prepare")
    t0 = time.perf_counter()
    summary = run_prepare(data, run_dir, cfg, jobs=jobs, splits=csv_list(splits), sequences=csv_list(sequences),
                          overwrite=overwrite, progress=progress, dask_scheduler=dask_scheduler, verify=verify,
                          voxel_size=voxel_size)
    progress.close()
    elapsed = time.perf_counter() - t0
    summary["seconds"] = elapsed
    echo_summary(f"prepared {run_dir}", summary)


def train_options(fn):
    options = [
        click.argument("run_dir", type=Location(exists=True, file_okay=False)),
        click.option("--config", "config_path", default=None, help="YAML in configs/ (name) or a path; default: configs/semantickitti.yaml."),
        set_option(help="Override a config key (repeatable), e.g. --set steps=500."),
        backend_option(None, help="Sparse backend (overrides config)."),
        click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default=None, help="Mixed precision (torch backend)."),
        click.option("--steps", type=click.IntRange(min=1), default=None),
        click.option("--name", default=None, callback=folder_name, help="Output folder under RUN_DIR (default: the role)."),
        click.option("--resume", is_flag=True, help="Continue from RUN_DIR/<name>/checkpoints/last.pt."),
        click.option("--overwrite", is_flag=True, help="Start again, replacing existing checkpoints."),
        device_option(help="cpu, cuda, cuda:1 (default: cuda if available; under torchrun each rank's own GPU)."),
        click.option("--allow-world-size-change", is_flag=True, help="Resume on another number of processes (changes the global batch)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_training(role, run_dir, config_path, overrides, backend, amp, steps, name, resume, overwrite, device,
                 allow_world_size_change=False, no_distill=False):
    from m2skd.distributed import rank
    from m2skd.train_config import load_config, parse_overrides
    from m2skd.trainer import train

    values = parse_overrides(overrides)
    values.update({k: v for k, v in {"backend": backend, "amp": amp}.items() if v is not None})
    if steps is not None:  # a step count asked for on the command line replaces an epoch-based schedule
        values.update(steps=steps, epochs=None)
    cfg = load_config(config_path or "semantickitti", values)
    if no_distill:
        cfg = cfg.no_distill()
    main_rank = rank() == 0  # under torchrun only rank 0 reports (train() calls back on it alone)
    bar = Progress(f"train-{name or ('baseline' if no_distill else role)}", unit="step") if main_rank else None
    shown = ("loss", "ce", "lovasz", "kd", "feat", "affinity", "val_miou")

    def callback(step, total, logs):
        bar(total=total, set_to=step, postfix={k: logs[k] for k in shown if k in logs})

    announce_backend(cfg.backend)
    result = train(run_dir, role, cfg, name=name, resume=resume, overwrite=overwrite, device=device,
                   callback=callback if bar else None, allow_world_size_change=allow_world_size_change)
    if bar:
        bar.close()
    last = result["history"][-1] if result["history"] else {}
    echo_summary(f"trained {role} -> {result['checkpoint']}",
                 {"steps": result["steps_done"], "seconds": result["seconds"], **{f"val_{k}": v for k, v in last.items() if k != "step"}})


@main.command("train-teacher")
@train_options
@friendly_errors
def train_teacher(**kwargs):
    """Train the teacher on fused input (hard-class instances densified) with fused labels."""
    run_training("teacher", **kwargs)


@main.command("train-student")
@train_options
@click.option("--no-distill", is_flag=True, help="All distillation weights 0: the single-scan baseline.")
@friendly_errors
def train_student(no_distill, **kwargs):
    """Train the single-scan student against the cached teacher targets (or the baseline)."""
    if no_distill and not kwargs["name"]:
        kwargs["name"] = "baseline"
    run_training("student", no_distill=no_distill, **kwargs)


@main.command("cache-teacher")
@click.argument("run_dir", type=Location(exists=True, file_okay=False))
@click.option("--teacher", default=None, help="Teacher checkpoint (default RUN_DIR/teacher/model.pt).")
@click.option("--logit-encoding", type=click.Choice(LOGIT_ENCODINGS), default=DEFAULT_LOGIT_ENCODING, show_default=True,
              help="sqB: sqrt of the probabilities at T on 2^B-1 levels; topK: K largest logits; fp16/fp32: logits "
                   "relative to the point's maximum (m2skd/teacher_cache.py).")
@click.option("--feature-encoding", type=click.Choice(FEATURE_ENCODINGS), default=DEFAULT_FEATURE_ENCODING, show_default=True)
@click.option("--splits", default="train", show_default=True)
@click.option("--feature-layer", type=click.Choice(["dec1", "dec2", "dec3", "dec4", "dec1_preact", "dec2_preact", "dec3_preact",
                                                   "dec4_preact"]), default="dec4_preact", show_default=True,
              help="Decoder features cached for the feature/affinity terms (must match the student's feature_layer; "
                   "*_preact: before the stage's last ReLU).")
@backend_option()
@device_option(help="cpu, cuda, cuda:1 (default: cuda if available).")
@jobs_option()
@click.option("--threads-per-job", default=None, type=click.IntRange(min=1), help="torch threads per job (default: cores / jobs).")
@dask_scheduler_option()
@click.option("--overwrite", is_flag=True)
@verify_option()
@friendly_errors
def cache_teacher(run_dir, teacher, logit_encoding, feature_encoding, splits, feature_layer, backend, device, jobs, threads_per_job,
                  dask_scheduler, overwrite, verify):
    """Run the teacher once over the fused shards; store its targets at the single-scan points."""
    from m2skd.pipeline.cache_teacher import CacheConfig, run_cache
    from m2skd.rundir import RunDir

    threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    cfg = CacheConfig(logit_encoding, feature_encoding, feature_layer, csv_list(splits), backend, device, threads)
    announce_backend(backend)
    bar = Progress("cache-teacher")
    summary = run_cache(run_dir, teacher, cfg, jobs=jobs, overwrite=overwrite, progress=bar, dask_scheduler=dask_scheduler,
                        verify=verify)
    bar.close()
    echo_summary(f"cached teacher targets in {RunDir(run_dir).teacher_cache}", summary)


@main.command("eval")
@click.argument("checkpoints", nargs=-1, required=True, type=Location(exists=True, dir_okay=False))
@click.option("--split", default="val", show_default=True)
@click.option("--data", "data_root", default=None, type=Location(exists=True, file_okay=False), help="Dataset root (default: the one the run was prepared from).")
@click.option("--sequences", default=None, callback=sequence_names)
@out_option(None, help="Where metrics and plots go (default RUN_DIR/eval).")
@click.option("--save-labels", default=None, type=Location(file_okay=False), help="Write raw-id .label predictions here.")
@backend_option()
@device_option()
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--max-scans", default=None, type=click.IntRange(min=1), help="Evaluate an evenly spaced subset.")
@click.option("--teacher", default=None, type=Location(exists=True), metavar="RUN_DIR|MODEL.PT",
              help="Also report each checkpoint's transfer to this teacher: KL(teacher || student) x T^2 and argmax "
                   "agreement at the split's single-scan points (all, hard-class, per instance bucket), from the "
                   "teacher's cache where it holds the split, else the teacher run on the fused input.")
@friendly_errors
def eval_cmd(checkpoints, split, data_root, sequences, out_dir, save_labels, backend, device, workers, max_scans, teacher):
    """Official SemanticKITTI metrics for checkpoints side by side; CSV, JSON and PNG reports."""
    from m2skd.pipeline.evaluate import run_eval, spec_for_checkpoint

    if not sequences:
        spec_for_checkpoint(checkpoints[0]).check_splits([split], "--split")
    bar = Progress("eval")
    out = run_eval(checkpoints, split, data_root, csv_list(sequences), out_dir, save_labels, backend, device, workers,
                   max_scans=max_scans, progress=bar, teacher=teacher)
    bar.close()
    print_table(out["table"])
    print_instances(out["instances"])
    if len(out["transfer"]):
        click.echo("\ntransfer to the teacher (KL x T^2: lower is closer; agreement: same argmax):")
        click.echo(out["transfer"].drop(columns=["teacher"]).to_string(index=False, float_format=lambda v: f"{v:.3f}",
                                                                       na_rep="-"))
    click.echo(f"reports in {out['out_dir']}")


@main.command()
@out_option("runs/demo", help="Everything lands here: data/ and run/.")
@size_option()
@seed_option()
@backend_option("torch")
@click.option("--student-seeds", default=None, metavar="S1,S2,...",
              help="Train a distilled/baseline pair per seed (default: --seed); re-running adds seeds to a finished demo.")
@set_option(help="Override a training config key.")
@friendly_errors
def demo(out_dir, size, seed, backend, student_seeds, overrides):
    """The whole method on a small synthetic dataset, ending in a comparison table."""
    import time

    from m2skd.pipeline.demo import run_demo

    t0 = time.perf_counter()
    progress_factory = StageBars()

    seeds = None
    if student_seeds:
        try:
            seeds = [int(v) for v in student_seeds.split(",")]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {student_seeds!r}", param_hint="--student-seeds")
    result = run_demo(out_dir, size=size, seed=seed, backend=backend, overrides=check_overrides(size, overrides),
                      student_seeds=seeds, on_stage=stage_announcer(progress_factory), progress_factory=progress_factory)
    progress_factory.close()
    click.echo(f"\nm2skd demo: {result['prepare']['scans']} synthetic scans, hard-class points per instance "
               f"{result['prepare']['median_points_per_hard_instance_single']:.0f} (single) -> "
               f"{result['prepare']['median_points_per_hard_instance_fused']:.0f} (fused, median); fusion adds "
               f"{result['prepare']['hard_instance_points_gain']:+.0%} points and "
               f"{result['prepare']['hard_instance_voxel_gain']:+.0%} occupied voxels to hard instances at "
               f"{result['prepare']['hard_instance_voxel_size']:g} m\n")
    print_table(result["table"])
    counts = ", ".join(f"{name} {h['with_10+_points']}" for name, h in result["val_instances"].items())
    click.echo(f"\nval hard-class instances with 10+ points in the evaluated scans: {counts}")
    print_instances(result["instances"])
    effect = result["effect"]
    for metric, label in (("hard_miou", "hard-class mIoU"), ("miou", "mIoU")):
        e = effect[metric]
        spread = f" (per seed {', '.join(f'{d:+.3f}' for d in e['per_seed'])})" if len(e["per_seed"]) > 1 else ""
        ci = f", 95% CI [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]" if e["ci_low"] is not None else ""
        click.echo(f"distillation effect on {label}: {e['mean']:+.3f}{spread}{ci}")
    click.echo(f"pictures: {', '.join(result['pictures'].values())}")
    click.echo(f"\nreports in {result['out_dir']}; total {time.perf_counter() - t0:.0f} s")


@main.command()
@out_option("bench", help="Work files and bench-<machine>.json go here.")
@click.option("--frames", default=48, show_default=True, type=click.IntRange(min=2), help="Scans per synthetic sequence (train 00, val 08).")
@click.option("--depth", type=click.Choice(["18", "34"]), default="34", show_default=True)
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--gpu", is_flag=True, help="Time training rows on CUDA (torch fp32 and bf16; MinkowskiEngine if built with CUDA).")
@click.option("--quick", is_flag=True, help="Smaller scans (32 beams): a smoke run, not the figures of record.")
@friendly_errors
def bench(out_dir, frames, depth, repeats, gpu, quick):
    """Measure every stage against its baseline in one run; print one table, write JSON."""
    from m2skd.pipeline.bench import format_table, run_bench

    bar = Progress("bench", unit="stage", bar=False)
    result = run_bench(out_dir, frames=frames, depth=int(depth), repeats=repeats, gpu=gpu, quick=quick,
                       announce=lambda msg: click.echo(f"== {msg}", err=True), progress=bar)
    bar.close()
    click.echo(format_table(result))
    click.echo(f"\nwritten {result['path']}")


@main.command()
@click.argument("run_dir", type=Location(exists=True, file_okay=False))
@out_option(None, help="Where the PNGs go (default RUN_DIR/show).")
@click.option("--views", default="bev,fusion,cache", show_default=True,
              help="bev: one val scan, ground truth beside each checkpoint; fusion: one hard-class instance before/after "
                   "fusion; cache: teacher-cache targets beside the students on one train scan.")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="NAME|PATH",
              help="A run name under RUN_DIR (distilled, baseline-s1, ...) or a model.pt (repeatable; default: "
                   "baseline, distilled, teacher).")
@click.option("--scan", default=None, metavar="SEQ/FRAME", callback=scan_id,
              help="Scan for bev and fusion (default: the one with most hard-class instances).")
@click.option("--cache-scan", default=None, metavar="SEQ/FRAME", callback=scan_id, help="Scan for the cache view (a cached train scan).")
@backend_option()
@device_option("cpu")
@friendly_errors
def show(run_dir, out_dir, views, checkpoints, scan, cache_scan, backend, device):
    """PNG pictures of a run: predictions from above, fusion of one instance, teacher targets."""
    from m2skd.pipeline.show import run_show

    written = run_show(run_dir, out_dir, checkpoints or None, csv_list(views) or (), scan, cache_scan, backend, device)
    for view, info in written.items():
        click.echo(f"{view}: {info['path']} (scan {info['scan']})")


@main.command()
@out_option("runs/demo", help="A demo directory: its data, teacher and cache are reused (made first if missing).")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, metavar="S1,S2,...", help="Student seeds, one distilled/baseline pair each.")
@size_option()
@seed_option(help="Seed of the data and the teachers (the demo's --seed).")
@click.option("--kd-forms", default="kl", show_default=True, metavar="kl[,release]",
              help="Logit forms to compare, each paired with the same baselines.")
@click.option("--arm", "arm_specs", multiple=True, metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
              help="A further arm of distilled students paired with the same baselines, e.g. "
                   "kdh4:kd_hard_weight=4 (repeatable; distillation settings only).")
@click.option("--teachers", default="none,hard,all", show_default=True, metavar="none,hard,all",
              help="Teachers by their input's fusion (prepare --fusion): hard (the method), none (single scans: plain "
                   "self-distillation), all (whole scans); each with its own data and cache, all paired with the same "
                   "baselines and seeds.")
@backend_option("torch")
@set_option(help="Override a training config key.")
@friendly_errors
def study(out_dir, seeds, size, seed, kd_forms, arm_specs, teachers, backend, overrides):
    """Distillation effect over paired seeds, per teacher (none, hard, all): mean, 95% t-interval and
    per-seed values for hard-class mIoU, mIoU, the transfer diagnostic (KL to the teacher, agreement),
    each class and the sparse-instance buckets. Re-running adds what is missing (seeds, forms, teachers)."""
    from m2skd.fusion import FUSION_MODES
    from m2skd.losses import KD_FORMS
    from m2skd.pipeline.study import run_study

    try:
        seed_list = [int(v) for v in csv_list(seeds) or ()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds")
    forms = csv_list(kd_forms) or ("kl",)
    bad = [f for f in forms if f not in KD_FORMS]
    if bad or not seed_list:
        raise click.BadParameter(f"seeds and forms ({', '.join(KD_FORMS)}) needed, got {seeds!r} / {kd_forms!r}")
    teacher_list = csv_list(teachers) or ()
    if not teacher_list or any(t not in FUSION_MODES for t in teacher_list):
        raise click.BadParameter(f"expected some of {', '.join(FUSION_MODES)}, got {teachers!r}", param_hint="--teachers")
    progress_factory = StageBars()

    base = check_overrides(size, overrides)
    arms = {form: {"kd_form": form} for form in forms} | check_arms(size, base, arm_specs, forms)
    result = run_study(out_dir, seed_list, size=size, seed=seed, backend=backend, arms=arms, overrides=base, on_stage=stage_announcer(progress_factory),
                       progress_factory=progress_factory, teachers=teacher_list)
    progress_factory.close()
    table = result["table"]
    shown = table[table["group"].isin(["summary", "transfer"]) & ~table["metric"].str.contains(" ")
                  | ((table["group"] == "class IoU") & table["hard"])
                  | (table["group"].str.startswith("instances") & table["metric"].str.endswith("hit rate"))]
    click.echo(f"\ndistillation effect over seeds {', '.join(map(str, result['seeds']))} (distilled - baseline; "
               f"kl_*: KL(teacher || student) x T^2, lower is closer):")
    seed_columns = [c for c in table.columns if c.startswith("seed ")]
    click.echo(shown.drop(columns=["hard"] + seed_columns).to_string(index=False, float_format=lambda v: f"{v:+.3f}",
                                                                     na_rep="-"))
    click.echo("\nwhat each teacher could pass on (hard-class mIoU; val unless named; targets: its argmax on its own input at the single-scan points):")
    for teacher, st in result["standing"].items():
        targets = ", ".join(f"{split} {v:.3f}" for split, v in st["targets"].items()) or "not recorded"
        click.echo(f"  {teacher}: teacher on single scans {st['teacher_single_scan']:.3f}; targets {targets}; "
                   f"students {st['students']['mean']:.3f} ({st['students']['min']:.3f}-{st['students']['max']:.3f}); "
                   f"baselines {st['baselines']['mean']:.3f} ({st['baselines']['min']:.3f}-{st['baselines']['max']:.3f})")
    click.echo(f"\nper-seed values, every class, instance and transfer bucket in {result['out_dir']}/study.csv; "
               f"{result['seconds']:.0f} s")


def print_instances(table) -> None:
    """The sparse-instance buckets, checkpoints side by side (mean point recall, hit rate)."""
    if table is None or not len(table):
        return
    click.echo("\nhard-class instances (recall: mean point recall; hit: share with recall >= 0.5):")
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))


def print_table(table) -> None:
    head = ["checkpoint", "miou", "hard_miou", "miou_present", "accuracy"]
    rest = [c for c in table.columns if c not in head]
    click.echo(table[head].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo("\nper-class IoU:")
    click.echo(table[["checkpoint"] + rest].set_index("checkpoint").T.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
