"""The teacher run online: on every batch, in eval mode and without an autograd graph."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from ..engine.batch import TeacherOutputs
from ..engine.inference import fast_pooling
from ..hooks import FeatureCapture


def teacher_forward(teacher: nn.Module, x: torch.Tensor, capture: FeatureCapture | None = None
                    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The teacher never trains here: eval mode (no dropout, frozen BN) and no autograd graph.

    Outputs are cloned out of inference mode: the losses save them for the student's backward pass,
    which inference tensors do not allow. Max-pooling runs channels-last (`fast_pooling`: the same bits).
    """
    if teacher.training:  # (a walk over every module: not on every batch)
        teacher.eval()
    with torch.inference_mode(), fast_pooling(teacher):
        logits = teacher(x)
        feats = {k: capture.outputs[k] for k in capture.names} if capture else {}
    return logits.clone(), {k: v.clone() for k, v in feats.items()}


def online_source(teacher: nn.Module, layers: List[str], where: str = "distill.features"):
    """A teacher source that runs `teacher` on every batch (augmented or noised inputs, feature losses)."""
    capture = FeatureCapture(teacher, layers, where)

    def online(x: torch.Tensor, idx: torch.Tensor) -> TeacherOutputs:
        with capture:
            return TeacherOutputs(*teacher_forward(teacher, x, capture))
    return online
