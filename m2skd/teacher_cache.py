"""Compact encodings of cached teacher targets, and what each costs in accuracy.

Logits: `fp32`, `fp16`, or `topK`: the K largest logits in fp16 with their class ids, plus
the log-sum-exp of the others; on decode the others share that remaining mass equally, so the
target stays a full distribution and its KL to the exact one is finite and small. Features: `fp16`, or `int8` with one fp16 scale
per point (symmetric, max-abs).
"""
from __future__ import annotations

import re

import numpy as np

LOGIT_ENCODINGS = ("fp32", "fp16", "top2", "top4", "top8")
FEATURE_ENCODINGS = ("fp32", "fp16", "int8")
_FP16_MAX = float(np.finfo(np.float16).max)


def check_storable(values: np.ndarray, encoding: str, kind: str) -> None:
    """Refuse values an encoding would store as inf (or NaN): a cache of them trains NaN.

    fp16 and top-K hold |x| <= 65504; int8 keeps an fp16 scale of max|x| / 127.
    """
    if not values.size:
        return
    peak = float(np.abs(values).max())
    if not np.isfinite(peak):
        raise ValueError(f"teacher {kind} are not finite (NaN or inf)")
    limit = {"fp32": np.inf, "int8": _FP16_MAX * 127}.get(encoding, _FP16_MAX)
    if peak > limit:
        raise ValueError(f"teacher {kind} reach {peak:.3g}, beyond the {encoding} encoding's range ({limit:.6g})")


def _topk(encoding: str) -> int | None:
    m = re.fullmatch(r"top(\d+)", encoding)
    return int(m.group(1)) if m else None


def encode_logits(logits: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    check_storable(logits, encoding, "logits")
    if encoding == "fp32":
        return {"logits": logits.astype(np.float32)}
    if encoding == "fp16":
        return {"logits": logits.astype(np.float16)}
    k = _topk(encoding)
    if k is None:
        raise ValueError(f"unknown logit encoding {encoding!r}; choose from {LOGIT_ENCODINGS}")
    order = np.argpartition(-logits, k - 1, axis=1)
    idx, rest = order[:, :k], order[:, k:]
    vals = np.take_along_axis(logits, idx, axis=1)
    others = np.take_along_axis(logits, rest, axis=1).astype(np.float64)
    top = others.max(axis=1, keepdims=True)
    lse_rest = (top + np.log(np.exp(others - top).sum(axis=1, keepdims=True)))[:, 0]
    return {"logit_values": vals.astype(np.float16), "logit_classes": idx.astype(np.uint8), "logit_rest": lse_rest.astype(np.float16)}


def decode_logits(arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """fp32 (n, C)."""
    if "logits" in arrays:
        return np.asarray(arrays["logits"], dtype=np.float32)
    vals, idx = arrays["logit_values"], arrays["logit_classes"].astype(np.int64)
    fill = arrays["logit_rest"].astype(np.float32) - np.float32(np.log(num_classes - idx.shape[1]))
    out = np.repeat(fill[:, None], num_classes, axis=1)
    np.put_along_axis(out, idx, vals.astype(np.float32), axis=1)
    return out


def encode_features(features: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    check_storable(features, encoding, "features")
    if encoding == "fp32":
        return {"features": features.astype(np.float32)}
    if encoding == "fp16":
        return {"features": features.astype(np.float16)}
    if encoding == "int8":
        scale = np.abs(features).max(axis=1, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float16)
        q = np.rint(features / scale.astype(np.float32)).clip(-127, 127).astype(np.int8)
        return {"features_q": q, "feature_scale": scale[:, 0]}
    raise ValueError(f"unknown feature encoding {encoding!r}; choose from {FEATURE_ENCODINGS}")


def decode_features(arrays: dict[str, np.ndarray]) -> np.ndarray:
    if "features" in arrays:
        return np.asarray(arrays["features"], dtype=np.float32)
    return arrays["features_q"].astype(np.float32) * arrays["feature_scale"].astype(np.float32)[:, None]


def log_softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z.astype(np.float64) / temperature
    m = np.max(z, axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def kl_error(exact: np.ndarray, decoded: np.ndarray, temperature: float) -> float:
    """Mean KL(p_exact || p_decoded) per point at the distillation temperature (nats)."""
    lp = log_softmax(exact, temperature)
    lq = log_softmax(decoded, temperature)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def bytes_per_point(arrays: dict[str, np.ndarray], n_points: int) -> float:
    return sum(a.nbytes for a in arrays.values()) / max(n_points, 1)
