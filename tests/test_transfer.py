"""Transfer diagnostic (KL(teacher || student) x T^2, argmax agreement) against hand computations."""
import math

import numpy as np
import pytest

from m2skd.transfer import TransferAccumulator, pointwise_kl


def _kl_by_hand(s, t, temp):
    """KL(p_t || p_s) x T^2 of one point, written out with math (no numpy broadcasting)."""
    zt = [v / temp for v in t]
    zs = [v / temp for v in s]
    nt = sum(math.exp(v) for v in zt)
    ns = sum(math.exp(v) for v in zs)
    return temp * temp * sum(math.exp(a) / nt * ((a - math.log(nt)) - (b - math.log(ns))) for a, b in zip(zt, zs))


def test_pointwise_kl_by_hand():
    s = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    t = np.array([[0.0, 2.0, 0.0], [3.0, -1.0, 0.5]])
    kl = pointwise_kl(s, t, 2.0)
    assert kl[0] == pytest.approx(_kl_by_hand(s[0], t[0], 2.0), rel=1e-12)
    assert kl[1] == pytest.approx(0.0, abs=1e-12)


def test_transfer_summary_by_hand():
    """Two scans, 3 classes (0 = unlabelled, never predicted). Class 2 is hard."""
    temp = 1 / 0.3
    # scan A: 4 points; points 1, 2 are one hard instance (key 5), point 3 a 1-point hard instance
    sa = np.array([[9.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.5], [0.0, 0.2, 0.1]])
    ta = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.5], [0.0, 0.0, 3.0]])
    hard_a = np.array([False, True, True, True])
    keys_a = np.array([0, 5, 5, 7])
    # scan B: 2 points, the same key 5 is another instance (keys are per scan), of 2 points
    sb = np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    tb = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    hard_b = np.array([True, True])
    keys_b = np.array([5, 5])
    acc = TransferAccumulator(temp).add(sa, ta, hard_a, keys_a).add(sb, tb, hard_b, keys_b)
    out = acc.summary()

    kl = [_kl_by_hand(s, t, temp) for s, t in zip(np.concatenate([sa, sb]), np.concatenate([ta, tb]))]
    # argmax over classes 1..2: student A: 1, 2, 1, 1 ; teacher A: 1, 2, 2, 2 ; student B: 1, 2 ; teacher B: 1, 1
    # (student A point 0 has its largest logit on class 0, which is never predicted)
    agree = [1, 1, 0, 0, 1, 0]
    assert out["all"]["points"] == 6
    assert out["all"]["kl"] == pytest.approx(sum(kl) / 6, rel=1e-9)
    assert out["all"]["agreement"] == pytest.approx(3 / 6)
    hard = [1, 2, 3, 4, 5]
    assert out["hard"]["points"] == 5
    assert out["hard"]["kl"] == pytest.approx(sum(kl[i] for i in hard) / 5, rel=1e-9)
    assert out["hard"]["agreement"] == pytest.approx(2 / 5)
    # instances: A/5 (2 points), A/7 (1 point), B/5 (2 points); per instance mean, then mean per bucket
    buckets = {b["bucket"]: b for b in out["by_points"]}
    assert [b["bucket"] for b in out["by_points"]] == ["1-9", "10-29", "30-99", "100+"]
    a5, a7, b5 = (kl[1] + kl[2]) / 2, kl[3], (kl[4] + kl[5]) / 2
    assert buckets["1-9"]["count"] == 3
    assert buckets["1-9"]["kl"] == pytest.approx((a5 + a7 + b5) / 3, rel=1e-9)
    assert buckets["1-9"]["agreement"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert buckets["100+"] == {"bucket": "100+", "count": 0, "kl": None, "agreement": None}
    assert out["temperature"] == pytest.approx(temp)


def test_transfer_buckets_by_instance_size():
    rng = np.random.default_rng(0)
    keys = np.repeat([1, 2, 3], [12, 40, 3])  # 10-29, 30-99, 1-9
    s, t = rng.normal(size=(55, 4)), rng.normal(size=(55, 4))
    out = TransferAccumulator(2.0).add(s, t, keys > 0, keys).summary()
    kl = pointwise_kl(s, t, 2.0)
    got = {b["bucket"]: b for b in out["by_points"]}
    assert got["10-29"]["count"] == 1 and got["10-29"]["kl"] == pytest.approx(kl[:12].mean())
    assert got["30-99"]["count"] == 1 and got["30-99"]["kl"] == pytest.approx(kl[12:52].mean())
    assert got["1-9"]["count"] == 1 and got["1-9"]["kl"] == pytest.approx(kl[52:].mean())


def test_empty_accumulator_reports_none():
    out = TransferAccumulator(1.0).summary()
    assert out["all"] == {"points": 0, "kl": None, "agreement": None}
    assert all(b["count"] == 0 for b in out["by_points"])
