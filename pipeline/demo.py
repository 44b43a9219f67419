"""`m2skd demo`: the whole method on a small synthetic dataset, ending in a comparison table.

synth -> prepare -> train-teacher -> cache-teacher -> train-student (distilled) and the
baseline (same everything, no distillation) -> eval of all three on the val sequence.
Every step is the same library call the stage commands make; re-running resumes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from m2skd.fusion import FusionConfig
from m2skd.synth import SynthConfig, generate_dataset
from m2skd.train_config import load_config
from m2skd.trainer import train

from .cache_teacher import CacheConfig, run_cache
from .evaluate import run_eval
from .prepare import PrepareConfig, run_prepare


@dataclass(frozen=True)
class DemoSize:
    train_sequences: tuple[str, ...] = ("00", "01")
    val_sequences: tuple[str, ...] = ("08",)
    frames: int = 40
    beams: int = 32
    azimuth_steps: int = 1024
    steps: int = 300
    config: str = "demo"
    jobs: int = 2


SIZES = {
    "default": DemoSize(),
    "tiny": DemoSize(train_sequences=("00",), frames=8, beams=16, azimuth_steps=512, steps=6, jobs=1),
}


def run_demo(out_dir, size: str = "default", seed: int = 0, backend: str = "auto", overrides: dict | None = None,
             on_stage=None, progress_factory=None) -> dict:
    """on_stage(name) announces each stage; progress_factory(name) gives a progress callable."""
    s = SIZES[size]
    out = Path(out_dir)
    data, run = out / "data", out / "run"
    announce = on_stage or (lambda name: None)
    bar = progress_factory or (lambda name: None)

    announce("synth")
    if not (data / "sequences").is_dir() or len(list((data / "sequences").iterdir())) < len(s.train_sequences + s.val_sequences):
        p = bar("synth")
        generate_dataset(data, sequences=s.train_sequences + s.val_sequences, frames=s.frames, seed=seed,
                         config=SynthConfig(beams=s.beams, azimuth_steps=s.azimuth_steps), jobs=s.jobs,
                         progress=(lambda n=1: p(advance=n)) if p else None)
    announce("prepare")
    prep = run_prepare(data, run, PrepareConfig(FusionConfig(), frames_per_shard=10), jobs=s.jobs, progress=bar("prepare"))

    cfg = load_config(s.config, {"steps": s.steps, "seed": seed, "backend": backend, **(overrides or {})})
    trained = {}

    def fit(role, name, config):
        announce(f"train {name}")
        done = run.joinpath(name, "model.pt")
        if done.exists():
            return str(done)
        p = bar(f"train {name}")
        last = run.joinpath(name, "checkpoints", "last.pt")
        result = train(run, role, config, name=name, resume=last.exists(),
                       callback=(lambda step, total, logs: p(total=total, done=None, set_to=step, postfix=logs)) if p else None)
        return result["checkpoint"]

    trained["teacher"] = fit("teacher", "teacher", cfg)
    announce("cache-teacher")
    cache = run_cache(run, trained["teacher"], CacheConfig(backend=backend), jobs=1, progress=bar("cache-teacher"))
    trained["distilled"] = fit("student", "distilled", cfg)
    trained["baseline"] = fit("student", "baseline", cfg.no_distill())

    announce("eval")
    ordered = [trained["baseline"], trained["distilled"], trained["teacher"]]
    report = run_eval(ordered, split="val", data_root=data, out_dir=run / "eval", backend=backend, workers=1, progress=bar("eval"))
    return {"prepare": prep, "cache": cache, "checkpoints": trained, "table": report["table"], "out_dir": report["out_dir"],
            "size": dataclasses.asdict(s)}
