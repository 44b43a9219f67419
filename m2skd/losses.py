"""Training losses: segmentation (CE + Lovasz-softmax) and the three M2SKD distillation terms.

All functions are pure, differentiable and vectorised over points and instances (no Python
loops over either). Every loss returns a 0-dim tensor that stays connected to the student's
graph even when there is nothing to average over (no valid points, empty mask, no instances),
so a training step never has to special-case an empty batch. Teacher inputs are always
detached: the teacher is frozen (or cached) and these losses never train it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .train_config import TrainConfig

__all__ = [
    "AFFINITY_FORMS",
    "FeatureAdapter",
    "affinity_distillation",
    "KD_FORMS",
    "KD_FORM_WEIGHTS",
    "descending_order",
    "distillation_loss",
    "feature_distillation",
    "kd_point_weights",
    "kd_weight_for",
    "logit_distillation",
    "lovasz_softmax",
    "segmentation_loss",
]

# The logit term comes in two forms (`kd_form`):
#   "kl"      mean over points of KL(p_t || p_s) x T^2, p = softmax(z / T): the usual
#             Hinton form, whose gradient in the student's logits, T (p_s - p_t), vanishes as
#             the student reaches the teacher;
#   "release" the authors' release (skyshoumeng/M2SKD): mean over points of
#             (1/C) sum_c p_t,c |log(p_t,c / p_s,c)| at the same p, no T^2, points whose term
#             is below RELEASE_DROP_BELOW left out of the mean. Its gradient,
#             (1/(C T)) [p_s,c sum_k p_t,k s_k - p_t,c s_c] with s_k = sign(log p_t,k - log p_s,k),
#             keeps its size however close p_s is to p_t (an L1-like pull), so no fixed weight
#             makes the two forms agree: their ratio depends on how far apart p_s and p_t are.
# Each form has its own default weight (KD_FORM_WEIGHTS), used when kd_weight is None: the
# release's 5 for its own term; 0.1 for KL x T^2, chosen on a tuning drive (docs/results.md:
# at 0.0225 the student did not move towards the teacher on hard-class points), not a gradient
# equivalence. The release's feature term is present but
# weighted 0; its affinity term has weight 1.
#
# Hard-class points are a small minority of a scan (0.5% in SemanticKITTI), so a plain mean
# over points lets the easy classes decide the logit term. `kd_hard_weight` (lambda) weights
# them: mean = sum_i w_i l_i / sum_i w_i with w_i = lambda on hard-class points, 1 elsewhere;
# lambda = 1 is the plain mean, and with a share h of hard points they hold
# lambda h / (lambda h + 1 - h) of it. Normalising by the weights keeps the term's scale (and
# so kd_weight's meaning) whatever the batch's hard share.
#
# The affinity term comes in two forms (`affinity_form`):
#   "instance" per hard-class instance, on the student's and teacher's features of
#             `feature_layer` (take a `<stage>_preact` layer: after the ReLU all similarities
#             are near 1 and the term carries almost nothing);
#   "class"    the authors' release: pooled per (scan, hard class), on the logits.
KD_FORMS = ("kl", "release")
AFFINITY_FORMS = ("instance", "class")
KD_FORM_WEIGHTS: dict = {"kl": 0.1, "release": 5.0}
RELEASE_DROP_BELOW = 0.01


def kd_weight_for(kd_form: str, kd_weight: float | None = None) -> float:
    """The logit term's effective weight: `kd_weight` if set, else the form's own default."""
    if kd_form not in KD_FORMS:
        raise ValueError(f"unknown kd_form {kd_form!r} (use one of {KD_FORMS})")
    return float(KD_FORM_WEIGHTS[kd_form] if kd_weight is None else kd_weight)


def kd_point_weights(hard_points: torch.Tensor, hard_weight: float) -> torch.Tensor:
    """Per-point weights of the logit term's mean: `hard_weight` on hard-class points, 1 elsewhere."""
    if not hard_weight >= 0:
        raise ValueError(f"kd_hard_weight must be >= 0, got {hard_weight!r}")
    hard = hard_points.to(torch.bool)
    return torch.where(hard, torch.full(hard.shape, float(hard_weight), device=hard.device), torch.ones(hard.shape, device=hard.device))


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for the reductions; float32/float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _zero(t: torch.Tensor) -> torch.Tensor:
    """A float zero that keeps `t` in the autograd graph (so backward() still works)."""
    return t.sum() * 0.0


