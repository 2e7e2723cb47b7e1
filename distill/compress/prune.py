"""Structured pruning that really removes parameters.

* Attention heads (BERT-family encoders), ranked by the L1 norm of each head's weights or by Michel et
  al. (2019)'s gradient importance |dL/d mask_h|, scores normalised per layer, then ranked globally.
  transformers 5 has no `prune_heads`, so the query/key/value rows and the output-projection columns of
  the dropped heads are sliced out here and each attention module's head count is updated.
* Channels: CNN filters ranked by L1 norm (Li et al., 2017), the filter removed from its conv, from the
  BatchNorm after it and from the input of the next conv or Linear; for transformers, feed-forward neurons
  ranked the same way (the rows of the up-projection and the columns of the down-projection).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..models.hf import HFClassifier, layer_list
from .structure import replace, slice_module, sync_attention_heads

Blocks = List[Tuple[str, nn.Module]]


def attention_parts(model: HFClassifier) -> List[Tuple[nn.Module, nn.Module, nn.Module]]:
    """(layer, self-attention, output projection) per layer of a BERT-family encoder."""
    _, _, layers = layer_list(model.hf)
    parts = []
    for i, layer in enumerate(layers):
        att = getattr(layer, "attention", None)
        selfatt, out = getattr(att, "self", None), getattr(getattr(att, "output", None), "dense", None)
        if not (hasattr(selfatt, "query") and hasattr(selfatt, "attention_head_size") and isinstance(out, nn.Linear)):
            raise UserError(f"compress.heads: layer {i} of {type(model.hf).__name__} is not a BERT-family layer "
                            f"(attention.self.query/key/value and attention.output.dense); cannot prune its heads")
        parts.append((layer, selfatt, out))
    return parts


def head_importance(model: HFClassifier, method: str, x: Optional[torch.Tensor] = None,
                    y: Optional[torch.Tensor] = None, batch_size: int = 32) -> List[torch.Tensor]:
    """One score per head per layer, normalised to unit L2 norm within each layer."""
    parts = attention_parts(model)
    if method == "l1":
        scores = []
        for _, att, out in parts:
            d, w = att.attention_head_size, 0
            for lin in (att.query, att.key, att.value):
                w = w + lin.weight.detach().abs().view(-1, d, lin.in_features).sum((1, 2))
            scores.append(w + out.weight.detach().abs().view(out.out_features, -1, d).sum((0, 2)))
    elif method == "gradient":
        scores = _gradient_importance(model, parts, x, y, batch_size)
    else:
        raise UserError(f"compress.heads.importance: {method!r}: choose l1 or gradient")
    return [s / s.norm().clamp_min(1e-12) for s in scores]


def _gradient_importance(model: HFClassifier, parts, x: torch.Tensor, y: torch.Tensor,
                         batch_size: int) -> List[torch.Tensor]:
    """Michel et al.: a gate of 1 multiplies each head's output; importance = E|dL/d gate| on labelled data."""
    gates = [torch.ones(att.query.out_features // att.attention_head_size, requires_grad=True) for _, att, _ in parts]
    total = [torch.zeros_like(g) for g in gates]

    def gate(g: torch.Tensor):
        def hook(_m, _inp, output):
            out = output[0]
            shaped = out.view(*out.shape[:-1], len(g), -1) * g[:, None]
            return (shaped.view_as(out),) + tuple(output[1:])
        return hook
    handles = [att.register_forward_hook(gate(g)) for (_, att, _), g in zip(parts, gates)]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed (eval) network
    try:
        for i in range(0, len(x), batch_size):
            if not (y[i:i + batch_size] >= 0).any():  # (data.label_fraction: a batch without labels is NaN)
                continue
            loss = F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], ignore_index=-1)
            grads = torch.autograd.grad(loss, gates)
            for t, g in zip(total, grads):
                t += g.abs()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def keep_top(scores: List[torch.Tensor], keep: float) -> List[torch.Tensor]:
    """Indices to keep per group: the best unit of every group, then the best of the rest globally, until
    `keep` of all units are kept (a layer never loses all its heads)."""
    total = sum(len(s) for s in scores)
    n_keep = max(len(scores), round(keep * total))
    chosen = {(g, int(s.argmax())) for g, s in enumerate(scores)}
    ranked = sorted(((float(v), g, i) for g, s in enumerate(scores) for i, v in enumerate(s)), reverse=True)
    for _, g, i in ranked:
        if len(chosen) >= n_keep:
            break
        chosen.add((g, i))
    return [torch.tensor(sorted(i for gg, i in chosen if gg == g)) for g in range(len(scores))]


