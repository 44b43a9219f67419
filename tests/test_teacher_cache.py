"""Cache encodings: decoded targets stay close to the exact teacher outputs."""
import numpy as np
import pytest

from m2skd.teacher_cache import (FEATURE_ENCODINGS, LOGIT_ENCODINGS, decode_features, decode_logits, encode_features,
                                 encode_logits, kl_error, log_softmax)

RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(500, 20)) * 3).astype(np.float32)
LOGITS[:, 4] += 5


@pytest.mark.parametrize("encoding", LOGIT_ENCODINGS)
def test_logit_encodings_round_trip(encoding):
    decoded = decode_logits(encode_logits(LOGITS, encoding), 20)
    assert decoded.shape == LOGITS.shape and np.isfinite(decoded).all()
    assert (decoded.argmax(1) == LOGITS.argmax(1)).mean() > 0.99  # fp16 may split near-ties
    if encoding.startswith("top"):
        k = int(encoding[3:])
        # the K stored classes keep their logits; the rest share exactly the remaining mass
        top = np.argsort(-LOGITS, axis=1)[:, :k]
        np.testing.assert_allclose(np.take_along_axis(decoded, top, 1), np.take_along_axis(LOGITS, top, 1), rtol=1e-3, atol=1e-2)
        p, q = np.exp(log_softmax(LOGITS, 1.0)), np.exp(log_softmax(decoded, 1.0))
        np.testing.assert_allclose(np.take_along_axis(q, top, 1).sum(1), np.take_along_axis(p, top, 1).sum(1), atol=2e-3)


def test_kl_error_orders_encodings():
    kl = {e: kl_error(LOGITS, decode_logits(encode_logits(LOGITS, e), 20), 1 / 0.3) for e in LOGIT_ENCODINGS}
    assert kl["fp32"] == 0.0 and kl["fp16"] < 1e-6
    assert kl["top8"] < kl["top4"] < kl["top2"]


@pytest.mark.parametrize("encoding", FEATURE_ENCODINGS)
def test_feature_encodings_round_trip(encoding):
    feats = RNG.normal(size=(300, 96)).astype(np.float32)
    feats[:5] = 0.0  # all-zero rows must survive int8 scaling
    got = decode_features(encode_features(feats, encoding))
    tol = {"fp32": 0, "fp16": 1e-3, "int8": 1 / 127}[encoding]
    assert np.abs(got - feats).max() <= tol * np.abs(feats).max(axis=1).max() + 1e-7
    assert (got[:5] == 0).all()


def test_encodings_refuse_values_they_would_store_as_inf():
    big = np.zeros((3, 20), np.float32)
    big[1, 4] = 7e4  # > fp16's 65504
    for enc in ("fp16", "top2", "top8"):
        with pytest.raises(ValueError, match=rf"logits reach 7e\+04, beyond the {enc} encoding's range \(65504\)"):
            encode_logits(big, enc)
    assert np.array_equal(decode_logits(encode_logits(big, "fp32"), 20), big)
    assert np.allclose(decode_features(encode_features(big, "int8")), big, rtol=0.01, atol=7e4 / 127)  # fp16 scale fits
    with pytest.raises(ValueError, match="beyond the int8 encoding's range"):
        encode_features(big * 200, "int8")
    nan = big.copy()
    nan[0, 0] = np.nan
    for enc in ("fp32", "fp16"):
        with pytest.raises(ValueError, match="features are not finite"):
            encode_features(nan, enc)
