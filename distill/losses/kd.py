"""Logit losses: Hinton KD and hard-label cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import LOSSES


@LOSSES.register("kd")
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch.

    The teacher's distribution is the target (the first argument of the KL), and T^2 keeps the gradient
    scale independent of T (Hinton et al. 2015), so alpha means the same thing at any temperature.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@LOSSES.register("ce")
def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the hard labels; label -1 marks a sample without one (teacher-labelled text),
    which is left out of the mean (a batch with no hard labels gives 0)."""
    if not bool((labels < 0).any()):
        return F.cross_entropy(student_logits.float(), labels)
    n = (labels >= 0).sum().clamp_min(1)
    return F.cross_entropy(student_logits.float(), labels, ignore_index=-1, reduction="sum") / n
