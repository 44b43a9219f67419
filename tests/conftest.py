"""Shared small synthetic data, generated once per test session by our own simulator."""
import pytest

from m2skd.synth import SynthConfig, generate_dataset

# small scans; more walkers and cyclists than the default world, so 8 scans hold moving hard instances
SMALL = SynthConfig(beams=24, azimuth_steps=768, walking_persons_per_100m=3.0, riders_per_100m_per_lane=1.0)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Train sequence 00 and val 08 (labelled), test 11 (no labels), 8 scans each."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, sequences=("00", "08", "11"), frames=8, seed=3, config=SMALL)
    return root


@pytest.fixture(scope="session")
def prepared_run(small_dataset, tmp_path_factory):
    from m2skd.fusion import FusionConfig
    from m2skd.pipeline.prepare import PrepareConfig, run_prepare

    run = tmp_path_factory.mktemp("run")
    summary = run_prepare(small_dataset, run, PrepareConfig(FusionConfig(), frames_per_shard=4))
    return run, summary
