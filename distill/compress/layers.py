"""Progressive layer reduction: which layer or block to drop next, chosen by measurement.

The candidate units are a transformer's layers (an encoder's, or a causal LM's), or the residual blocks of the CNN registry whose
shortcut is the identity (dropping one leaves every shape unchanged). Each candidate is removed in turn
and the validation loss of what remains is measured; the unit whose removal hurts least goes.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..models.hf import HFWrapper, select_layers
from ..engine.inference import predict
from .structure import drop_block

Unit = Union[int, str]  # a transformer layer index, or the module name of a residual block


def droppable(model: nn.Module) -> List[Unit]:
    if isinstance(model, HFWrapper):
        return list(range(model.num_layers)) if model.num_layers > 1 else []
    from ..models.cifar import BasicBlock, WideBasicBlock
    return [name for name, m in model.named_modules()
            if (isinstance(m, BasicBlock) and m.downsample is None)
            or (isinstance(m, WideBasicBlock) and m.convShortcut is None)]


def without(model: nn.Module, unit: Unit) -> nn.Module:
    """A copy of `model` with one layer (or block) removed."""
    if isinstance(model, HFWrapper):
        return select_layers(model, [i for i in range(model.num_layers) if i != unit], "compress.layers")
    model = copy.deepcopy(model)
    drop_block(model, unit)
    return model


def val_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    if getattr(model, "per_position", False):  # a language model: the loss per target token, batch by batch
        from ..tasks.causal_lm import scores, token_sums
        return scores(token_sums(model, x, y, batch_size), False)["loss"]
    return float(F.cross_entropy(predict(model, x, batch_size), y))


def least_important(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
                    ) -> Tuple[Unit, Dict[str, float]]:
    """The unit whose removal raises the validation loss least, and the loss without each unit."""
    units = droppable(model)
    losses = {str(u): val_loss(without(model, u), x, y, batch_size) for u in units}
    best = min(units, key=lambda u: losses[str(u)])
    return best, losses


def depth(model: nn.Module) -> int:
    """Layers of an encoder, or droppable blocks of a CNN: what `compress.layers.to` counts."""
    return model.num_layers if isinstance(model, HFWrapper) else len(droppable(model))