# --------------------------------------------------------------------------- segmentation


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss, per row (Berman et al. 2018, Alg. 1).

    gt_sorted: (K, P) float 0/1, each row (class) sorted by decreasing error.
    """
    gts = gt_sorted.sum(1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(1)
    union = gts + (1.0 - gt_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union
    if gt_sorted.shape[1] > 1:
        jaccard = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return jaccard


def descending_order(errors: torch.Tensor) -> torch.Tensor:
    """Each row's column indices by decreasing value, ties in column order, for non-negative
    `errors` (K, P). For float32 one stable sort of int64 keys (row, value bits; a non-negative
    float's bits order as the float does) replaces K row sorts: 2x faster on the CPU."""
    if errors.dtype != torch.float32:
        return torch.sort(errors, dim=1, descending=True, stable=True).indices
    rows, cols = errors.shape
    row = torch.arange(rows, dtype=torch.int64, device=errors.device)[:, None]
    keys = (row << 31) | (0x7FFFFFFF - errors.contiguous().view(torch.int32).to(torch.int64))
    return torch.sort(keys.view(-1), stable=True).indices.view(rows, cols) - row * cols


def lovasz_softmax(
    probs: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int | None = 0,
    classes: str | Sequence[int] = "present",
) -> torch.Tensor:
    """Lovasz-softmax loss (flat version) on per-point class probabilities.

    probs: (N, C) softmax output; labels: (N,) int. Points labelled `ignore_index` are removed
    first. `classes`: "present" (classes occurring in the valid labels; the usual choice),
    "all" (every class except `ignore_index`), or an explicit list of class ids. All classes
    are processed at once by sorting the (K, P) error matrix row-wise (ties in point order).
    """
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"lovasz_softmax expects probs (N, C) and labels (N,), got "
                         f"{tuple(probs.shape)} and {tuple(labels.shape)}")
    num_classes = probs.shape[1]
    if ignore_index is not None:
        valid = labels != ignore_index
        probs, labels = probs[valid], labels[valid]
    if labels.numel() == 0:
        return _zero(probs)

    if classes == "present":
        class_ids = torch.unique(labels)
    elif classes == "all":
        class_ids = torch.arange(num_classes, device=probs.device)
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            class_ids = class_ids[class_ids != ignore_index]
    else:
        class_ids = torch.as_tensor(list(classes), dtype=torch.long, device=probs.device)
    if class_ids.numel() == 0:
        return _zero(probs)

    fg = (class_ids[:, None] == labels[None, :]).to(probs.dtype)  # (K, P): sorts and sums run along memory
    errors = (fg - probs[:, class_ids].t()).abs()
    order = descending_order(errors.detach())
    per_class = (errors.gather(1, order) * _lovasz_grad(fg.gather(1, order))).sum(1)
    return per_class.mean()


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 0,
    lovasz_weight: float = 1.0,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy (mean over non-ignored points) + lovasz_weight * Lovasz-softmax.

    Returns (total, {"ce", "lovasz"}), the parts detached for logging. A batch whose points
    are all ignored gives a finite zero instead of the NaN of a plain mean-reduced CE.
    `class_weights` (C,) optionally weights CE per class (weighted mean, as torch does).
    """
    labels = labels.long()
    ce_sum = F.cross_entropy(_upcast(logits), labels, weight=class_weights,
                             ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    if class_weights is None:
        denom = valid.sum()
    else:
        denom = class_weights.to(logits.device, torch.float32)[labels[valid]].sum()
    ce = ce_sum / denom.clamp_min(1e-12) if bool(valid.any()) else _zero(logits)
    if lovasz_weight:
        lov = lovasz_softmax(F.softmax(_upcast(logits), dim=1), labels, ignore_index=ignore_index)
    else:
        lov = _zero(logits)
    total = ce + lovasz_weight * lov
    return total, {"ce": ce.detach(), "lovasz": lov.detach()}


# --------------------------------------------------------------------------- distillation


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-point vector over `mask` (bool or 0/1 weights); graph-connected zero if empty."""
    if mask is None:
        return values.mean() if values.numel() else _zero(values)
    mask = mask.to(values.device)
    if mask.dtype == torch.bool:
        return values[mask].mean() if bool(mask.any()) else _zero(values)
    w = mask.to(values.dtype)
    total = w.sum()
    return (values * w).sum() / total if float(total) > 0 else _zero(values)


