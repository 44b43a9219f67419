"""Losses checked against values written out by hand (or with plain numpy), not by the code under test."""
import math

import numpy as np
import pytest
import torch

from m2skd.losses import (
    KD_FORM_WEIGHTS,
    descending_order,
    FeatureAdapter,
    affinity_distillation,
    distillation_loss,
    feature_distillation,
    kd_weight_for,
    logit_distillation,
    lovasz_softmax,
    segmentation_loss,
)
from m2skd.train_config import TrainConfig


def _np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------- segmentation


def test_cross_entropy_skips_ignored_points():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [5.0, -3.0, 1.0]])
    labels = np.array([1, 2, 0])  # last point ignored
    lsm = _np_log_softmax(logits)
    expected = -(lsm[0, 1] + lsm[1, 2]) / 2
    total, parts = segmentation_loss(torch.tensor(logits, dtype=torch.float32),
                                     torch.tensor(labels), lovasz_weight=0.0)
    assert parts["ce"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_segmentation_loss_all_ignored_is_finite_and_backprops():
    logits = torch.randn(6, 4, requires_grad=True)
    total, parts = segmentation_loss(logits, torch.zeros(6, dtype=torch.long))
    assert total.item() == 0.0 and torch.isfinite(parts["lovasz"])
    total.backward()
    assert torch.all(torch.isfinite(logits.grad))


def test_lovasz_perfect_prediction_is_zero():
    labels = torch.tensor([1, 2, 2, 3, 0, 1])
    probs = torch.nn.functional.one_hot(labels, 4).float()
    assert lovasz_softmax(probs, labels).item() == pytest.approx(0.0, abs=1e-7)


def _brute_lovasz(probs, labels, ignore=0):
    """Lovasz extension as a threshold integral: f(m) = int_0^1 Delta_J({i: m_i >= t}) dt,
    with Delta_J(A) = |A| / |fg U A| (Berman et al. 2018), averaged over present classes."""
    keep = labels != ignore
    probs, labels = probs[keep], labels[keep]
    losses = []
    for c in sorted(set(labels.tolist())):
        fg = labels == c
        m = np.abs(fg.astype(float) - probs[:, c])
        levels = sorted(set(m.tolist()) | {0.0}, reverse=True)
        value = 0.0
        for hi, lo in zip(levels[:-1], levels[1:]):
            a = m >= hi  # the set {m >= t} for t in (lo, hi]
            value += (hi - lo) * a.sum() / (fg | a).sum()
        losses.append(value)
    return float(np.mean(losses))


def test_lovasz_matches_brute_force_on_five_points():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 4))
    probs = np.exp(_np_log_softmax(logits))
    labels = np.array([1, 3, 1, 0, 2])
    expected = _brute_lovasz(probs, labels)
    got = lovasz_softmax(torch.tensor(probs), torch.tensor(labels)).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_lovasz_float32_with_ties_matches_brute_force():
    """The float32 path (one sort of integer keys) on probabilities with many ties and exact 0/1."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(5), size=40).astype(np.float32)
    probs[10:20] = probs[0]  # repeated rows: tied errors in every class
    probs[30:33] = np.eye(5, dtype=np.float32)[[1, 2, 4]]  # errors of exactly 0 and 1
    labels = rng.integers(0, 5, size=40)
    expected = _brute_lovasz(probs.astype(np.float64), labels)
    got = lovasz_softmax(torch.tensor(probs), torch.tensor(labels)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_descending_order_is_a_stable_sort_of_each_row():
    """Against numpy's stable argsort of the negated rows: rows must not mix (values from 0 to inf
    in every row) and ties keep column order."""
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.integers(0, 4, size=(6, 50)) / 4.0,  # many ties, exact zeros
                             rng.uniform(0, 1e30, size=(6, 20)), np.full((6, 1), np.inf)], axis=1)
    rng.permuted(values, axis=1, out=values)
    for dtype in (np.float32, np.float64):
        expected = np.argsort(-values.astype(dtype), axis=1, kind="stable")
        got = descending_order(torch.tensor(values.astype(dtype))).numpy()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_lovasz_on_cuda_matches_cpu():
    """The same order (one radix sort of the keys there) and so the same loss and gradient."""
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(5000, 20, generator=g) * 6).round()  # saturated, repeated rows: many ties
    labels = torch.randint(0, 20, (5000,), generator=g)
    grads, values = [], []
    for device in ("cpu", "cuda"):
        x = logits.to(device).requires_grad_(True)
        loss = lovasz_softmax(torch.softmax(x, 1), labels.to(device))
        loss.backward()
        grads.append(x.grad.cpu())
        values.append(loss.item())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    errors = torch.rand(7, 3000, generator=g).mul(8).floor().div(8)
    assert torch.equal(descending_order(errors.cuda()).cpu(), descending_order(errors))


def test_lovasz_no_valid_points_keeps_graph():
    probs = torch.rand(3, 4, requires_grad=True)
    loss = lovasz_softmax(probs, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and probs.grad is not None


# ----------------------------------------------------------------- logit distillation


def test_kd_is_zero_when_teacher_equals_student():
    z = torch.randn(7, 5)
    assert logit_distillation(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_temperature_squared_factor():
    # Teacher logits (0, ln 3), uniform student.
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    # T = 1: p_t = (1/4, 3/4), p_s = (1/2, 1/2).
    kl1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    # T = 2: p_t = (1, sqrt 3) / (1 + sqrt 3), multiplied by T^2 = 4.
    a, b = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    kl2 = 4 * (a * math.log(a / 0.5) + b * math.log(b / 0.5))
    assert logit_distillation(student, teacher, temperature=1.0).item() == pytest.approx(kl1, rel=1e-5)
    assert logit_distillation(student, teacher, temperature=2.0).item() == pytest.approx(kl2, rel=1e-5)


def test_kd_masked_mean():
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    got = logit_distillation(student, teacher, 1.0, mask=torch.tensor([True, False]))
    assert got.item() == pytest.approx(kl, rel=1e-5)
    assert logit_distillation(student, teacher, 1.0).item() == pytest.approx(kl / 2, rel=1e-5)
    empty = logit_distillation(student, teacher, 1.0, mask=torch.tensor([False, False]))
    assert empty.item() == 0.0


@pytest.mark.parametrize("filler", [float("-inf"), -65504.0])
def test_kd_with_missing_teacher_classes(filler):
    student = torch.tensor([[0.3, -0.2, 1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    # Row 1: class 1 not stored (top-k). Row 2: nothing stored at all -> no target.
    teacher = torch.tensor([[0.0, filler, math.log(3.0)], [filler, filler, filler]])
    if filler == float("-inf"):
        expected_rows = [0]
    else:  # a finite filler is a (negligible) logit, so row 2 is a uniform target
        expected_rows = [0, 1]
    log_ps = _np_log_softmax(student.detach().numpy())
    p_t = np.array([[0.25, 0.0, 0.75], [1 / 3, 1 / 3, 1 / 3]])
    kls = [sum(p * (math.log(p) - ls) for p, ls in zip(p_t[r], log_ps[r]) if p > 0)
           for r in expected_rows]
    loss = logit_distillation(student, teacher, temperature=1.0)
    assert loss.item() == pytest.approx(float(np.mean(kls)), rel=1e-5)
    loss.backward()
    assert torch.all(torch.isfinite(student.grad))


def _softmax(z, scale=0.3):
    e = [math.exp(scale * v) for v in z]
    return [v / sum(e) for v in e]


def test_release_form_by_hand():
    """5 points at softmax(0.3 z), 3 classes: mean over classes of p_t |log(p_t / p_s)|, no T^2,
    points whose term is below 0.01 dropped, a missing teacher class contributes 0 but counts in C."""
    teacher = [[0.0, 10.0, 0.0], [2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [3.0, float("-inf"), 0.0], [1.0, 1.0, 1.0]]
    student = [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.1, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.0, 1.0]]

    def term(t, z):
        pt, ps = _softmax(t), _softmax(z)
        return sum(a * abs(math.log(a / b)) for a, b in zip(pt, ps) if a > 0) / 3

    terms = [term(t, z) for t, z in zip(teacher, student)]
    # point 2: a 0.1 logit gap gives ~0.003 (< 0.01, dropped); point 4: identical (0, dropped)
    assert terms[2] < 0.01 and terms[4] == 0.0 and min(terms[0], terms[1], terms[3]) > 0.01
    expected = (terms[0] + terms[1] + terms[3]) / 3
    got = logit_distillation(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                             temperature=1 / 0.3, form="release")
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # the mask restricts which points are averaged; the drop still applies inside it
    masked = logit_distillation(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                                temperature=1 / 0.3, mask=torch.tensor([True, False, True, True, False]), form="release")
    assert masked.item() == pytest.approx((terms[0] + terms[3]) / 2, rel=1e-10)


def test_release_form_all_points_dropped_is_a_connected_zero():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = logit_distillation(z, z.detach() + 0.01, form="release")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(z.grad == 0)


def test_release_gradient_does_not_vanish_near_agreement():
    """Teacher (0, 0), student (d, 0): the KL x T^2 gradient T (p_s - p_t) halves with d, the
    release term's stays (1/(C T)) p_t,0 = 0.3 * 0.5 / 2, which is why no fixed weight makes the
    two forms agree (README)."""
    for d in (2.0, 1.0, 0.5):
        p_s0 = 1 / (1 + math.exp(-0.3 * d))
        z = torch.tensor([[d, 0.0]], dtype=torch.float64, requires_grad=True)
        logit_distillation(z, torch.zeros(1, 2, dtype=torch.float64), form="release").backward()
        assert z.grad[0, 0].item() == pytest.approx(0.3 * 0.5 / 2, rel=1e-9)
        z.grad = None
        logit_distillation(z, torch.zeros(1, 2, dtype=torch.float64), form="kl").backward()
        assert z.grad[0, 0].item() == pytest.approx((p_s0 - 0.5) / 0.3, rel=1e-9)


def test_kd_weight_is_the_forms_default_unless_set():
    assert KD_FORM_WEIGHTS == {"kl": 0.1, "release": 5.0}
    assert kd_weight_for("kl") == 0.1 and kd_weight_for("release") == 5.0
    assert kd_weight_for("release", 0.5) == 0.5 and kd_weight_for("kl", 0.0) == 0.0
    with pytest.raises(ValueError):
        kd_weight_for("l2")
    sl, tl = torch.randn(6, 4, dtype=torch.float64), 3 * torch.randn(6, 4, dtype=torch.float64)
    no_aux = {"feat_weight": 0.0, "affinity_weight": 0.0}
    total, parts = distillation_loss(sl, tl, config=TrainConfig(kd_form="release", **no_aux))
    assert total.item() == pytest.approx(5.0 * logit_distillation(sl, tl, form="release").item(), rel=1e-12)
    total, _ = distillation_loss(sl, tl, config=TrainConfig(kd_form="release", kd_weight=0.5, **no_aux))
    assert total.item() == pytest.approx(0.5 * logit_distillation(sl, tl, form="release").item(), rel=1e-12)
    total, _ = distillation_loss(sl, tl, config=TrainConfig(**no_aux))
    assert total.item() == pytest.approx(0.1 * logit_distillation(sl, tl).item(), rel=1e-12)


def test_train_config_kd_form_and_weight():
    from m2skd.train_config import load_config

    cfg = load_config(None, {"kd_form": "release"})
    assert cfg.kd_form == "release" and cfg.kd_weight is None and cfg.distill_enabled()
    assert load_config(None, {"kd_weight": 0.05}).kd_weight == 0.05  # a float, not int(0.05) = 0
    assert not load_config(None, {"kd_form": "release"}).no_distill().distill_enabled()


def test_trainer_distill_terms_goes_through_the_one_combiner():
    """The trainer's terms are distillation_loss's: KD on every point, the feature term through
    the adapter, the affinity term on the student's own features."""
    from types import SimpleNamespace

    from m2skd.trainer import distill_terms

    torch.manual_seed(1)
    logits, t_logits = torch.randn(8, 4), torch.randn(8, 4) * 4
    feats, t_feats = torch.randn(8, 3), torch.randn(5, 6)
    idx = torch.tensor([1, 2, 3, 5, 6])
    instance = torch.zeros(8, dtype=torch.long)
    instance[idx] = torch.tensor([7, 7, 7, 9, 9])
    adapter = FeatureAdapter(3, 6)
    cfg = TrainConfig(kd_form="release", feat_weight=0.5, affinity_weight=2.0, affinity_max_points=None, kd_hard_weight=1.0)
    batch = {"teacher_logits": t_logits, "teacher_feats": t_feats, "teacher_feat_index": idx, "instance": instance,
             "label": torch.ones(8, dtype=torch.long)}
    logs = {}
    total = distill_terms(cfg, SimpleNamespace(logits=logits, features={"dec4_preact": feats}), batch, adapter, logs, seed=0)
    expected = (5.0 * logit_distillation(logits, t_logits, form="release")
                + 0.5 * feature_distillation(adapter(feats[idx]), t_feats, None)
                + 2.0 * affinity_distillation(feats[idx], t_feats, instance[idx], None))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(logs) == {"kd", "feat", "affinity"}


