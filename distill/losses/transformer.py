"""Transformer losses: attention-map distillation and the layer map that pairs student and teacher layers.

Hidden states, embedding outputs and [CLS] vectors use the foundation's feature losses (`mse`, `cosine`,
through a projector when widths differ); the layer map below only writes those `distill.features` entries.
Attention maps are probabilities over keys, (N, heads, L, L):
  attention_kl   KL(teacher || student) per query row, as in MiniLM's self-attention distillation;
  attention_mse  mean squared difference of the maps over real (query, key) pairs: TinyBERT's attention loss,
                 on the probabilities that Hugging Face models return (TinyBERT takes the scores before the
                 softmax, so its values, and the weight that balances them, are larger).
When the head counts differ, both sides are averaged over heads first.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import UserError
from ..registry import LOSSES
from .kd import masked_mean


def _heads_alike(s: torch.Tensor, t: torch.Tensor):
    if s.dim() != 4 or t.dim() != 4 or s.shape[-1] != s.shape[-2] or t.shape[-1] != t.shape[-2]:
        raise UserError(f"distill.features: the attention losses compare (N, heads, L, L) attention maps (the "
                        f"attention.<i> taps); got student {tuple(s.shape[1:])}, teacher {tuple(t.shape[1:])}")
    s, t = s.float(), t.float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    return s, t


def _query_mask(mask: Optional[torch.Tensor], s: torch.Tensor) -> Optional[torch.Tensor]:
    """A (N, L) position mask as (N, 1, L): one value per sample and query row, for every head."""
    return None if mask is None else mask[:, None, :s.shape[2]].expand(s.shape[0], s.shape[1], s.shape[2])


@LOSSES.register("attention_kl", group="feature", compares="maps")
def attention_kl(student_att: torch.Tensor, teacher_att: torch.Tensor, mask: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """sum_k p_t log(p_t / p_s) over keys, averaged over samples, heads and query positions (those where
    `mask`, (N, L), is true).

    Padded keys have probability 0 on both sides and contribute nothing (0 log 0 = 0)."""
    s, t = _heads_alike(student_att, teacher_att)
    return masked_mean((torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(-1), _query_mask(mask, s))


@LOSSES.register("attention_mse", group="feature", compares="maps")
def attention_mse(student_att: torch.Tensor, teacher_att: torch.Tensor, mask: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """Per query row, the squared difference averaged over the sample's real keys (where `mask`, (N, L), is
    true); then the mean over the real query rows of every sample and head, as attention_kl's. A padded key is
    0 on both sides, and counting it would shrink a short text's loss by how long its batch's longest text is."""
    s, t = _heads_alike(student_att, teacher_att)
    if mask is None:
        return ((s - t) ** 2).mean()
    keys = mask[:, :s.shape[-1]].sum(-1).clamp_min(1)[:, None, None]
    return masked_mean(((s - t) ** 2).sum(-1) / keys, _query_mask(mask, s))


def layer_pairs(kind: Any, n_teacher: int, n_student: int, selected: Optional[Sequence[int]] = None) -> List[int]:
    """The teacher layer (0-based) matched to each student layer.

    uniform: student layer j <- teacher layer (j + 1) * n_t / n_s - 1 (TinyBERT's g(m) = m N / M);
    last: every student layer <- the teacher's last; auto: the layers the student was copied from, if it
    was made by layer selection, else uniform; a list gives them explicitly."""
    if kind == "auto":
        kind = list(selected) if selected is not None else "uniform"
    if kind == "uniform":
        if n_student > n_teacher:  # (layer 0 would be matched to teacher layer -1)
            raise UserError(f"distill.layers.map: uniform matches each of the student's {n_student} layers to one of "
                            f"the teacher's {n_teacher}, and the student has more; give a list of teacher layers")
        return [(j + 1) * n_teacher // n_student - 1 for j in range(n_student)]
    if kind == "last":
        return [n_teacher - 1] * n_student
    pairs = list(kind)
    if len(pairs) != n_student or any(not 0 <= i < n_teacher for i in pairs):
        raise UserError(f"distill.layers.map: {pairs} must give one teacher layer in 0..{n_teacher - 1} for each "
                        f"of the student's {n_student} layers")
    return pairs


def transformer_features(lcfg: Dict[str, Any], n_teacher: int, n_student: int, same_width: bool,
                         selected: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """`distill.layers` -> feature-loss entries on the models' taps (hidden.i, attention.i, embeddings, cls)."""
    proj = "identity" if same_width else "linear"
    feats: List[Dict[str, Any]] = []
    layered = lcfg["hidden"] != "none" or lcfg["attention"] != "none"  # (else no layer is paired: any depth goes)
    pairs = layer_pairs(lcfg["map"], n_teacher, n_student, selected) if layered else []
    for j, i in enumerate(pairs):
        if lcfg["hidden"] != "none":
            feats.append({"teacher": f"hidden.{i}", "student": f"hidden.{j}", "loss": lcfg["hidden"],
                          "projector": proj, "weight": lcfg["hidden_weight"]})
        if lcfg["attention"] != "none":
            feats.append({"teacher": f"attention.{i}", "student": f"attention.{j}",
                          "loss": f"attention_{lcfg['attention']}", "projector": "identity",
                          "weight": lcfg["attention_weight"]})
    if lcfg["embeddings_weight"]:
        feats.append({"teacher": "embeddings", "student": "embeddings", "loss": "mse", "projector": proj,
                      "weight": lcfg["embeddings_weight"]})
    if lcfg["cls_weight"]:
        feats.append({"teacher": "cls", "student": "cls", "loss": "cosine", "projector": proj,
                      "weight": lcfg["cls_weight"]})
    return feats
