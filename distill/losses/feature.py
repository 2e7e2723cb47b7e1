"""Feature distillation: a student layer's output, projected to the teacher's width, matched to the teacher's.

Features are compared along their width: the last dim of (N, D) vectors, the channel dim of (N, C, H, W)
maps (a projector over channels is a 1x1 convolution, as in FitNets). When the spatial sizes differ the
student map is average-pooled to the teacher's. The projector belongs to the objective, not the student,
so it is trained with the student and never exported with it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..registry import LOSSES
from .kd import masked_mean


@LOSSES.register("mse", group="feature", compares="width")
def feature_mse(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Mean squared error over every element (on features, never on probabilities); with `mask`, over the
    positions (leading dims) where it is true."""
    if mask is None:
        return F.mse_loss(student_feat.float(), teacher_feat.float())
    per_position = ((student_feat.float() - teacher_feat.float()) ** 2).mean(-1)
    return masked_mean(per_position, mask)


@LOSSES.register("cosine", group="feature", compares="width")
def feature_cosine(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """1 - cosine similarity along the width (last) dim, averaged over samples and positions (those where
    `mask` is true)."""
    return masked_mean(1 - F.cosine_similarity(student_feat.float(), teacher_feat.float(), dim=-1), mask)


def width_last(feat: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) maps -> (N, H, W, C) so that the width is the last dim; vectors and sequences stay."""
    return feat.movedim(1, -1) if feat.dim() == 4 else feat


class Projector(nn.Module):
    """Maps student width -> teacher width: `linear`, `mlp` (Linear-ReLU-Linear) or `identity`."""

    def __init__(self, kind: str, s_dim: int, t_dim: int, where: str = "projector") -> None:
        super().__init__()
        if kind == "identity":
            if s_dim != t_dim:
                raise UserError(f"{where}: student width {s_dim} != teacher width {t_dim}; "
                                f"use projector: linear (or mlp) to map between them")
            self.net: nn.Module = nn.Identity()
        elif kind == "linear":
            self.net = nn.Linear(s_dim, t_dim)
        elif kind == "mlp":
            hidden = max(s_dim, t_dim)
            self.net = nn.Sequential(nn.Linear(s_dim, hidden), nn.ReLU(), nn.Linear(hidden, t_dim))
        else:
            raise UserError(f"{where}: unknown projector '{kind}'; choose linear, mlp or identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def align(student_feat: torch.Tensor, teacher_feat: torch.Tensor, projector: Projector) -> tuple:
    """Project the student features and bring both to the same (N, ..., width) layout."""
    if student_feat.dim() == 4 and teacher_feat.dim() == 4 and student_feat.shape[2:] != teacher_feat.shape[2:]:
        student_feat = F.adaptive_avg_pool2d(student_feat, teacher_feat.shape[2:])
    return projector(width_last(student_feat)), width_last(teacher_feat)
