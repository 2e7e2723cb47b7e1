"""CIFAR-style ResNets and Wide ResNets used as teacher/student pairs in the KD literature.

These follow the architectures of the CRD benchmark (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; RepDistiller ``models/resnet.py`` and ``models/wrn.py``), so results can
be compared with published CIFAR-100 tables. Parameter counts with 100 classes:
``resnet8x4`` 1.23M, ``resnet32x4`` 7.43M, ``wrn_16_2`` 0.70M, ``wrn_40_2`` 2.26M.

Differences from the reference, none of which changes the parameters or the maths on 32x32 inputs:
* the stem takes ``input_shape[0]`` channels (1-channel MNIST works) and pooling is global
  (``AdaptiveAvgPool2d(1)``), so other input sizes such as 28x28 work;
* no ReLU or residual addition is in-place, so a forward hook on any module sees that module's
  own output (an in-place op after it would otherwise overwrite the hooked tensor);
* the models return logits only; take features with forward hooks by module name.

Hookable module names (``dict(model.named_modules())``):

ResNet (``resnet8x4``, ``resnet32x4``): ``conv1``, ``bn1``, ``relu`` (stem, 32 channels),
``layer1`` (64 ch, 32x32), ``layer2`` (128 ch, 16x16), ``layer3`` (256 ch, 8x8), each a sequence of
blocks ``layerK.<i>`` with ``conv1``, ``bn1``, ``relu``, ``conv2``, ``bn2``, optional ``downsample``;
then ``avgpool`` and the classifier ``fc``. The state_dict keys equal the reference's.

WideResNet (``wrn_16_2``, ``wrn_40_2``): ``conv1`` (stem, 16 channels), ``block1`` (16k ch),
``block2`` (32k ch, /2), ``block3`` (64k ch, /4), each a sequence of pre-activation blocks
``blockK.<i>`` with ``bn1``, ``relu1``, ``conv1``, ``bn2``, ``relu2``, ``conv2``, optional
``convShortcut``; then the final ``bn``, ``relu``, ``avgpool`` and the classifier ``fc``.
``block3`` is pre-activation (before the final BN-ReLU); ``relu`` is the last feature map.
A reference checkpoint's state_dict (``block1.layer.0...``, final ``bn1``) loads as is: its keys are
renamed on load.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..errors import UserError
from ..registry import MODELS


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _in_channels(input_shape: Tuple[int, ...], name: str) -> int:
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise UserError(f"model '{name}' needs image input of shape (C, H, W), got input shape {shape}")
    return int(shape[0])


# ---------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (optionally projected) input, then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: stem conv, three stages of n BasicBlocks (strides 1, 2, 2), pool, fc."""

    def __init__(self, depth: int, num_filters: List[int], num_classes: int = 100,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("resnet8x4")
def resnet8x4(input_shape: tuple, num_classes: int, **kwargs: Any) -> nn.Module:
    """ResNet-8 with 4x filters [32, 64, 128, 256] (CRD student, ~1.23M params at 100 classes)."""
    return ResNet(8, [32, 64, 128, 256], num_classes, _in_channels(input_shape, "resnet8x4"), **kwargs)


@MODELS.register("resnet32x4")
def resnet32x4(input_shape: tuple, num_classes: int, **kwargs: Any) -> nn.Module:
    """ResNet-32 with 4x filters [32, 64, 128, 256] (CRD teacher, ~7.43M params at 100 classes)."""
    return ResNet(32, [32, 64, 128, 256], num_classes, _in_channels(input_shape, "resnet32x4"), **kwargs)


# ------------------------------------------------------------------------------------ WideResNet
class WideBasicBlock(nn.Module):
    """Pre-activation block of the WRN paper: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # When the shape changes, the shortcut projects the pre-activated input (as in the reference).
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = nn.functional.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR: channels [16, 16k, 32k, 64k], (depth-4)/6 blocks per stage, BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = self._stage(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = self._stage(n, ch[2], ch[3], 2, drop_rate)
        self.bn = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _stage(n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(*(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                              stride if i == 0 else 1, drop_rate) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        # Accept reference (RepDistiller) checkpoints: `blockK.layer.i.` -> `blockK.i.`, final `bn1.` -> `bn.`.
        old = re.compile(rf"^{re.escape(prefix)}(?:(block\d\.)layer\.|bn1\.)")
        for key in [k for k in state_dict if old.match(k)]:
            new = old.sub(lambda m: prefix + (m.group(1) or "bn."), key)
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


@MODELS.register("wrn_16_2")
def wrn_16_2(input_shape: tuple, num_classes: int, **kwargs: Any) -> nn.Module:
    """WRN-16-2 (CRD student, ~0.70M params at 100 classes)."""
    return WideResNet(16, 2, num_classes, in_channels=_in_channels(input_shape, "wrn_16_2"), **kwargs)


@MODELS.register("wrn_40_2")
def wrn_40_2(input_shape: tuple, num_classes: int, **kwargs: Any) -> nn.Module:
    """WRN-40-2 (CRD teacher, ~2.26M params at 100 classes)."""
    return WideResNet(40, 2, num_classes, in_channels=_in_channels(input_shape, "wrn_40_2"), **kwargs)
