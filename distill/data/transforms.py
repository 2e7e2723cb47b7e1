"""Train-time augmentation on whole batches (in-memory tensors need no per-sample loader)."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F


def has_augmentation(tcfg: Dict[str, Any]) -> bool:
    return bool(tcfg["random_crop"]) or bool(tcfg["hflip"])


def augment(x: torch.Tensor, tcfg: Dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Random crop (`random_crop` pixels of padding) and horizontal flip, per sample. The padding is 0 in the
    normalised inputs, i.e. the training mean (grey); torchvision's RandomCrop before Normalize pads with raw 0
    (black). Every published number here was measured with this padding."""
    pad = int(tcfg["random_crop"])
    if pad:
        n, _, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None])  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None])  # (n, w)
        idx_n = torch.arange(n)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if tcfg["hflip"]:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
