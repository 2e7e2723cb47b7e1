"""Model building: a registry of named architectures, or a safely parsed layer list.

A model spec (the `teacher` / `student` sections of a recipe) is either
  {model: NAME, args: {...}}   a registered architecture, or
  {arch: ["Conv2d(1, 8, 3)", "ReLU()", ...]}   a layer list parsed against an allow-list.
The spec, the input shape and the class count are saved with the weights, so a checkpoint rebuilds itself.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import nn

from ..errors import UserError
from ..registry import MODELS
from . import cifar, gpt  # noqa: F401  (register resnet8x4, resnet32x4, wrn_16_2, wrn_40_2; gpt)
from .layers import ArgError, build_layer_list, whole


@MODELS.register("mlp")
def mlp(input_shape: Tuple[int, ...], num_classes: int, hidden: Sequence[int] = (256,),
        dropout: float = 0.0) -> nn.Module:
    """Flatten, then Linear-ReLU(-Dropout) blocks; hookable names `body.<i>` and `head`."""
    whole("hidden", hidden)
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    return _Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))


@MODELS.register("cnn")
def cnn(input_shape: Tuple[int, ...], num_classes: int, channels: Sequence[int] = (32, 64),
        hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    """The seed design's CNN: [Conv3x3-ReLU-MaxPool2] per channel width, then FC-ReLU and the classifier."""
    if len(input_shape) != 3:
        raise ValueError(f"needs images (channels, height, width), and these inputs have shape {tuple(input_shape)}: "
                         f"use mlp (digits can be read as images: data.as_image: true)")
    whole("channels", channels)
    whole("hidden", hidden)
    c, h, w = input_shape
    layers: list = []
    for out in channels:
        layers += [nn.Conv2d(c, int(out), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = int(out), h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, int(hidden)), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return _Classifier(nn.Sequential(*layers), nn.Linear(int(hidden), num_classes))


# Named models that are one setting of a family: (family, its args). Teacher-assistant chains read this to
# interpolate an assistant between, say, seed_cnn_teacher and seed_cnn_student within `cnn`.
PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "seed_cnn_teacher": ("cnn", {"channels": [32, 64], "hidden": 512}),
    "seed_cnn_student": ("cnn", {"channels": [16, 32], "hidden": 256}),
}


@MODELS.register("seed_cnn_teacher")
def seed_cnn_teacher(input_shape: Tuple[int, ...], num_classes: int, **kw: Any) -> nn.Module:
    """conv32-conv64-fc512, the seed design's teacher."""
    return cnn(input_shape, num_classes, **PRESETS["seed_cnn_teacher"][1], **kw)


@MODELS.register("seed_cnn_student")
def seed_cnn_student(input_shape: Tuple[int, ...], num_classes: int, **kw: Any) -> nn.Module:
    """conv16-conv32-fc256, the seed design's student."""
    return cnn(input_shape, num_classes, **PRESETS["seed_cnn_student"][1], **kw)


class _Classifier(nn.Module):
    """`body` (features) then `head` (logits): the two names most feature losses want to hook."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(spec: Dict[str, Any], input_shape: Tuple[int, ...], num_classes: int,
                where: str = "model", training: bool = True) -> nn.Module:
    """Build from a spec and check with a dry run that it maps `input_shape` to `num_classes` logits. Its size
    is taken first from a build on the meta device (nothing allocated): a model that would not fit in memory
    (for `training`, or to load a saved one) is one line, not a machine that swaps or a process the kernel
    kills."""
    try:
        with torch.device("meta"):
            probe = _construct(spec, input_shape, num_classes, where)
    except UserError:
        raise
    except Exception:  # (a builder that computes at init: sized by the build itself)
        probe = None
    if probe is not None:
        from ..engine.runtime import refuse_beyond_memory
        params = sum(p.numel() * p.element_size() for p in probe.parameters())
        buffers = sum(b.numel() * b.element_size() for b in probe.buffers())
        refuse_beyond_memory(f"{where}: {count_params(probe):,} parameters and {buffers:,} bytes of buffers"
                             + (" (weights, gradients and two optimizer moments in training)" if training else ""),
                             (4 if training else 1) * params + buffers)
    model = _construct(spec, input_shape, num_classes, where)
    empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
    if empty is not None:  # (torch builds a layer of width 0 and trains around it, with a warning)
        raise UserError(f"{where}: {empty} has no elements: a layer of size 0 (in {where}.args or {where}.arch)")
    check_output(model, input_shape, num_classes, where)
    return model


def _construct(spec: Dict[str, Any], input_shape: Tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    if spec.get("arch"):
        model = build_layer_list(spec["arch"], where=f"{where}.arch")
    elif spec.get("model"):
        builder = MODELS.get(spec["model"], where=f"{where}.model")
        try:
            model = builder(tuple(input_shape), num_classes, **(spec.get("args") or {}))
        except (TypeError, ArgError) as e:
            raise UserError(f"{where}.args: {e} (model '{spec['model']}')") from None
        except RuntimeError as e:  # (sizes torch cannot allocate)
            raise UserError(f"{where}.args: cannot build '{spec['model']}' ({str(e).splitlines()[0]})") from None
        except ValueError as e:  # (the inputs do not suit the model)
            raise UserError(f"{where}.model: '{spec['model']}' {e}") from None
    else:
        raise UserError(f"{where}: give `model: NAME` (one of {', '.join(MODELS.names())}) or `arch: [layers]`")
    return model


def check_output(model: nn.Module, input_shape: Tuple[int, ...], num_classes: int, where: str) -> None:
    x = torch.zeros(2, *input_shape, dtype=getattr(model, "input_dtype", torch.float32))
    was_training = model.training
    model.eval()
    sequential = isinstance(model, nn.Sequential)  # run layer by layer, so the error names the layer
    try:
        with torch.no_grad():
            for i, layer in enumerate(model if sequential else [model]):
                at = f"{where}.arch[{i}]: {type(layer).__name__}" if sequential else f"{where}: the model"
                try:
                    out = layer(x)
                except Exception as e:  # (a constructor argument that only the forward pass finds wrong, too)
                    why = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise UserError(f"{at} cannot take input of shape {tuple(x.shape[1:])} ({why})") from None
                if not torch.is_tensor(out):  # (MaxPool2d(return_indices=True) gives a tuple)
                    raise UserError(f"{at} gives a {type(out).__name__}, not a tensor, for the next layer")
                x = out
    finally:
        model.train(was_training)
    if getattr(model, "per_position", False):  # a language model: logits per position over the vocabulary
        if x.dim() != 3 or x.shape[-1] != num_classes:
            raise UserError(f"{where}: the model outputs shape {tuple(x.shape[1:])} per sample, not "
                            f"({input_shape[0]}, {num_classes}) logits over the data's {num_classes} tokens")
        return
    if x.dim() != 2 or x.shape[1] != num_classes:
        raise UserError(f"{where}: the model outputs shape {tuple(x.shape[1:])} per sample but the data has "
                        f"{num_classes} classes; end it with a layer giving {num_classes} outputs")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
