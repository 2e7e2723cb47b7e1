"""Feature methods that compare what a layer makes of the batch, not the features themselves: AT, PKT, RKD,
SP. None needs a projector: the student's and the teacher's widths may differ (AT compares spatial maps,
the others relations between the samples of the batch). Each is written from its paper's formula.

Inputs are a student and a teacher layer's outputs for the same batch: (N, C, H, W) maps or (N, D) vectors
((N, L, D) sequences are averaged over the positions where `mask` is true).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..registry import LOSSES

EPS = 1e-12  # (F.normalize's)


def embedding(feat: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One vector per sample: maps and vectors flattened, sequences averaged over their (kept) positions."""
    feat = feat.float()
    if feat.dim() == 3:
        if mask is None:
            return feat.mean(1)
        m = mask.to(feat.dtype).unsqueeze(-1)
        return (feat * m).sum(1) / m.sum(1).clamp_min(1)
    return feat.flatten(1)


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: F(A) = sum over channels of |A_c|^p (here the mean: the scale cancels),
    flattened and divided by its L2 norm."""
    return F.normalize(feat.float().abs().pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at", group="feature", compares="relations")
def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    """Attention transfer: || Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2 ||_2 per sample (p = 2), averaged over the
    batch; the paper's beta/2 is the feature weight. Maps of different spatial sizes are compared at the
    smaller one (the larger average-pooled to it)."""
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise UserError(f"distill.features: loss at compares (N, C, H, W) maps; got student "
                        f"{tuple(student_feat.shape[1:])}, teacher {tuple(teacher_feat.shape[1:])}")
    size = tuple(min(a, b) for a, b in zip(student_feat.shape[2:], teacher_feat.shape[2:]))  # (per side)
    s, t = (f if tuple(f.shape[2:]) == tuple(size) else F.adaptive_avg_pool2d(f, size)
            for f in (student_feat, teacher_feat))
    return (attention_map(s) - attention_map(t)).norm(dim=1).mean()


def _cosine_probabilities(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT's conditional probabilities p_{i|j} = K(x_i, x_j) / sum_{k != j} K(x_k, x_j) with the cosine kernel
    K(a, b) = (cos(a, b) + 1) / 2; column j holds the distribution around sample j (the diagonal is 0)."""
    x = F.normalize(x, dim=1)
    k = ((x @ x.t()) + 1) / 2
    k = k.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)
    return k / (k.sum(0, keepdim=True) + eps)


@LOSSES.register("pkt", group="feature", compares="relations")
def pkt_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None,
             eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): KL(P_t || P_s) between the teacher's and the
    student's conditional probabilities over the batch, summed over i != j and averaged over the anchors j."""
    p_s = _cosine_probabilities(embedding(student_feat, mask))
    p_t = _cosine_probabilities(embedding(teacher_feat, mask))
    kl = p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))
    return kl.sum(0).mean()


def _distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances over the mean distance of the distinct pairs (RKD's psi_D)."""
    d = torch.cdist(x, x)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d / d[off].mean().clamp_min(1e-12)


def _angles(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex j between samples i and k, for every (j, i, k) (RKD's psi_A)."""
    d = x.unsqueeze(0) - x.unsqueeze(1)
    norm = d.norm(dim=2, keepdim=True)
    # e[j, i] = (x_i - x_j) / ||x_i - x_j||, and 0 where the two coincide (a sample drawn twice in a batch):
    # F.normalize's gradient there is 1/eps, 1e12, a spike of 1000x in the student's gradient
    e = torch.where(norm > EPS, d / norm.clamp_min(EPS), torch.zeros_like(d))
    return e @ e.transpose(1, 2)


def _distinct_pairs(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _distinct_triplets(n: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    j, a, b = i.view(-1, 1, 1), i.view(1, -1, 1), i.view(1, 1, -1)
    return (j != a) & (j != b) & (a != b)


def _relation_huber(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor],
                    psi, distinct) -> torch.Tensor:
    """The Huber loss between psi(teacher) and psi(student) over the `distinct` entries (RKD's form)."""
    s, t = embedding(student_feat, mask), embedding(teacher_feat, mask)
    keep = distinct(len(s), s.device)
    if not bool(keep.any()):  # (fewer samples than a pair / triplet needs: nothing to compare, not NaN)
        return s.sum() * 0.0
    return F.smooth_l1_loss(psi(s)[keep], psi(t)[keep])


@LOSSES.register("rkd_distance", group="feature", compares="relations")
def rkd_distance(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """Relational KD, distance-wise (Park et al. 2019): Huber loss between the teacher's and the student's
    normalised pairwise distances, averaged over the distinct pairs."""
    return _relation_huber(student_feat, teacher_feat, mask, _distances, _distinct_pairs)


@LOSSES.register("rkd_angle", group="feature", compares="relations")
def rkd_angle(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """Relational KD, angle-wise: Huber loss between the cosines of the angles every triplet of distinct
    samples forms, teacher vs student, averaged over the triplets."""
    return _relation_huber(student_feat, teacher_feat, mask, _angles, _distinct_triplets)


@LOSSES.register("rkd", group="feature", compares="relations")
def rkd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
    """RKD with both terms at the paper's ratio (lambda_D = 25, lambda_A = 50): distance + 2 * angle; the
    feature weight plays lambda_D."""
    return rkd_distance(student_feat, teacher_feat, mask) + 2 * rkd_angle(student_feat, teacher_feat, mask)


def _similarity(x: torch.Tensor) -> torch.Tensor:
    """SP's G~: the batch's Gram matrix Q Q^T with each row divided by its L2 norm."""
    return F.normalize(x @ x.t(), dim=1)


@LOSSES.register("sp", group="feature", compares="relations")
def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): || G~_t - G~_s ||_F^2 / b^2 for a batch of b."""
    s, t = embedding(student_feat, mask), embedding(teacher_feat, mask)
    return (_similarity(t) - _similarity(s)).pow(2).sum() / len(s) ** 2
