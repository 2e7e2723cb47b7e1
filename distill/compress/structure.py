"""Models whose shape changed after training: smaller Linear/Conv/BatchNorm/Embedding modules, fewer
blocks, and the bookkeeping that lets such a model be saved and rebuilt.

Pruning really removes parameters: a pruned module is replaced by a smaller module holding the kept rows or
columns (`slice_module`). To load it back, the model is built from its original spec, the recorded block
drops are replayed, and every module is resized to the shapes stored in the weights file
(`fit_to_shapes`); then the weights load strictly. One mechanism serves CNN filters, transformer heads,
feed-forward neurons and vocabulary rows alike.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError


class RemappedEmbedding(nn.Embedding):
    """An embedding table that keeps only some rows of a larger vocabulary: `remap` sends every original
    token id to its kept row (tokens that were dropped go to the unknown-token row). The tokenizer and the
    model's input ids stay the original ones."""

    def __init__(self, rows: int, dim: int, vocab: int) -> None:
        super().__init__(rows, dim)
        self.register_buffer("remap", torch.zeros(vocab, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[ids], self.weight, self.padding_idx)


def empty_like(module: nn.Module, out: int, inp: int) -> nn.Module:
    """A fresh module of `module`'s kind and settings with `out` outputs and `inp` inputs."""
    if isinstance(module, nn.Linear):
        return nn.Linear(inp, out, bias=module.bias is not None)
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(inp, out, module.kernel_size, module.stride, module.padding, module.dilation,
                         module.groups, module.bias is not None, module.padding_mode)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(out, module.eps, module.momentum, module.affine, module.track_running_stats)
    raise UserError(f"cannot resize a {type(module).__name__} module")


def _shape_of(module: nn.Module) -> torch.Tensor:
    """The tensor whose shape is the module's: its weight; a BatchNorm2d(affine=False) has none, and its
    running statistics (if it tracks them) or its feature count stand in."""
    if module.weight is not None:
        return module.weight
    stats = getattr(module, "running_mean", None)
    return stats if stats is not None else torch.empty(module.num_features)


def slice_module(module: nn.Module, out_idx: Optional[torch.Tensor] = None,
                 in_idx: Optional[torch.Tensor] = None) -> nn.Module:
    """A smaller copy of a Linear, Conv2d or BatchNorm2d keeping output units `out_idx` and input units
    `in_idx` (None keeps all)."""
    w = _shape_of(module)
    out_idx = torch.arange(w.shape[0]) if out_idx is None else out_idx
    n_in = w.shape[1] if w.dim() > 1 else w.shape[0]
    in_idx = torch.arange(n_in) if in_idx is None or w.dim() == 1 else in_idx
    new = empty_like(module, len(out_idx), len(in_idx) if w.dim() > 1 else len(out_idx))
    with torch.no_grad():
        if module.weight is not None:
            new.weight.copy_(w[out_idx][:, in_idx] if w.dim() > 1 else w[out_idx])
        if getattr(module, "bias", None) is not None:
            new.bias.copy_(module.bias[out_idx])
        if isinstance(module, nn.BatchNorm2d) and module.track_running_stats:
            new.running_mean.copy_(module.running_mean[out_idx])
            new.running_var.copy_(module.running_var[out_idx])
            new.num_batches_tracked.copy_(module.num_batches_tracked)
    return new.train(module.training)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def drop_block(model: nn.Module, name: str) -> None:
    """Remove the block `name` (`stage.<i>`) from its nn.Sequential; later blocks move up one index."""
    parent_name, _, idx = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential) or not idx.isdigit() or int(idx) >= len(parent):
        raise UserError(f"compress: cannot drop block '{name}' (not an entry of a sequence of blocks)")
    replace(model, parent_name, nn.Sequential(*(m for i, m in enumerate(parent) if i != int(idx))))


def sync_attention_heads(model: nn.Module) -> None:
    """Keep each self-attention module's head count equal to its (possibly pruned) query projection."""
    for m in model.modules():
        if hasattr(m, "attention_head_size") and isinstance(getattr(m, "query", None), nn.Linear):
            m.all_head_size = m.query.out_features
            m.num_attention_heads = m.all_head_size // m.attention_head_size


def heads_per_layer(model: nn.Module) -> list:
    return [m.query.out_features // m.attention_head_size for m in model.modules()
            if hasattr(m, "attention_head_size") and isinstance(getattr(m, "query", None), nn.Linear)]


def fit_to_shapes(model: nn.Module, shapes: Dict[str, Tuple[int, ...]], drops: Sequence[str] = ()) -> None:
    """Rebuild a pruned model's structure: replay the block drops, then resize every module whose saved
    weight has another shape (and turn embeddings with a saved `remap` into `RemappedEmbedding`)."""
    for name in drops:
        drop_block(model, name)
    for name, module in list(model.named_modules()):
        w = shapes.get(f"{name}.weight", shapes.get(f"{name}.running_mean"))  # (BatchNorm2d(affine=False))
        if w is None:
            continue
        if isinstance(module, nn.Embedding) and f"{name}.remap" in shapes:
            replace(model, name, RemappedEmbedding(w[0], w[1], shapes[f"{name}.remap"][0]))
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)) and tuple(w) != tuple(_shape_of(module).shape):
            inp = w[0] if len(w) == 1 else w[1] * getattr(module, "groups", 1)
            replace(model, name, empty_like(module, w[0], inp))
    sync_attention_heads(model)


def saved_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
