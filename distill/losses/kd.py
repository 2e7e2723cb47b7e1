"""Logit losses: Hinton KD and hard-label cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Optional

from ..registry import LOSSES


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of `values` over the positions where `mask` is true (all when None; 0 when none is)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


@LOSSES.register("kd", group="logits")
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (weighted per sample by `weights`;
    over the positions where `mask` is true, for outputs with positions such as tokens: over every position
    when there is no mask, as if each were a sample).

    The teacher's distribution is the target (the first argument of the KL), and T^2 keeps the gradient
    scale independent of T (Hinton et al. 2015), so alpha means the same thing at any temperature.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if weights is None and mask is None and student_logits.dim() == 2:
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    per_position = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    if weights is not None:
        per_position = per_position * weights
    return masked_mean(per_position, mask) * (t * t)


def confidence_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KD weights from the teacher's confidence (its top probability at T=1), scaled to mean 1 in
    the batch: the student leans on the teacher where it is sure and on the hard labels where it is not,
    without changing the overall weight alpha gives the KD term."""
    conf = teacher_logits.float().softmax(-1).max(-1).values
    return conf / conf.mean().clamp_min(1e-12)


@LOSSES.register("ce", group="labels")
def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    """Cross-entropy with the hard labels; label -1 marks a sample without one (teacher-labelled text),
    which is left out of the mean (a batch with no hard labels gives 0), as is any position where `mask`
    is false."""
    if labels.is_floating_point() and mask is None:  # (class probabilities, not indices: every row has a target)
        return F.cross_entropy(student_logits.float(), labels)
    if mask is not None:
        labels = torch.where(mask.bool(), labels, torch.full_like(labels, -1))
    labels = labels.clamp_min(-1)  # (-100, the language-model convention for "no target", counts as -1)
    if student_logits.dim() > 2:  # logits per position (a language model): every position with a target is
        labels = labels.reshape(-1)  # a sample, the others (prompt, padding) are dropped before the softmax
        rows = (labels >= 0).nonzero().squeeze(1)
        logits = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows)
        return F.cross_entropy(logits.float(), labels[rows], reduction="sum") / max(len(rows), 1)
    # The sum over labelled samples over their count: the same bits as the plain mean when every sample has a
    # label, with no host sync to ask whether one lacks it.
    n = (labels >= 0).sum().clamp_min(1)
    return F.cross_entropy(student_logits.float(), labels, ignore_index=-1, reduction="sum") / n