def prune_heads(model: HFClassifier, keep: float, scores: List[torch.Tensor]) -> HFClassifier:
    """A copy of `model` with only the kept heads: smaller query/key/value and output projections."""
    model = copy.deepcopy(model)
    for (_, att, out), kept in zip(attention_parts(model), keep_top(scores, keep)):
        d = att.attention_head_size
        rows = (kept[:, None] * d + torch.arange(d)).flatten()
        for name in ("query", "key", "value"):
            setattr(att, name, slice_module(getattr(att, name), out_idx=rows))
        parent = _parent_of(model, out)
        setattr(parent, "dense", slice_module(out, in_idx=rows))
    sync_attention_heads(model)
    return model


def _parent_of(model: nn.Module, child: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if any(c is child for c in m.children()))


def _l1_rows(*weights: torch.Tensor) -> torch.Tensor:
    return sum(w.detach().abs().flatten(1).sum(1) for w in weights)


def prune_ffn(model: HFClassifier, keep: float) -> HFClassifier:
    """A copy of `model` keeping `keep` of each layer's feed-forward neurons, ranked by L1 norm: BERT-style
    (intermediate.dense, output.dense) or gated (Llama, Qwen, SmolLM: mlp.gate_proj, up_proj, down_proj)."""
    model = copy.deepcopy(model)
    _, _, layers = layer_list(model.hf)
    width = None
    for layer, gated in zip(layers, ffn_kinds(model)):
        mlp = getattr(layer, "mlp", None)
        if gated:
            score = _l1_rows(mlp.gate_proj.weight) + _l1_rows(mlp.up_proj.weight) + _l1_rows(mlp.down_proj.weight.t())
            kept = score.argsort(descending=True)[:max(1, round(keep * len(score)))].sort().values
            mlp.gate_proj = slice_module(mlp.gate_proj, out_idx=kept)
            mlp.up_proj = slice_module(mlp.up_proj, out_idx=kept)
            mlp.down_proj = slice_module(mlp.down_proj, in_idx=kept)
            width = len(kept)
            continue
        up, down = layer.intermediate.dense, layer.output.dense
        score = _l1_rows(up.weight) + _l1_rows(down.weight.t())
        kept = score.argsort(descending=True)[:max(1, round(keep * len(score)))].sort().values
        layer.intermediate.dense = slice_module(up, out_idx=kept)
        layer.output.dense = slice_module(down, in_idx=kept)
        width = len(kept)
    # every layer keeps the same count (`keep` of equal widths): the saved config.json says it, so plain
    # transformers builds the pruned shapes when it loads the folder
    if width is not None and hasattr(model.hf.config, "intermediate_size"):
        model.hf.config.intermediate_size = width
    return model


def ffn_kinds(model: HFClassifier) -> List[bool]:
    """Per layer, whether its feed-forward block is gated (Llama, Qwen, SmolLM: mlp.gate_proj, up_proj,
    down_proj) or BERT-style (intermediate.dense, output.dense); a layer of neither is one line."""
    _, _, layers = layer_list(model.hf)
    kinds = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        gated = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        up, down = getattr(getattr(layer, "intermediate", None), "dense", None), getattr(
            getattr(layer, "output", None), "dense", None)
        if not (gated or (isinstance(up, nn.Linear) and isinstance(down, nn.Linear))):
            raise UserError(f"compress.channels: layer {i} has no intermediate.dense/output.dense feed-forward pair "
                            f"nor a gated mlp (gate_proj, up_proj, down_proj)")
        kinds.append(gated)
    return kinds


