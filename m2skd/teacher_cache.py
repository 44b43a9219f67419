"""Compact encodings of cached teacher targets, and what each costs in accuracy.

Distillation uses the teacher's logits only through softmax(z / T), which is unchanged by a
per-point shift, so no encoding stores raw logits: a teacher whose logits are huge (a few
training steps, batch-norm statistics still at their start) caches like any other, and only
NaN (or +inf, which a softmax cannot use either) is refused.

Logits:
- `fp32`, `fp16`: logits minus the point's maximum (fp16 clips the tail at -65504, where the
  probability is 0 at any useful T).
- `topK`: the K largest logits (relative to the maximum, fp16) with their class ids, plus the
  others' mass at T (T log-sum-exp of z / T); on decode the others share that mass equally.
- `sqB` (default `sq6`): the square roots of the probabilities at the cache temperature T,
  quantised uniformly to 2^B - 1 levels (uint8 codes; stored with zstd level 5 unshuffled,
  CODES_CLEVEL, which finds the repeated rows of points that share a teacher voxel). sqrt is
  where KL is flat: an error e in sqrt(p) costs about 2 e^2 nats per class wherever p lies, so
  one step size serves every class (mean KL about 2 C h^2 / 3 for a half-step h) and tail
  probabilities below h^2 fall to a floor. Decoded as T * log(q): logits up to a per-point
  shift, exact for a softmax at T (any other T gets q tempered accordingly).
- `lpB`: log-probabilities at T relative to the maximum, uniform steps of 0.1 nat,
  clipped at the last level (a comparison point for `sqB`).
Features (hard-class points only): `fp32`, `fp16`, or `int8` with one fp32 scale per point
(symmetric, max-abs; fp32 so no finite feature overflows it).
"""
from __future__ import annotations

import re

import numpy as np

LOGIT_ENCODINGS = ("fp32", "fp16", "top2", "top4", "top8", "lp8", "sq8", "sq7", "sq6", "sq5", "sq4")
FEATURE_ENCODINGS = ("fp32", "fp16", "int8")
DEFAULT_LOGIT_ENCODING = "sq6"
DEFAULT_FEATURE_ENCODING = "int8"
#: Stored layout of the cache; a change makes older caches stale (their fingerprint differs).
CACHE_FORMAT = 2  # 2: logits relative to the point's maximum, sqB/lpB codes, fp32 int8 scales
_FP16_MAX = float(np.finfo(np.float16).max)
LP_STEP = 0.1  # nats per lpB level
#: zstd level for the uint8 codes, unshuffled: on a 64-beam scan 2.2 B/point for sq6 against
#: 2.9 at level 1 and 3.5-3.9 with byte or bit shuffling (runs/enc measurement, docs/results.md)
CODES_CLEVEL = 5


def _check_finite(values: np.ndarray, kind: str) -> None:
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"teacher {kind} are not finite (NaN or inf)")


def _topk(encoding: str) -> int | None:
    m = re.fullmatch(r"top(\d+)", encoding)
    return int(m.group(1)) if m else None


def _bits(encoding: str, family: str) -> int | None:
    m = re.fullmatch(rf"{family}(\d)", encoding)
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= 8 else None


