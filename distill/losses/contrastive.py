"""CRD, contrastive representation distillation (Tian et al. 2020): the one method here with trainable parts
and state of its own, so it is a module the objective holds (like a projector), never part of the student.

Student and teacher features are embedded (a linear map each, to `embed_dim`, L2-normalised). A memory bank
per side keeps an embedding of every training sample, updated with momentum as the sample is seen. For each
sample of the batch, its own entry in the other side's bank is the positive and `negatives` entries of other
samples, drawn uniformly, are the negatives. The critic h = P / (P + K/M), with P = exp(v . m / tau) / Z (Z
fixed on the first batch, as in the paper's NCE estimate), M the number of training samples and K the
negatives, gives the loss -log h(positive) - sum log(1 - h(negative)), both ways (teacher anchors against the
student bank, student anchors against the teacher bank), averaged over the batch.

The banks, Z and the embeddings are in the objective's state, so checkpoints hold them; the negatives are
drawn from the global torch RNG, which checkpoints restore: a resumed run draws the same ones.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.runtime import refuse_beyond_memory
from ..errors import UserError
from ..registry import LOSSES
from .relations import embedding

# (its memory banks hold the whole training set, updated by the process that saw each sample)
ONE_PROCESS = ("distill.features: crd keeps one memory bank of the whole training set, which one process updates; "
               "train CRD in a single process (without --nproc)")


def flat_width(shape: Tuple[int, ...]) -> int:
    """The width of `embedding()`'s vector for per-sample shape `shape`."""
    return shape[-1] if len(shape) == 2 else math.prod(shape)


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """scores: (B, 1 + K) normalised exp-similarities, the positive first. -log h(pos) - sum_k log(1 - h(neg_k)),
    h = P / (P + K / M), averaged over the B anchors."""
    k = scores.shape[1] - 1
    noise = k / n_data
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos + log_neg.sum(1)).mean()


@LOSSES.register("crd", group="feature", compares="embedding", settings="crd")
class CRD(nn.Module):
    whole_bank = 2 ** 24  # scores against the whole bank up to this many (batch x samples)

    def __init__(self, s_dim: int, t_dim: int, n_data: int, embed_dim: int = 128, negatives: int = 4096,
                 temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if n_data < 2:
            raise UserError("distill.features: loss crd needs at least 2 training samples")
        refuse_beyond_memory(f"distill.crd.embed_dim: {embed_dim:,} x {n_data:,} training samples x 2 memory banks",
                             2 * n_data * embed_dim * 4 + (s_dim + t_dim) * embed_dim * 4)
        self.n_data, self.k = n_data, min(negatives, n_data - 1)
        self.temperature, self.momentum = temperature, momentum
        self.embed_s, self.embed_t = nn.Linear(s_dim, embed_dim), nn.Linear(t_dim, embed_dim)
        for side in ("memory_s", "memory_t"):  # random unit vectors until each sample has been seen
            self.register_buffer(side, F.normalize(torch.randn(n_data, embed_dim), dim=1))
        self.register_buffer("z", torch.full((2,), -1.0))  # the NCE normalisers (teacher, student anchors)

    def negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K) indices of other samples, uniform over the M - 1 that are not the anchor's own."""
        neg = torch.randint(0, self.n_data - 1, (len(idx), self.k), device=idx.device)
        return neg + (neg >= idx.unsqueeze(1)).long()

    def scores(self, anchors: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor, side: int) -> torch.Tensor:
        if len(memory) * len(anchors) <= self.whole_bank:  # one matmul with the whole bank, then pick: faster
            # than gathering B x (1 + K) rows of it, unless the B x M scores grow past 64 MB
            # (a copy: the backward pass needs the bank as it was, and forward updates it in place)
            dots = (anchors @ memory.clone().t()).gather(1, contrast)
        else:  # a large one: only the rows drawn (B x (1 + K) x d, not B x M)
            dots = torch.bmm(memory[contrast], anchors.unsqueeze(2)).squeeze(2)
        p = torch.exp(dots / self.temperature)
        if self.z[side] < 0:  # fixed on the first batch: the mean score times the number of samples (on the
            z = p.detach().mean() * self.n_data  # first finite one: a NaN batch is skipped, and would fix Z at NaN)
            if torch.isfinite(z):
                self.z[side] = z
        return p / self.z[side].clone()  # (a copy: setting the other side's Z must not touch this graph)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, idx: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        v_s = F.normalize(self.embed_s(embedding(student_feat, mask)), dim=1)
        v_t = F.normalize(self.embed_t(embedding(teacher_feat, mask)), dim=1)
        idx = idx.to(v_s.device)
        contrast = torch.cat([idx.unsqueeze(1), self.negatives(idx)], 1)
        loss = (nce_loss(self.scores(v_t, self.memory_s, contrast, 0), self.n_data)
                + nce_loss(self.scores(v_s, self.memory_t, contrast, 1), self.n_data))
        with torch.no_grad():  # (rows of a NaN or Inf embedding are left out: the trainer skips that step, and
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):  # a NaN row would stay in the bank)
                ok = torch.isfinite(v).all(1)
                rows = idx if bool(ok.all()) else idx[ok]
                memory[rows] = F.normalize(self.momentum * memory[rows] + (1 - self.momentum) * v.detach()[ok],
                                           dim=1)
        return loss