# ---------------------------------------------------------------- CNN filters

_PASS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
         nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


def _sequence(model: nn.Module) -> Blocks:
    """The model's layers in forward order, when it is a plain chain (a layer list, or body + head)."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    body, head = getattr(model, "body", None), getattr(model, "head", None)
    if isinstance(body, nn.Sequential) and isinstance(head, nn.Linear):
        return [(f"body.{n}", m) for n, m in body.named_children()] + [("head", head)]
    return []


def _chain_pairs(model: nn.Module):
    """(conv, [batchnorms], consumer, spatial) for each conv whose output channels can be pruned in a chain:
    the consumer is the next conv, or the Linear after a Flatten (each channel feeding `spatial` inputs)."""
    seq = _sequence(model)
    for i, (name, conv) in enumerate(seq):
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            continue
        bns, flat = [], False
        for nxt_name, nxt in seq[i + 1:]:
            if isinstance(nxt, nn.BatchNorm2d):
                bns.append(nxt_name)
            elif isinstance(nxt, nn.Flatten) and nxt.start_dim == 1 and nxt.end_dim == -1:
                flat = True  # (channel-major: each channel's values side by side; another Flatten is not)
            elif isinstance(nxt, nn.Conv2d) and not flat and nxt.groups == 1:
                yield name, bns, nxt_name, 1
                break
            elif isinstance(nxt, nn.Linear) and flat and nxt.in_features % conv.out_channels == 0:
                yield name, bns, nxt_name, nxt.in_features // conv.out_channels
                break
            elif not isinstance(nxt, _PASS):
                break


def _block_pairs(model: nn.Module):
    """Inside residual blocks: conv1 -> BN -> conv2, whose middle channels never reach the shortcut."""
    from ..models.cifar import BasicBlock, WideBasicBlock
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            yield f"{name}.conv1", [f"{name}.bn1"], f"{name}.conv2", 1
        elif isinstance(m, WideBasicBlock):
            yield f"{name}.conv1", [f"{name}.bn2"], f"{name}.conv2", 1


def filter_pairs(model: nn.Module, what: str = "the model") -> list:
    """The convs whose filters can be pruned, with what follows each; none is one line."""
    pairs = list(_chain_pairs(model)) + list(_block_pairs(model))
    if not pairs:
        raise UserError(f"compress.channels: {what} has no conv layer whose filters can be pruned "
                        f"(supported: conv chains ending in Flatten + Linear, and the registry's residual blocks)")
    return pairs


def prune_channels(model: nn.Module, keep: float, what: str = "the model") -> nn.Module:
    """A copy of `model` keeping `keep` of the filters of every prunable conv (L1 norm), with the following
    BatchNorm and the next layer's inputs resized to match."""
    model = copy.deepcopy(model)
    pairs = filter_pairs(model, what)
    modules = dict(model.named_modules())
    for conv_name, bns, nxt_name, spatial in pairs:
        conv, nxt = modules[conv_name], modules[nxt_name]
        kept = _l1_rows(conv.weight).argsort(descending=True)[:max(1, round(keep * conv.out_channels))].sort().values
        replace(model, conv_name, slice_module(conv, out_idx=kept))
        for bn in bns:
            replace(model, bn, slice_module(modules[bn], out_idx=kept))
        cols = (kept[:, None] * spatial + torch.arange(spatial)).flatten()
        replace(model, nxt_name, slice_module(nxt, in_idx=cols))
        modules = dict(model.named_modules())
    return model