# ----------------------------------------------------------------- feature distillation


def test_feature_mse_on_mask():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]])
    mask = torch.tensor([True, True, False])
    expected = (1 + 4 + 4 + 9) / 4
    loss = feature_distillation(s, t, mask)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert s.grad[2].abs().sum() == 0


def test_feature_empty_mask_and_adapter():
    s = torch.randn(4, 3, requires_grad=True)
    adapter = FeatureAdapter(3, 5)
    loss = feature_distillation(adapter(s), torch.randn(4, 5), torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert isinstance(FeatureAdapter(4, 4).proj, torch.nn.Identity)
    with pytest.raises(ValueError):
        feature_distillation(s, torch.randn(4, 5), None)


# ----------------------------------------------------------------- affinity distillation


def _np_cos(x):
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def test_affinity_two_instances_by_hand():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(9, 4))
    t = rng.normal(size=(9, 6))  # widths may differ: only n x n similarities are compared
    ids = np.array([0, 7, 7, 3, 7, 0, 3, 3, 3])  # instance 7: 3 points, instance 3: 4 points
    expected = np.mean([
        np.abs(_np_cos(s[ids == k]) - _np_cos(t[ids == k])).mean() for k in (7, 3)
    ])
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    loss = affinity_distillation(st, torch.tensor(t, dtype=torch.float32),
                                 torch.tensor(ids), max_points_per_instance=1000)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.all(torch.isfinite(st.grad))
    assert st.grad[ids == 0].abs().sum() == 0
    # No subsampling at all gives the same value.
    none = affinity_distillation(st, torch.tensor(t, dtype=torch.float32), torch.tensor(ids),
                                 max_points_per_instance=None)
    assert none.item() == pytest.approx(expected, rel=1e-5)


