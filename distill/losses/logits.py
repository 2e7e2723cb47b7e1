"""Logit methods besides Hinton's KD: DKD, DIST, and logit standardisation (for any of them).

Each takes the student's and the teacher's logits, the temperature, optional per-sample weights, a mask and the
hard labels (-1: none), plus its own settings from the recipe section of its name (`distill.dkd`,
`distill.dist`). Everything is computed in fp32 and averaged over the samples (the positions where `mask` is
true), times T^2 as for KD, so that `alpha` weighs them alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from .kd import masked_mean


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sun et al. 2024, "Logit standardization in knowledge distillation": each sample's logits minus their
    mean, over their standard deviation (the class-wise z-score), so that the student matches the teacher's
    logit *relations* rather than their range. Applied to both sides before the temperature."""
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


def _weighted(per_sample: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]
              ) -> torch.Tensor:
    if weights is not None:
        per_sample = per_sample * weights
    return masked_mean(per_sample, mask)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD of Zhao et al. 2022 (not yet times T^2).

    TCKD = KL(b_t || b_s) on the binary target/non-target probabilities b = [p_target, 1 - p_target];
    NCKD = KL(p^_t || p^_s) on the distributions among the non-target classes (softmax without the target).
    Classical KD decomposes as KD = TCKD + (1 - p_target^teacher) * NCKD.
    """
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    onehot = F.one_hot(target, s.shape[-1]).bool()
    log_p_s, log_p_t = F.log_softmax(s, -1), F.log_softmax(te, -1)
    # log p_target and log(1 - p_target) from the logits, stably
    lt_s, lt_t = (lp.gather(-1, target.unsqueeze(-1)).squeeze(-1) for lp in (log_p_s, log_p_t))
    ln_s = torch.logsumexp(s.masked_fill(onehot, float("-inf")), -1) - torch.logsumexp(s, -1)
    ln_t = torch.logsumexp(te.masked_fill(onehot, float("-inf")), -1) - torch.logsumexp(te, -1)
    tckd = lt_t.exp() * (lt_t - lt_s) + ln_t.exp() * (ln_t - ln_s)
    # among the non-target classes: the target's logit removed (-inf), renormalised
    q_s = F.log_softmax(s.masked_fill(onehot, float("-inf")), -1)
    q_t = F.log_softmax(te.masked_fill(onehot, float("-inf")), -1)
    nckd = (q_t.exp() * (q_t - q_s)).masked_fill(onehot, 0.0).sum(-1)
    return tckd, nckd


@LOSSES.register("dkd", group="logits", settings="dkd", labels=True)
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
             weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None, alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): (alpha * TCKD + beta * NCKD) * T^2. The target class is the hard
    label; a sample without one (-1, teacher-labelled) takes the teacher's top class instead."""
    target = teacher_logits.argmax(-1) if labels is None else torch.where(labels >= 0, labels,
                                                                          teacher_logits.argmax(-1))
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return _weighted(alpha * tckd + beta * nckd, weights, mask) * (temperature * temperature)


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


@LOSSES.register("dist", group="logits", settings="dist")
def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
              beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): match relations, not values. With Y = softmax(logits / T) as a batch x
    classes matrix, inter-class = 1 - mean over samples of the Pearson correlation of their rows, intra-class
    = 1 - mean over classes of the correlation of the columns; loss = T^2 (beta * inter + gamma * intra).
    Per-sample weights and a mask apply to the inter-class term and select the rows of the intra-class one."""
    t = temperature
    y_s = F.softmax(student_logits.float() / t, -1)
    y_t = F.softmax(teacher_logits.float() / t, -1)
    if y_s.dim() > 2:  # positions (tokens): every kept position is a row
        keep = mask.reshape(-1).bool() if mask is not None else slice(None)
        if weights is not None:  # per sample (N,) or per position (N, L): one per kept row, like the rows
            lead = y_s.shape[:-1]
            weights = weights.reshape(weights.shape + (1,) * (len(lead) - weights.dim())).expand(lead).reshape(-1)[keep]
        y_s, y_t = y_s.reshape(-1, y_s.shape[-1])[keep], y_t.reshape(-1, y_t.shape[-1])[keep]
        mask = None
    inter = _weighted(1 - _pearson(y_s, y_t, 1), weights, mask)
    if mask is not None:
        y_s, y_t = y_s[mask.bool()], y_t[mask.bool()]
    intra = (1 - _pearson(y_s, y_t, 0)).mean()
    return (beta * inter + gamma * intra) * (t * t)