def logit_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0 / 0.3,
    mask: torch.Tensor | None = None,
    form: str = "kl",
) -> torch.Tensor:
    """The logit distillation term, p = softmax(z / T); `form` as in KD_FORMS (unweighted).

    "kl": mean over points of KL(p_teacher || p_student) * T^2; the T^2 factor keeps the
    gradient scale independent of T (Hinton et al. 2015).
    "release": mean over points of (1/C) sum_c p_t,c |log p_t,c - log p_s,c| (C = all logit
    columns), no T^2; points whose term is below RELEASE_DROP_BELOW are left out of the mean
    (the authors' release, which lets agreeing points stop pulling); 0 if none is left.
    Teacher logits may be sparse (top-k cache): entries that are -inf, NaN, or a very large
    negative filler (e.g. -65504 in fp16) are classes with teacher probability 0 and contribute
    nothing. A point whose teacher logits are all non-finite carries no target and is dropped
    from the mean. `mask` (N,) bool or float weights restricts/weights the mean.
    """
    if form not in KD_FORMS:
        raise ValueError(f"unknown kd form {form!r} (use one of {KD_FORMS})")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"logit_distillation expects two (N, C) tensors, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    t = float(temperature)
    student = _upcast(student_logits)
    teacher = teacher_logits.detach().to(student.device, student.dtype)
    finite = torch.isfinite(teacher)
    has_target = finite.any(dim=1)
    # Non-finite entries -> -inf; rows with no finite entry -> zeros (dropped below) to avoid NaN.
    teacher = torch.where(finite, teacher, torch.full_like(teacher, float("-inf")))
    teacher = torch.where(has_target[:, None], teacher, torch.zeros_like(teacher))

    log_p_t = F.log_softmax(teacher / t, dim=1)
    p_t = log_p_t.exp()
    log_p_t = torch.where(p_t > 0, log_p_t, torch.zeros_like(log_p_t))  # 0 * log 0 := 0
    log_p_s = F.log_softmax(student / t, dim=1)
    if form == "kl":
        per_point = (p_t * (log_p_t - log_p_s)).sum(dim=1) * (t * t)
        keep = has_target
    else:
        # where p_t = 0 the |.| is infinite; mask it out before the product so 0 * inf never occurs
        gap = torch.where(p_t > 0, (log_p_t - log_p_s).abs(), torch.zeros_like(log_p_s))
        per_point = (p_t * gap).mean(dim=1)
        keep = has_target & (per_point.detach() >= RELEASE_DROP_BELOW)

    if mask is None:
        mask = keep
    elif mask.dtype == torch.bool:
        mask = mask.to(per_point.device) & keep
    else:
        mask = mask.to(per_point.device, per_point.dtype) * keep.to(per_point.dtype)
    return _masked_mean(per_point, mask)


class FeatureAdapter(nn.Module):
    """1x1 adapter (a Linear on per-point features) mapping student width to teacher width.

    Identity when the widths match, unless `always=True` (a learnable map even at equal width).
    """

    def __init__(self, in_dim: int, out_dim: int, always: bool = False, bias: bool = True):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        if in_dim == out_dim and not always:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats)