def test_affinity_leaves_single_point_instances_out_of_its_mean():
    """A 1-point instance has no similarity structure: it is not averaged in as a 0."""
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    ids = np.array([1, 1, 1, 2, 3, 3])  # instance 2 has one point
    by_hand = np.mean([np.abs(_np_cos(s[:3]) - _np_cos(t[:3])).mean(), np.abs(_np_cos(s[4:]) - _np_cos(t[4:])).mean()])
    loss = affinity_distillation(torch.tensor(s), torch.tensor(t), torch.tensor(ids))
    assert loss.item() == pytest.approx(by_hand, rel=1e-9)
    st = torch.tensor(s, requires_grad=True)
    only_single = affinity_distillation(st, torch.tensor(t), torch.tensor([0, 0, 0, 2, 0, 0]))
    assert only_single.item() == 0.0
    only_single.backward()  # graph intact, nothing to learn
    assert st.grad.abs().sum() == 0


def test_affinity_subsampling_picks_a_subset():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    ids = torch.ones(6, dtype=torch.long)
    candidates = {
        (i, j): np.abs(_np_cos(s[[i, j]]) - _np_cos(t[[i, j]])).mean()
        for i in range(6) for j in range(i + 1, 6)
    }
    seen = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        v = affinity_distillation(torch.tensor(s), torch.tensor(t), ids,
                                  max_points_per_instance=2, generator=g).item()
        match = [k for k, c in candidates.items() if abs(c - v) < 1e-9]
        assert match, "subsampled loss must equal the loss of some 2-point subset"
        seen.add(match[0])
    assert len(seen) > 1  # the subset is random


