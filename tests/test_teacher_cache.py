"""Cache encodings: decoded targets stay within each encoding's hand-derived KL bound of the
exact teacher outputs, take the bytes they should, and never overflow on usable logits."""
import numpy as np
import pytest

from m2skd.ragged import RaggedReader, write_ragged
from m2skd.teacher_cache import (DEFAULT_LOGIT_ENCODING, FEATURE_ENCODINGS, LOGIT_ENCODINGS, LP_STEP, decode_features,
                                 decode_logits, encode_features, encode_logits, kl_error, kl_per_point, log_softmax)

T = 1 / 0.3
C = 20
RNG = np.random.default_rng(0)
# spread-out logits (at T every class keeps visible mass: the hard case for a quantiser) with a
# favourite class, plus rows that are near-one-hot, uniform, and huge (a few-step teacher)
LOGITS = (RNG.normal(size=(2000, C)) * 3).astype(np.float32)
LOGITS[:, 4] += 5
LOGITS[:50] *= 20
LOGITS[50:60] = 0.0
LOGITS[60:70] *= 1e5


def max_kl_bound(encoding: str, logits: np.ndarray) -> np.ndarray:
    """Per-point upper bound on KL(exact || decoded) at T, from the encoding's construction.

    fp32/fp16: the rounding error d of each logit moves log p by at most 2 max|d| / T; KL is at
    most half the squared spread of that error (second order), so (2 max|d| / T)^2 / 2.
    topK: the classes outside the K largest keep their total mass P spread equally, so
    KL <= P log(C - K); plus fp16 rounding of the kept values.
    sqB: every sqrt(p) is off by at most half a step h = 1 / (2 (2^B - 1)) before renormalising
    (codes of 0 sit below h^2 in p), and KL ~ 2 sum (d sqrt p)^2 <= 2 C h^2; doubled for the
    renormalisation and the floor.
    lpB: each log-probability is off by at most LP_STEP / 2 (tail below the last level ~1e-11),
    so KL <= (LP_STEP / 2)^2 / 2 plus the rounding of the normaliser: twice that.
    """
    rel = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    n = len(logits)
    if encoding == "fp32":
        return np.full(n, 1e-12)
    if encoding == "fp16":
        d = np.abs(rel).max(axis=1) * 2.0 ** -11
        return (2 * d / T) ** 2 / 2 + 1e-12
    if encoding.startswith("top"):
        k = int(encoding[3:])
        p = np.exp(log_softmax(logits, T))
        rest = np.sort(p, axis=1)[:, : C - k].sum(axis=1)
        d = np.abs(np.sort(rel, axis=1)[:, C - k:]).max(axis=1) * 2.0 ** -11
        return rest * np.log(C - k) + (2 * d / T) ** 2 / 2 + 1e-9
    if encoding.startswith("sq"):
        h = 0.5 / ((1 << int(encoding[2:])) - 1)
        return np.full(n, 2 * 2 * C * h**2)
    if encoding.startswith("lp"):
        return np.full(n, 2 * (LP_STEP / 2) ** 2 / 2 + 1e-9)
    raise AssertionError(encoding)


def raw_bytes_per_point(encoding: str) -> float:
    if encoding == "fp32":
        return 4 * C
    if encoding == "fp16":
        return 2 * C
    if encoding.startswith("top"):
        k = int(encoding[3:])
        return 2 * k + k + 2  # fp16 values, uint8 classes, fp16 rest
    return C  # one uint8 code per class


@pytest.mark.parametrize("encoding", LOGIT_ENCODINGS)
def test_logit_encoding_within_its_bound(encoding):
    arrays = encode_logits(LOGITS, encoding, T)
    assert sum(a.nbytes for a in arrays.values()) == raw_bytes_per_point(encoding) * len(LOGITS)
    decoded = decode_logits(arrays, C, encoding, T)
    assert decoded.shape == LOGITS.shape and np.isfinite(decoded).all()
    kl = kl_per_point(LOGITS, decoded, T)
    bound = max_kl_bound(encoding, LOGITS)
    assert (kl <= bound).all(), (encoding, float((kl - bound).max()))
    p = np.sort(np.exp(log_softmax(LOGITS, T)), axis=1)
    clear = np.sqrt(p[:, -1]) - np.sqrt(p[:, -2]) > 0.07  # near-ties may swap (sq4: steps of 1/15 in sqrt p)
    assert (decoded.argmax(1) == LOGITS.argmax(1))[clear].all()


