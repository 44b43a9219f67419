"""Prepare's rate at 1 job against the I/O-only rate, its CPU per scan, and a re-run on the
finished output, for the code tree on PYTHONPATH (so two trees can be compared in turns).

    PYTHONPATH=TREE python scripts/prepare_rate.py DATA OUT    # prints one JSON line

DATA: a SemanticKITTI-layout dataset, e.g. `m2skd synth DATA --sequences 00 --frames 32`
(64 beams); OUT is removed first. k = 4, 8 frames a shard, as the bench's prepare row.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import m2skd.pipeline.prepare as pp
from m2skd import semantickitti as sk
from m2skd.dataset_spec import load_spec
from m2skd.fusion import FusionConfig
from m2skd.pipeline.bench import io_only_rate


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    sequences = tuple(sk.list_sequences(data))
    cfg = pp.PrepareConfig(FusionConfig(k=4), frames_per_shard=8)
    shutil.rmtree(out, ignore_errors=True)
    load_spec()  # the dataset description's YAML, parsed outside the timing
    c0, t0 = time.process_time(), time.perf_counter()
    s = pp.run_prepare(data, out, cfg, jobs=1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    io = io_only_rate(data, sequences, s["shard_bytes"], out)
    t1 = time.perf_counter()
    again = pp.run_prepare(data, out, cfg, jobs=1)
    rerun = time.perf_counter() - t1
    print(json.dumps({"tree": pp.__file__, "scans": s["scans"], "scans_per_s": s["scans"] / wall, "io_only_scans_per_s": io,
                      "ratio": s["scans"] / wall / io, "cpu_ms_per_scan": 1000 * cpu / s["scans"], "rerun_s": rerun,
                      "rerun_shards_written": again["shards_written"], "bytes_per_single_point": s["bytes_per_single_point"]}))


if __name__ == "__main__":
    main()