def test_affinity_class_mode_groups_by_class():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    inst = np.array([5, 6, 6, 9, 0, 9])
    cls = np.array([2, 2, 2, 4, 2, 4])  # the point with instance 0 is not a hard point
    expected = np.mean([
        np.abs(_np_cos(s[[0, 1, 2]]) - _np_cos(t[[0, 1, 2]])).mean(),
        np.abs(_np_cos(s[[3, 5]]) - _np_cos(t[[3, 5]])).mean(),
    ])
    loss = affinity_distillation(torch.tensor(s), torch.tensor(t), torch.tensor(inst),
                                 mode="class", class_ids=torch.tensor(cls))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_kd_hard_point_weight_by_hand():
    """Weighted mean: sum_i w_i KL_i / sum_i w_i, w = kd_hard_weight on hard points, 1 elsewhere."""
    rng = np.random.default_rng(5)
    zs, zt = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 3
    hard = np.array([False, True, False, False, True])
    t = 1.5
    lt, ls = _np_log_softmax(zt / t), _np_log_softmax(zs / t)
    kl = (np.exp(lt) * (lt - ls)).sum(1) * t * t
    w = np.where(hard, 4.0, 1.0)
    by_hand = (w * kl).sum() / w.sum()  # = (KL0 + 4 KL1 + KL2 + KL3 + 4 KL4) / 11
    cfg = {"kd_weight": 1.0, "temperature": t, "affinity_weight": 0.0, "kd_hard_weight": 4.0}
    _, parts = distillation_loss(torch.tensor(zs), torch.tensor(zt), config=TrainConfig(**cfg), hard_points=torch.tensor(hard))
    assert parts["kd"].item() == pytest.approx(by_hand, rel=1e-9)
    assert by_hand != pytest.approx(kl.mean(), rel=1e-3)  # the weight matters on this case
    # weight 1 is the plain mean; weight 0 leaves the hard points out
    _, plain = distillation_loss(torch.tensor(zs), torch.tensor(zt), config=TrainConfig(**{**cfg, "kd_hard_weight": 1.0}),
                                 hard_points=torch.tensor(hard))
    assert plain["kd"].item() == pytest.approx(kl.mean(), rel=1e-9)
    _, easy = distillation_loss(torch.tensor(zs), torch.tensor(zt), config=TrainConfig(**{**cfg, "kd_hard_weight": 0.0}),
                                hard_points=torch.tensor(hard))
    assert easy["kd"].item() == pytest.approx(kl[~hard].mean(), rel=1e-9)


