"""The paired effect and its 95% t-interval against values worked out by hand and t tables."""
import math

import pytest

from m2skd.stats import paired_effect, t_cdf, t_quantile


@pytest.mark.parametrize("df, table", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)])
def test_t_quantile_matches_printed_tables(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-7)
    assert t_quantile(0.025, df) == pytest.approx(-table, abs=5e-7)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t) / pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_effect_by_hand():
    # deltas 0.01, 0.05, -0.02, 0.04, 0.02: mean 0.02; squared deviations 1e-4, 9e-4, 16e-4, 4e-4, 0
    # -> sd = sqrt(30e-4 / 4) = sqrt(7.5e-4); half-width = 2.7764451 * sd / sqrt(5)
    e = paired_effect([0.01, 0.05, -0.02, 0.04, 0.02])
    sd = math.sqrt(7.5e-4)
    half = 2.7764451 * sd / math.sqrt(5)
    assert e["n"] == 5 and e["mean"] == pytest.approx(0.02)
    assert e["sd"] == pytest.approx(sd)
    assert e["ci_low"] == pytest.approx(0.02 - half, abs=1e-8) and e["ci_high"] == pytest.approx(0.02 + half, abs=1e-8)
    assert (e["min"], e["max"]) == (-0.02, 0.05)
    assert e["per_seed"] == [0.01, 0.05, -0.02, 0.04, 0.02]


def test_paired_effect_with_one_or_undefined_seeds():
    one = paired_effect([0.03])
    assert one["mean"] == 0.03 and one["ci_low"] is None and one["sd"] is None
    gaps = paired_effect([0.1, None, float("nan"), 0.3])  # empty buckets for two seeds
    assert gaps["n"] == 2 and gaps["per_seed"] == [0.1, None, None, 0.3] and gaps["mean"] == pytest.approx(0.2)
    half = 12.7062047 * math.sqrt(0.02) / math.sqrt(2)
    assert gaps["ci_high"] == pytest.approx(0.2 + half, abs=1e-7)
    assert paired_effect([None])["mean"] is None
