"""Transfer diagnostic: how close a student's outputs are to a teacher's, where it matters.

A distillation term helps only if it moves the student towards the teacher where the teacher
knows more (DESIGN section 3, strength and transfer), so this measures that directly at
single-scan points: KL(p_teacher || p_student) x T^2 with p = softmax(z / T) (the logit term's
own quantity; T the distillation temperature) and argmax agreement (both argmaxes over the real
classes 1..C-1, as predictions are made). Reported over all points, over hard-class points, and
per hard-class ground-truth instance bucketed by its points in the single scan (the buckets of
`instances.POINT_BUCKETS`): per instance the mean over its points, per bucket the mean over its
instances (every instance weighs the same, as in the instance table). Pure numpy, no I/O.
"""
from __future__ import annotations

import numpy as np

from .inference import predict
from .instances import POINT_BUCKETS, bucket_index
from .teacher_cache import log_softmax


def pointwise_kl(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float) -> np.ndarray:
    """(N,) KL(p_t || p_s) x T^2 per point, in float64 (0 log 0 := 0)."""
    lt = log_softmax(np.asarray(teacher_logits), temperature)
    ls = log_softmax(np.asarray(student_logits), temperature)
    pt = np.exp(lt)
    return np.where(pt > 0, pt * (lt - ls), 0.0).sum(axis=1) * temperature * temperature


class TransferAccumulator:
    """Sums over scans; `summary()` gives the means. Feed one scan at a time (instance keys
    need only be unique within a scan)."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self._sums = {"all": np.zeros(3), "hard": np.zeros(3)}  # points, KL sum, agreeing points
        self._instances: list[np.ndarray] = []  # per scan: (n_instances, 3) points, mean KL, mean agreement

    def add(self, student_logits, teacher_logits, hard, instance_keys) -> "TransferAccumulator":
        """student/teacher logits (N, C); hard (N,) bool hard-class points; instance_keys (N,) int,
        0 outside hard-class instances (e.g. instances.instance_key)."""
        if np.shape(student_logits) != np.shape(teacher_logits):
            raise ValueError(f"student logits {np.shape(student_logits)} and teacher logits "
                             f"{np.shape(teacher_logits)} differ")
        kl = pointwise_kl(student_logits, teacher_logits, self.temperature)
        agree = (predict(np.asarray(student_logits)) == predict(np.asarray(teacher_logits))).astype(np.float64)
        hard = np.asarray(hard, bool)
        for name, sel in (("all", slice(None)), ("hard", hard)):
            self._sums[name] += (kl[sel].size, kl[sel].sum(), agree[sel].sum())
        keys = np.asarray(instance_keys).reshape(-1)
        inside = np.flatnonzero(keys > 0)
        _, inv = np.unique(keys[inside], return_inverse=True)
        points = np.bincount(inv).astype(np.float64)
        if points.size:
            self._instances.append(np.stack([points, np.bincount(inv, weights=kl[inside]) / points,
                                             np.bincount(inv, weights=agree[inside]) / points], axis=1))
        return self

    def summary(self) -> dict:
        """{temperature, all: {points, kl, agreement}, hard: {...}, by_points: [{bucket, count,
        kl, agreement}]}; a mean over nothing is None."""
        out = {"temperature": self.temperature}
        for name, (n, kl, agree) in self._sums.items():
            out[name] = {"points": int(n), "kl": float(kl / n) if n else None, "agreement": float(agree / n) if n else None}
        inst = np.concatenate(self._instances) if self._instances else np.zeros((0, 3))
        which = bucket_index(inst[:, 0], POINT_BUCKETS)
        count = np.bincount(which, minlength=len(POINT_BUCKETS))
        kl = np.bincount(which, weights=inst[:, 1], minlength=len(POINT_BUCKETS))
        agree = np.bincount(which, weights=inst[:, 2], minlength=len(POINT_BUCKETS))
        out["by_points"] = [{"bucket": label, "count": int(c), "kl": float(k / c) if c else None,
                             "agreement": float(a / c) if c else None}
                            for (label, _), c, k, a in zip(POINT_BUCKETS, count, kl, agree)]
        return out
