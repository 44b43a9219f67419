"""DistributedDataParallel on CPU (gloo, 2 ranks through torchrun): data split, ranks in sync
(the feature adapter included), validation split across ranks equal to a single process's."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from m2skd.checkpoint import load_checkpoint
from m2skd.dataset import ResumableBatchSampler, ScanDataset, collate
from m2skd.inference import evaluate
from m2skd.metrics import summarize
from m2skd.rundir import RunDir, spec_for_run
from m2skd.train_config import TrainConfig
from m2skd.trainer import train
from m2skd.pipeline.cache_teacher import CacheConfig, run_cache

ROOT = Path(__file__).resolve().parent.parent
TINY = TrainConfig(depth=18, widths=(8, 16, 16, 16, 16, 16, 12, 12), stem_width=8, backend="torch", voxel_size=0.4,
                   steps=3, batch_size=1, lr=0.01, workers=0, checkpoint_every=100, val_every=3, val_max_scans=None,
                   log_every=1)


def test_ranks_see_disjoint_samples_covering_each_epoch():
    n, batch, world = 12, 2, 2
    steps_per_epoch = n // (batch * world)
    seen = {}
    for rank in range(world):
        sampler = ResumableBatchSampler(n, batch, 2 * steps_per_epoch, seed=4, rank=rank, world=world)
        seen[rank] = [item for b in sampler for item in b]
    for epoch in (0, 1):
        per_rank = [{i for i, e in seen[r] if e == epoch} for r in range(world)]
        assert not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == set(range(n))


@pytest.fixture(scope="module")
def cached_run(prepared_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    shutil.copytree(prepared_run[0], run)  # its own teacher and cache, apart from other modules' runs
    # a wider teacher, so the student needs a learnable adapter to match its features
    wider = dataclasses.replace(TINY, val_every=0, batch_size=2, widths=(8, 16, 16, 16, 16, 16, 12, 16))
    teacher = train(run, "teacher", wider, name="teacher-ddp", overwrite=True)
    run_cache(run, teacher["checkpoint"], CacheConfig(backend="torch", device="cpu"))
    return run


def test_two_ranks_stay_identical_and_validate_together(cached_run, tmp_path):
    run = cached_run
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(TINY).items()}
    cfg.update(feat_weight=1.0)  # the adapter trains: it must be inside DDP to stay in sync
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/ddp_worker.py"), str(run), str(tmp_path / "cfg.yaml"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps_done"] == 3
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    params = [k for k in ranks[0] if "running" not in k and "num_batches" not in k]
    assert any(k.startswith("adapter.") for k in params)
    for key in params:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # the validation the two ranks did together equals one process validating the saved model
    model, ckpt = load_checkpoint(result["checkpoint"], "torch", "cpu")
    spec = spec_for_run(RunDir(run))
    val = ScanDataset(run, spec, ("val",), "single", TINY.voxel_size, None, skip_empty=True)
    loader = torch.utils.data.DataLoader(val, batch_size=1, collate_fn=collate)
    single = summarize(evaluate(model, loader, spec.num_classes, torch.device("cpu")).matrix, spec.class_names,
                       spec.hard_classes)
    assert result["history"][-1]["miou"] == pytest.approx(single["miou"], abs=1e-12)
    assert result["history"][-1]["hard_miou"] == pytest.approx(single["hard_miou"], abs=1e-12)
    assert ckpt["record"]["world_size"] == 2