def feature_distillation(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """MSE between (adapted) student and teacher features on masked (hard-class) points.

    Mean over masked points and channels; `mask=None` uses all points. Zero (graph intact)
    when the mask selects nothing.
    """
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(f"feature_distillation: student {tuple(student_feats.shape)} and teacher "
                         f"{tuple(teacher_feats.shape)} differ; map the student through a "
                         f"FeatureAdapter first")
    student = _upcast(student_feats)
    teacher = teacher_feats.detach().to(student.device, student.dtype)
    if mask is not None:
        mask = mask.to(student.device, torch.bool)
        if not bool(mask.any()):
            return _zero(student)
        student, teacher = student[mask], teacher[mask]
    if student.numel() == 0:
        return _zero(student_feats)
    return F.mse_loss(student, teacher, reduction="mean")


def _group_subsample(group: torch.Tensor, max_points: int | None,
                     generator: torch.Generator | None):
    """Pick at most `max_points` members per group uniformly at random, without loops.

    group: (P,) int64 dense group index in [0, G). Returns (order, slot, counts_kept):
    `order` indexes the kept members, `slot` is each kept member's position (0..) within its
    group. Random keys + stable sort by group gives a random order inside each group; the
    rank inside the group is then position minus the group's start.
    """
    num = group.numel()
    gen_device = generator.device if generator is not None else group.device
    keys = torch.rand(num, generator=generator, device=gen_device).to(group.device)
    by_key = torch.argsort(keys)
    by_group = torch.sort(group[by_key], stable=True).indices
    order = by_key[by_group]
    g_sorted = group[order]
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num, device=group.device) - starts[g_sorted]
    if max_points is not None:
        keep = rank < max_points
        order, rank = order[keep], rank[keep]
        counts = counts.clamp(max=max_points)
    return order, rank, counts


