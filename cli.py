"""m2skd command line: a thin click layer over pipeline/ (parsing, progress bars, printing)."""
from __future__ import annotations

import functools
import json
import sys

import click

from m2skd.errors import M2SKDError


def friendly_errors(fn):
    """Report our own errors as one clear line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except M2SKDError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


class Progress:
    """Adapter from the pipeline's progress(total=, done=, advance=) calls to a tqdm bar."""

    def __init__(self, desc: str, unit: str = "scan"):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, disable=None, file=sys.stderr)

    def __call__(self, total=None, done=None, advance=None, postfix=None):
        if total is not None:
            self.bar.reset(total=total)
        if done:
            self.bar.update(done)
        if advance:
            self.bar.update(advance)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        self.bar.close()


def echo_summary(title: str, summary: dict) -> None:
    click.echo(f"{title}:")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        click.echo(f"  {key}: {value}")


def csv_list(value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.group()
@click.version_option(package_name="m2skd")
def main():
    """Multi-to-Single Knowledge Distillation for LiDAR semantic segmentation."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--sequences", default="00,08", show_default=True, help="Comma-separated sequence names (their split follows SemanticKITTI).")
@click.option("--frames", default=20, show_default=True, help="Scans per sequence.")
@click.option("--seed", default=0, show_default=True)
@click.option("--beams", default=64, show_default=True, help="Laser beams (size knob).")
@click.option("--azimuth-steps", default=2048, show_default=True, help="Columns per revolution (size knob).")
@click.option("--jobs", default=1, show_default=True)
@friendly_errors
def synth(out, sequences, frames, seed, beams, azimuth_steps, jobs):
    """Write a synthetic SemanticKITTI-layout dataset from a simulated spinning LiDAR."""
    from m2skd.synth import SynthConfig, generate_dataset

    progress = Progress("synth")
    progress(total=frames * len(csv_list(sequences)))
    summary = generate_dataset(out, sequences=csv_list(sequences), frames=frames, seed=seed,
                               config=SynthConfig(beams=beams, azimuth_steps=azimuth_steps), jobs=jobs,
                               progress=lambda n=1: progress(advance=n))
    progress.close()
    echo_summary(f"wrote {out}", {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--fusion", type=click.Choice(["hard", "all", "none"]), default="hard", show_default=True,
              help="hard: fuse hard-class instances only (the method); all: whole previous scans (ablation).")
@click.option("-k", "--k", "k", default=4, show_default=True, help="Previous scans fused into each scan.")
@click.option("--align", type=click.Choice(["centroid", "icp"]), default="centroid", show_default=True,
              help="Moving instances: centroid offset; icp adds a rigid refinement with a rejection test.")
@click.option("--hard-classes", default=None, help="Comma-separated training ids (default: the dataset description's set).")
@click.option("--splits", default=None, help="Comma-separated splits to prepare (train,val,test).")
@click.option("--sequences", default=None, help="Comma-separated sequences to prepare.")
@click.option("--frames-per-shard", default=50, show_default=True)
@click.option("--dataset", default="semantickitti", show_default=True, help="Name or path of a data_manifests/ description.")
@click.option("--jobs", default=1, show_default=True, help="Parallel workers (joblib/loky).")
@click.option("--dask-scheduler", default=None, help="Run shard jobs on this Dask cluster instead.")
@click.option("--overwrite", is_flag=True, help="Rewrite every shard even if done.")
@friendly_errors
def prepare(data, run_dir, fusion, k, align, hard_classes, splits, sequences, frames_per_shard, dataset, jobs, dask_scheduler, overwrite):
    """Align poses and fuse hard-class instances into Zarr shards + a Parquet manifest."""
    import time

    from m2skd.fusion import FusionConfig
    from pipeline.prepare import PrepareConfig, run_prepare

    hard = tuple(int(c) for c in csv_list(hard_classes)) if hard_classes else None
    cfg = PrepareConfig(FusionConfig(mode=fusion, k=k, align=align), frames_per_shard, dataset, hard)
    progress = Progress("prepare")
    t0 = time.perf_counter()
    summary = run_prepare(data, run_dir, cfg, jobs=jobs, splits=csv_list(splits), sequences=csv_list(sequences),
                          overwrite=overwrite, progress=progress, dask_scheduler=dask_scheduler)
    progress.close()
    elapsed = time.perf_counter() - t0
    summary["seconds"] = elapsed
    echo_summary(f"prepared {run_dir}", summary)


if __name__ == "__main__":
    main()