def test_trainer_weights_hard_class_points_and_takes_the_class_affinity_on_logits():
    """The trainer passes the hard-class points (by label) and, for affinity_form=class, compares
    logits pooled per (scan, class) at the cached hard points; the settings come from the config."""
    from types import SimpleNamespace

    from m2skd.trainer import distill_terms

    rng = np.random.default_rng(6)
    logits, t_logits = rng.normal(size=(8, 4)), rng.normal(size=(8, 4)) * 3
    label = np.array([1, 2, 2, 3, 1, 2, 2, 1])
    hard_lut = torch.tensor([False, False, True, False])  # class 2 is hard
    idx = np.array([1, 2, 5, 6])  # the cached (hard) points; scan 0 holds rows 0-3, scan 1 rows 4-7
    instance = np.zeros(8, np.int64)
    instance[idx] = [(2 << 16) | 1, (2 << 16) | 1, (1 << 24) | (2 << 16) | 4, (1 << 24) | (2 << 16) | 5]
    cfg = TrainConfig(kd_weight=1.0, kd_hard_weight=3.0, affinity_weight=2.0, affinity_form="class", temperature=2.0)
    batch = {"teacher_logits": torch.tensor(t_logits), "teacher_feats": torch.zeros(4, 2), "teacher_feat_index": torch.tensor(idx),
             "instance": torch.tensor(instance), "label": torch.tensor(label)}
    logs = {}
    total = distill_terms(cfg, SimpleNamespace(logits=torch.tensor(logits), features={}), batch, None, logs, 0, hard_lut)
    lt, ls = _np_log_softmax(t_logits / 2.0), _np_log_softmax(logits / 2.0)
    kl = (np.exp(lt) * (lt - ls)).sum(1) * 4.0
    w = np.where(label == 2, 3.0, 1.0)
    kd = (w * kl).sum() / w.sum()
    # class pooling per scan: scan 0's two class-2 points form one group, scan 1's two another
    aff = np.mean([np.abs(_np_cos(logits[g]) - _np_cos(t_logits[g])).mean() for g in ([1, 2], [5, 6])])
    assert logs["kd"].item() == pytest.approx(kd, rel=1e-6)  # the trainer works in float32
    assert logs["affinity"].item() == pytest.approx(aff, rel=1e-6)
    assert total.item() == pytest.approx(kd + 2.0 * aff, rel=1e-6)