def affinity_distillation(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    instance_ids: torch.Tensor,
    max_points_per_instance: int | None = 64,
    generator: torch.Generator | None = None,
    mode: str = "instance",
    class_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Instance-aware affinity distillation (M2SKD): L1 between student and teacher cosine
    similarity matrices inside each hard-class instance, averaged over instances.

    instance_ids (N,) int64: 0 = not a hard-class instance point; every other value is one
    instance and must already be unique across the batch (combine batch index and instance
    id). Each instance is subsampled to at most `max_points_per_instance` points (None: no
    subsampling), so the cost is linear in scan size. The per-instance value is the mean of
    |S_s - S_t| over its full n x n matrix (diagonal included); every instance of at least two
    points has weight 1. A single-point instance is left out of the mean: its 1x1 matrices are
    both 1, so it has no similarity structure to teach and would only dilute the term.

    mode="class" (the authors' release): same, but the points with instance_ids > 0 are
    grouped by `class_ids` (N,) instead; pass batch-unique class keys (e.g.
    batch_index * num_classes + class) to pool per scan rather than per batch.
    Zero (graph intact) when there is no group of at least two points.
    """
    if student_feats.shape[0] != teacher_feats.shape[0] or student_feats.dim() != 2:
        raise ValueError("affinity_distillation expects (N, Ds) and (N, Dt) features")
    if instance_ids.shape != student_feats.shape[:1]:
        raise ValueError(f"instance_ids must be ({student_feats.shape[0]},), "
                         f"got {tuple(instance_ids.shape)}")
    if mode == "instance":
        keys = instance_ids
    elif mode == "class":
        if class_ids is None or class_ids.shape != instance_ids.shape:
            raise ValueError("mode='class' needs class_ids of the same shape as instance_ids")
        keys = class_ids
    else:
        raise ValueError(f"unknown affinity mode {mode!r} (use 'instance' or 'class')")
    if max_points_per_instance is not None and max_points_per_instance < 1:
        raise ValueError("max_points_per_instance must be >= 1 or None")

    device = student_feats.device
    sel = torch.nonzero(instance_ids.to(device) > 0, as_tuple=True)[0]
    if sel.numel() == 0:
        return _zero(student_feats)
    _, group = torch.unique(keys.to(device)[sel], return_inverse=True)
    order, slot, counts = _group_subsample(group, max_points_per_instance, generator)
    pts = sel[order]
    g = group[order]
    num_groups, width = counts.numel(), int(counts.max())

    def padded_affinity(feats: torch.Tensor) -> torch.Tensor:
        f = F.normalize(_upcast(feats[pts]), dim=1)
        pad = f.new_zeros(num_groups, width, f.shape[1])
        pad = pad.index_put((g, slot), f)
        return torch.bmm(pad, pad.transpose(1, 2))  # (G, M, M); padded rows/cols are 0

    sim_s = padded_affinity(student_feats)
    sim_t = padded_affinity(teacher_feats.detach().to(device, sim_s.dtype))
    valid = torch.zeros(num_groups, width, dtype=torch.bool, device=device)
    valid[g, slot] = True
    pair = (valid[:, :, None] & valid[:, None, :]).to(sim_s.dtype)
    per_group = ((sim_s - sim_t).abs() * pair).sum(dim=(1, 2)) / counts.to(sim_s.dtype) ** 2
    structured = counts >= 2
    if not bool(structured.any()):
        return _zero(student_feats)
    return per_group[structured].mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_feats: torch.Tensor | None = None,
    teacher_feats: torch.Tensor | None = None,
    *,
    config: TrainConfig,
    hard_mask: torch.Tensor | None = None,
    instance_ids: torch.Tensor | None = None,
    class_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    adapter: nn.Module | None = None,
    hard_points: torch.Tensor | None = None,
    feat_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the distillation terms, with the weights and settings of `config`
    (kd_form, kd_weight, temperature, kd_hard_weight, feat_weight, affinity_weight,
    affinity_form, affinity_max_points).

    The one place the terms are combined (the trainer calls it). Logits cover every point;
    `student_feats`/`teacher_feats`/`instance_ids`/`hard_mask`/`class_ids` cover the
    (hard-class) points that have teacher features, which may be fewer: `feat_index` gives
    their rows in the logits (needed by affinity_form="class", which compares logits there).
    The logit term's mean weights `hard_points` (N,) by kd_hard_weight (see the note on
    KD_FORMS). The feature term compares
    `adapter(student_feats)` (identity without an adapter) to the teacher on `hard_mask`
    (None: every given point); the affinity term uses the student's own features, as cosine
    similarities need no common width. A term whose weight is 0, or whose inputs are missing,
    is skipped (reported as 0). Returns (total, {"kd", "feat", "affinity"}) with the unweighted
    parts detached for logging.
    """
    if config.affinity_form not in AFFINITY_FORMS:
        raise ValueError(f"unknown affinity_form {config.affinity_form!r} (use one of {AFFINITY_FORMS})")
    kd_weight = kd_weight_for(config.kd_form, config.kd_weight)
    zero = _zero(student_logits)
    parts = {"kd": zero, "feat": zero, "affinity": zero}
    total = zero
    if kd_weight:
        mask = None
        if hard_points is not None and float(config.kd_hard_weight) != 1.0:
            mask = kd_point_weights(hard_points, config.kd_hard_weight).to(student_logits.device)
        parts["kd"] = logit_distillation(student_logits, teacher_logits, temperature=config.temperature,
                                         mask=mask, form=config.kd_form)
        total = total + kd_weight * parts["kd"]
    have_feats = student_feats is not None and teacher_feats is not None
    if config.feat_weight and have_feats:
        adapted = adapter(student_feats) if adapter is not None else student_feats
        parts["feat"] = feature_distillation(adapted, teacher_feats, hard_mask)
        total = total + config.feat_weight * parts["feat"]
    if config.affinity_weight and instance_ids is not None:
        if config.affinity_form == "class":
            if feat_index is None or class_ids is None:
                raise ValueError("affinity_form='class' needs feat_index and class_ids")
            parts["affinity"] = affinity_distillation(
                student_logits[feat_index], teacher_logits[feat_index], instance_ids,
                max_points_per_instance=config.affinity_max_points, generator=generator,
                mode="class", class_ids=class_ids)
        elif have_feats:
            parts["affinity"] = affinity_distillation(
                student_feats, teacher_feats, instance_ids,
                max_points_per_instance=config.affinity_max_points, generator=generator)
        total = total + config.affinity_weight * parts["affinity"]
    return total, {k: v.detach() for k, v in parts.items()}
