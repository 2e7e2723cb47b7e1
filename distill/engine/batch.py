"""What one training step reads: a `Batch` of inputs, labels and sample indices, and the `TeacherOutputs` a
teacher source gives for it (dense logits, or the top-k form a language-model cache keeps, plus features)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # rows of the training split: a cached teacher source reads its outputs by them
    mask: Optional[torch.Tensor] = None  # positions whose loss counts (token tasks); None: every sample

    def __iter__(self):
        """`x, y, idx = batch`."""
        return iter((self.x, self.y, self.idx))


@dataclass
class TeacherOutputs:
    """One teacher's outputs for a batch.

    Either dense `logits` (N, ..., V), or the top-k form: `topk_ids` and `topk_logprobs` (N, ..., k) with
    `tail_mass` (N, ..., 1), the probability left outside the k kept entries. `features` are hooked layer
    outputs by module name; `mask` marks the positions that count (None: all)."""
    logits: Optional[torch.Tensor] = None
    features: Dict[str, torch.Tensor] = field(default_factory=dict)
    mask: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    tail_mass: Optional[torch.Tensor] = None

    @property
    def dense(self) -> bool:
        return self.logits is not None

    def __post_init__(self) -> None:
        if self.logits is None and (self.topk_ids is None or self.topk_logprobs is None):
            raise ValueError("TeacherOutputs: give dense logits, or topk_ids with topk_logprobs")


# (inputs the teacher sees, sample indices) -> that teacher's outputs: run online, or read from a cache.
TeacherSource = Callable[[torch.Tensor, torch.Tensor], TeacherOutputs]