def test_changing_what_the_student_trains_on_changes_its_fingerprint():
    """...while the baseline, which trains on none of it, keeps one fingerprint."""
    from m2skd.fingerprint import fingerprint_json

    base = fingerprint_json(TrainConfig().math_dict())
    baseline = fingerprint_json(TrainConfig().no_distill().math_dict())
    for change in ({"kd_hard_weight": 2.0}, {"affinity_form": "class"}, {"feature_layer": "dec4"}, {"kd_form": "release"},
                   {"affinity_max_points": 8}):
        assert fingerprint_json(TrainConfig(**change).math_dict()) != base, change
        assert fingerprint_json(TrainConfig(**change).no_distill().math_dict()) == baseline, change
    assert fingerprint_json(TrainConfig(temperature=2.0).no_distill().math_dict()) != baseline


def test_auto_backend_is_fingerprinted_as_the_backend_it_resolves_to():
    """A student trained with the config's `auto` and one with `--backend torch` compute the same
    bits (auto is torch); a study given either must take the other's model as current."""
    from m2skd.fingerprint import fingerprint_json
    from m2skd.models import resolve_backend

    def fp(**kw):
        return fingerprint_json(TrainConfig(**kw).math_dict())

    assert fp(backend="auto") == fp(backend=resolve_backend("auto")) == fp(backend="torch")
    assert fp(backend="minkowski") != fp(backend="torch")


def test_no_hard_points_gives_finite_zero_losses():
    s = torch.randn(5, 8, requires_grad=True)
    logits = torch.randn(5, 4, requires_grad=True)
    ids = torch.zeros(5, dtype=torch.long)
    aff = affinity_distillation(s, torch.randn(5, 8), ids)
    total, parts = distillation_loss(logits, torch.randn(5, 4), s, torch.randn(5, 8),
                                     config=TrainConfig(), hard_mask=ids > 0, instance_ids=ids)
    assert aff.item() == 0.0 and parts["feat"].item() == 0.0 and parts["affinity"].item() == 0.0
    assert torch.isfinite(total)
    (total + aff).backward()
    assert torch.all(torch.isfinite(s.grad)) and torch.all(torch.isfinite(logits.grad))


def test_distillation_loss_combines_weighted_parts():
    torch.manual_seed(0)
    sl, tl = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    tl[:, 1] = float("-inf")
    sf, tf = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3)
    ids = torch.tensor([0, 1, 1, 2, 2, 2])
    cfg = {"kd_weight": 2.0, "temperature": 1.5, "feat_weight": 0.5, "affinity_weight": 3.0}
    total, parts = distillation_loss(sl, tl, sf, tf, hard_mask=ids > 0, instance_ids=ids,
                                     config=TrainConfig(**cfg))
    expected = (2.0 * logit_distillation(sl, tl, 1.5) + 0.5 * feature_distillation(sf, tf, ids > 0)
                + 3.0 * affinity_distillation(sf, tf, ids))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"kd", "feat", "affinity"} and not parts["kd"].requires_grad
    total.backward()
    assert torch.all(torch.isfinite(sl.grad)) and torch.all(torch.isfinite(sf.grad))