def test_quantised_encodings_order_and_default_budget():
    kl = {e: kl_error(LOGITS, decode_logits(encode_logits(LOGITS, e, T), C, e, T), T) for e in LOGIT_ENCODINGS}
    assert kl["fp32"] < 1e-12 and kl["fp16"] < 1e-6
    assert kl["sq8"] < kl["sq7"] < kl["sq6"] < kl["sq5"] < kl["sq4"]
    assert kl["top8"] < kl["top4"] < kl["top2"]
    # the high-rate estimate 2 C h^2 / 3 (error uniform in +-h on each sqrt p) holds on average, within 10%
    for bits in (4, 5, 6, 7, 8):
        h = 0.5 / ((1 << bits) - 1)
        assert kl[f"sq{bits}"] <= 1.1 * 2 * C * h**2 / 3, bits


def test_sq_codes_of_points_sharing_a_voxel_cost_almost_nothing(tmp_path):
    """Points in one teacher voxel get equal targets; stored as the cache stores codes, such
    runs cost a small fraction of the 20 raw bytes per point."""
    from m2skd.pipeline.cache_teacher import CACHE_COMPRESSION

    rows = np.repeat(LOGITS[:200], 50, axis=0)  # 10,000 points, runs of 50 equal rows
    enc = encode_logits(rows, DEFAULT_LOGIT_ENCODING, T)
    nbytes = write_ragged(tmp_path / "c.zarr", {k: [v] for k, v in enc.items()}, {}, compression=CACHE_COMPRESSION)
    assert nbytes < 0.1 * C * len(rows)  # < 2 B/point of 20 raw
    got = RaggedReader(tmp_path / "c.zarr").read(0)
    np.testing.assert_array_equal(got["logit_codes"], enc["logit_codes"])


def test_no_encoding_overflows_and_only_unusable_logits_are_refused():
    huge = LOGITS[:100].astype(np.float64) * 1e30  # far beyond fp16, still a usable softmax
    huge = huge.astype(np.float32)
    for enc in LOGIT_ENCODINGS:
        decoded = decode_logits(encode_logits(huge, enc, T), C, enc, T)
        assert np.isfinite(decoded).all(), enc
        assert (kl_per_point(huge, decoded, T) <= max_kl_bound(enc, huge) + 1e-9).all(), enc
    minus_inf = LOGITS[:3].copy()
    minus_inf[:, 0] = -np.inf  # probability 0: fine
    assert np.isfinite(decode_logits(encode_logits(minus_inf, "sq5", T), C, "sq5", T)).all()
    for bad in (np.nan, np.inf):
        z = LOGITS[:3].copy()
        z[1, 2] = bad
        for enc in LOGIT_ENCODINGS:
            with pytest.raises(ValueError, match="NaN or \\+inf"):
                encode_logits(z, enc, T)


@pytest.mark.parametrize("encoding", FEATURE_ENCODINGS)
def test_feature_encodings_round_trip(encoding):
    feats = RNG.normal(size=(300, 96)).astype(np.float32)
    feats[:5] = 0.0  # all-zero rows must survive int8 scaling
    got = decode_features(encode_features(feats, encoding))
    tol = {"fp32": 0, "fp16": 1e-3, "int8": 1 / 127}[encoding]
    assert np.abs(got - feats).max() <= tol * np.abs(feats).max(axis=1).max() + 1e-7
    assert (got[:5] == 0).all()


def test_int8_features_hold_any_finite_value():
    big = RNG.normal(size=(4, 8)).astype(np.float32) * 1e30
    got = decode_features(encode_features(big, "int8"))
    assert np.allclose(got, big, rtol=0, atol=float(np.abs(big).max()) / 127)
    with pytest.raises(ValueError, match="beyond the fp16 encoding's range"):
        encode_features(big, "fp16")
    nan = big.copy()
    nan[0, 0] = np.nan
    for enc in FEATURE_ENCODINGS:
        with pytest.raises(ValueError, match="features are not finite"):
            encode_features(nan, enc)