def log_softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    """float64 log-probabilities at T; -inf logits give -inf, +inf or NaN give NaN."""
    z = np.asarray(z, dtype=np.float64) / temperature
    m = np.max(z, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _relative(logits: np.ndarray) -> np.ndarray:
    """Logits minus each point's maximum (float64); refuses what a softmax cannot use."""
    z = np.asarray(logits, dtype=np.float64)
    if z.size and (np.isnan(z).any() or np.isposinf(z).any()):
        raise ValueError("teacher logits are NaN or +inf, which no softmax can use")
    if not z.size:
        return z
    top = z.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError("teacher logits are -inf for every class of a point")
    return z - top


def encode_logits(logits: np.ndarray, encoding: str, temperature: float = 1.0 / 0.3) -> dict[str, np.ndarray]:
    """One scan's (n, C) logits -> arrays to store (rows in point order)."""
    rel = _relative(logits)
    if encoding == "fp32":
        return {"logits": rel.astype(np.float32)}
    if encoding == "fp16":
        return {"logits": np.maximum(rel, -_FP16_MAX).astype(np.float16)}
    bits = _bits(encoding, "sq")
    if bits is not None:
        levels = (1 << bits) - 1
        root = np.exp(log_softmax(rel, temperature) / 2)
        return {"logit_codes": np.rint(root * levels).astype(np.uint8)}
    bits = _bits(encoding, "lp")
    if bits is not None:
        lp = log_softmax(rel, temperature)
        return {"logit_codes": np.minimum(np.rint(-lp / LP_STEP), (1 << bits) - 1).astype(np.uint8)}
    k = _topk(encoding)
    if k is None:
        raise ValueError(f"unknown logit encoding {encoding!r}; choose from {LOGIT_ENCODINGS}")
    order = np.argpartition(-rel, k - 1, axis=1)
    idx, rest = order[:, :k], order[:, k:]
    vals = np.take_along_axis(rel, idx, axis=1)
    others = np.take_along_axis(rel, rest, axis=1)
    top = others.max(axis=1, keepdims=True) if others.size else np.zeros((len(rel), 1))
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # T log sum exp(z / T) over the others: their mass at T
        lse_rest = (top + temperature * np.log(np.exp((others - top) / temperature).sum(axis=1, keepdims=True)))[:, 0]
    clip = lambda x: np.maximum(x, -_FP16_MAX).astype(np.float16)  # noqa: E731
    return {"logit_values": clip(vals), "logit_classes": idx.astype(np.uint8), "logit_rest": clip(lse_rest)}


def decode_logits(arrays: dict[str, np.ndarray], num_classes: int, encoding: str, temperature: float) -> np.ndarray:
    """fp32 (n, C) logits up to a per-point shift: softmax(decoded / T) is the stored target.
    `encoding` and `temperature` are the cache's (its attributes record both; stored_logits
    reads them)."""
    if "logits" in arrays:
        return np.asarray(arrays["logits"], dtype=np.float32)
    if "logit_codes" in arrays:
        codes = np.asarray(arrays["logit_codes"])
        bits = _bits(encoding, "sq")
        if bits is not None:
            levels = (1 << bits) - 1
            q = (codes.astype(np.float64) / levels) ** 2
            q[codes == 0] = (0.5 / levels) ** 2 / 3  # mean p over the zero level's range of sqrt(p)
            lq = np.log(q) - np.log(q.sum(axis=1, keepdims=True))
        elif _bits(encoding, "lp") is not None:
            lq = -codes.astype(np.float64) * LP_STEP
        else:
            raise ValueError(f"logit codes of unknown encoding {encoding!r}")
        return (lq * temperature).astype(np.float32)
    vals, idx = arrays["logit_values"], arrays["logit_classes"].astype(np.int64)
    fill = arrays["logit_rest"].astype(np.float32) - np.float32(temperature * np.log(num_classes - idx.shape[1]))
    out = np.repeat(fill[:, None], num_classes, axis=1)
    np.put_along_axis(out, idx, vals.astype(np.float32), axis=1)
    return out


def stored_logits(cache, index: int, num_classes: int) -> np.ndarray:
    """Scan `index`'s decoded logits from a cache group (a RaggedReader: its attributes name the
    encoding and temperature the codes were made with)."""
    return decode_logits(cache.read(index), num_classes, cache.attrs["logit_encoding"], cache.attrs["temperature"])


def encode_features(features: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    _check_finite(features, "features")
    if encoding == "fp32":
        return {"features": features.astype(np.float32)}
    if encoding == "fp16":
        peak = float(np.abs(features).max()) if features.size else 0.0
        if peak > _FP16_MAX:
            raise ValueError(f"teacher features reach {peak:.3g}, beyond the fp16 encoding's range ({_FP16_MAX:.6g})")
        return {"features": features.astype(np.float16)}
    if encoding == "int8":
        scale = np.abs(features).max(axis=1, keepdims=True).astype(np.float32) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint(features / scale).clip(-127, 127).astype(np.int8)
        return {"features_q": q, "feature_scale": scale[:, 0]}
    raise ValueError(f"unknown feature encoding {encoding!r}; choose from {FEATURE_ENCODINGS}")


def decode_features(arrays: dict[str, np.ndarray]) -> np.ndarray:
    if "features" in arrays:
        return np.asarray(arrays["features"], dtype=np.float32)
    return arrays["features_q"].astype(np.float32) * arrays["feature_scale"].astype(np.float32)[:, None]


def kl_per_point(exact: np.ndarray, decoded: np.ndarray, temperature: float) -> np.ndarray:
    """KL(p_exact || p_decoded) of each point at the distillation temperature (nats)."""
    lp = log_softmax(exact, temperature)
    lq = log_softmax(decoded, temperature)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (lp - lq), 0.0).sum(axis=1)


def kl_error(exact: np.ndarray, decoded: np.ndarray, temperature: float) -> float:
    """Mean KL(p_exact || p_decoded) per point at the distillation temperature (nats)."""
    return float(kl_per_point(exact, decoded, temperature).mean()) if len(exact) else 0.0


def bytes_per_point(arrays: dict[str, np.ndarray], n_points: int) -> float:
    return sum(a.nbytes for a in arrays.values()) / max(n_points, 1)
